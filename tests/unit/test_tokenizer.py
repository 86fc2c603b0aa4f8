"""Tokenizers of the front door: byte fallback, tokenizer.json + chat template, incremental text."""
from __future__ import annotations

import json

import pytest

from router.detokenizer import IncrementalDetokenizer, TextStream
from router.tokenizer import ByteTokenizer, ChatTemplateError, HFTokenizer, load_tokenizer

TEMPLATE = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'tool' %}"
            "{{ raise_exception('tool messages are not supported') }}{% endif %}"
            "<|{{ m['role'] }}|>{{ m['content'] }}{{ eos_token }}{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}")


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["hello world, héllo wörld", "snowman ☃ and 你好 and emoji 🙂"] * 20, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    folder = tmp_path_factory.mktemp("tok")
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": {"content": "</s>"}, "chat_template": TEMPLATE}))
    return folder


def test_byte_tokenizer_round_trip_and_specials():
    t = ByteTokenizer(vocab_size=2048)
    ids = t.encode("héllo ☃")
    assert ids[0] == 1 and ids[1] == ord("h") + 3
    assert t.decode(ids) == "héllo ☃"
    assert t.decode([2, ord("a") + 3, 0]) == "a"                 # pad/bos/eos hidden
    assert t.decode([ord("a") + 3, 1000]) == "a<|1000|>"         # outside the byte range: visible
    assert t.encode("x", add_special_tokens=False) == [ord("x") + 3]


def test_byte_tokenizer_chat_template_adds_bos_once():
    t = ByteTokenizer()
    ids = t.encode_chat([{"role": "user", "content": "hi"}])
    assert ids[0] == 1 and ids.count(1) == 1
    assert t.decode(ids) == "<|user|>\nhi\n<|assistant|>\n"


def test_hf_tokenizer_loads_template_and_special_ids(hf_folder):
    t = load_tokenizer(hf_folder)
    assert isinstance(t, HFTokenizer)
    assert (t.bos_token_id, t.eos_token_id) == (1, 2)
    text = t.apply_chat_template([{"role": "user", "content": "hello"}])
    assert text == "<s><|user|>hello</s><|assistant|>"
    ids = t.encode_chat([{"role": "user", "content": "hello"}])
    assert ids.count(1) == 1, "the template writes BOS; encoding must not add a second one"
    assert t.decode(t.encode("héllo wörld ☃")) == "héllo wörld ☃"


def test_add_special_tokens_adds_the_tokenizers_bos_on_top_of_the_templates(hf_folder):
    """vLLM's `add_special_tokens` for chat: off (the default), the template's BOS is the only one."""
    t = load_tokenizer(hf_folder)
    text = t.apply_chat_template([{"role": "user", "content": "hello"}])
    assert t.encode_rendered(text, add_special_tokens=True) == [1] + t.encode_rendered(text)
    assert t.encode_rendered(text).count(1) == 1


def test_template_exception_is_a_client_error(hf_folder):
    with pytest.raises(ChatTemplateError, match="tool messages"):
        load_tokenizer(hf_folder).apply_chat_template([{"role": "tool", "content": "x"}])


def test_chat_template_jinja_file_wins(hf_folder, tmp_path):
    for f in hf_folder.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    (tmp_path / "chat_template.jinja").write_text("{% for m in messages %}[{{ m['content'] }}]{% endfor %}")
    assert load_tokenizer(tmp_path).apply_chat_template([{"role": "user", "content": "a"}]) == "[a]"


def test_no_tokenizer_json_falls_back_to_bytes(tmp_path):
    assert isinstance(load_tokenizer(tmp_path, vocab_size=300), ByteTokenizer)
    assert isinstance(load_tokenizer(None), ByteTokenizer)


@pytest.mark.parametrize("kind", ["bytes", "bpe"])
def test_incremental_detokenizer_matches_full_decode(kind, hf_folder):
    t = ByteTokenizer() if kind == "bytes" else load_tokenizer(hf_folder)
    text = "héllo wörld ☃ and 你好 🙂!"
    ids = t.encode(text, add_special_tokens=False)
    d = IncrementalDetokenizer(t)
    deltas = [d.add([i]) for i in ids] + [d.flush()]
    assert "".join(deltas) == text
    assert all("\ufffd" not in x for x in deltas), "a split character must be held back, not sent broken"


def test_split_multibyte_character_is_held_back():
    t = ByteTokenizer()
    d = IncrementalDetokenizer(t)
    euro = [b + 3 for b in "€".encode()]
    assert d.add(euro[:1]) == "" and d.add(euro[1:2]) == ""
    assert d.add(euro[2:]) == "€"


def test_stop_string_across_deltas_is_cut_and_never_half_sent():
    t = ByteTokenizer()
    s = TextStream(t, stop=["STOP"])
    sent, hit = "", False
    for ch in "abc STOP def":
        out, hit = s.add(t.encode(ch, add_special_tokens=False))
        sent += out
        assert "S" not in sent or hit is False or sent.endswith(" ")
        if hit:
            break
    assert hit and sent == "abc "


def test_stop_string_holdback_is_flushed_at_the_end():
    t = ByteTokenizer()
    s = TextStream(t, stop=["xyz"])
    out = "".join(s.add([i])[0] for i in t.encode("hello xy", add_special_tokens=False))
    assert out == "hello "            # "xy" may begin "xyz": held back
    assert s.finish() == "xy" and not s.stopped


def test_stop_strings_wait_for_min_tokens():
    t = ByteTokenizer()
    s = TextStream(t, stop=["a"], min_tokens=3)
    ids = t.encode("aaaa", add_special_tokens=False)
    sent = []
    for i in ids:
        out, hit = s.add([i])
        sent.append(out)
        if hit:
            break
    assert hit and sent == ["a", "a", ""]    # the 3rd token is the first that may stop


@pytest.mark.parametrize("kind", ["bytes", "hf"])
def test_token_strs_are_one_string_per_id_special_tokens_included(kind, hf_folder):
    """`/tokenize`'s `return_token_strs`: the vocabulary's strings (byte-level BPE shows a space as Ġ)."""
    t = ByteTokenizer() if kind == "bytes" else load_tokenizer(hf_folder)
    ids = t.encode("hello world")
    strs = t.token_strs(ids)
    assert len(strs) == len(ids) and strs[0] == "<s>"
    if kind == "bytes":
        assert "".join(strs[1:]) == "hello world"
    else:
        assert "".join(strs[1:]).replace("Ġ", " ") == "hello world"
