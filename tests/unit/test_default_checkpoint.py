"""The shipped default model (checkpoints/hybrid-mini) loads in transformers and in hybridserve alike.

Why: it is what `make serve` serves, so its files must be a real nemotron_h checkpoint (HF names, config
fields, tokenizer with chat template) and our loader must compute the same logits as transformers' port.
The weights are stored in bf16 and both sides upcast them to float32, so the logits agree to float32
rounding. config.json sets `time_step_min` to 0: the model was trained without transformers' dt floor
of 0.001 (some heads go below it); with the floor the logits would differ by ~1e-3 relative.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from model_shards.batch import BatchLayout
from model_shards.generate import generate
from model_shards.sampling_params import SamplingParams
from model_shards.weights import load_checkpoint

FOLDER = Path(__file__).resolve().parents[2] / "checkpoints" / "hybrid-mini"
CODE = 'import os\n\n\ndef read_lines(path):\n    """Return the lines of a file."""\n    with open(path) as f:\n'
MAX_REL_ERR = 1e-4


@pytest.fixture(scope="module")
def ours():
    return load_checkpoint(FOLDER, dtype=torch.float32)


@pytest.fixture(scope="module")
def tok():
    from tokenizers import Tokenizer
    return Tokenizer.from_file(str(FOLDER / "tokenizer.json"))


def prompt_ids(tok) -> list[int]:
    return [1] + tok.encode(CODE).ids


@torch.no_grad()
def our_logits(model, ids: list[int]) -> torch.Tensor:
    T, block = len(ids), 16
    n = math.ceil(T / block)
    cache = model.make_cache(num_blocks=n, block_size=block, num_slots=1)
    return model.logits(model(torch.tensor(ids), BatchLayout.single(T, 0, torch.arange(n)), cache))


def test_files_config_and_size():
    names = {p.name for p in FOLDER.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "generation_config.json", "draft_vocab.json"} <= names
    assert sum(p.stat().st_size for p in FOLDER.iterdir()) < 32e6
    cfg = json.loads((FOLDER / "config.json").read_text())
    assert cfg["model_type"] == "nemotron_h" and cfg["num_nextn_predict_layers"] == 1
    assert cfg["mtp_hybrid_override_pattern"] == "*E" and isinstance(cfg["mtp_use_final_norm_hidden"], bool)
    assert set(cfg["hybrid_override_pattern"]) <= set("M*E") and cfg["vocab_size"] % 64 == 0
    assert cfg["moe_latent_size"] and cfg["bos_token_id"] == 1 and cfg["eos_token_id"] == 2
    assert cfg["time_step_min"] == 0.0
    assert "chat_template" in json.loads((FOLDER / "tokenizer_config.json").read_text())


def test_hybridserve_loader_reads_every_tensor_including_mtp(ours):
    cfg = json.loads((FOLDER / "config.json").read_text())
    assert ours.mtp is not None and ours.cfg.has_mtp
    assert ours.cfg.mtp_use_final_norm_hidden == cfg["mtp_use_final_norm_hidden"]


def test_the_draft_vocabulary_is_the_most_frequent_tokens_and_is_loaded(ours, tok):
    """draft_vocab.json (training/draft_vocab.py): 2048 distinct ids, most frequent first; byte-level BPE
    merges the most frequent pairs first, so its ids lean low, and the commonest code tokens are in it."""
    data = json.loads((FOLDER / "draft_vocab.json").read_text())
    ids = data["token_ids"]
    assert len(ids) == len(set(ids)) == data["size"] == 2048 and data["train_tokens_covered"] > 0.9
    assert torch.equal(ours.checkpoint_draft_vocab, torch.tensor(ids))
    common = {t for word in ("    ", " self", "def", " return", "(", ")", ":\n", " =") for t in tok.encode(word).ids}
    assert common <= set(ids)


@pytest.mark.parametrize("content,error", [('{"ids": [1]}', "token_ids list"), ('{"token_ids": [1, 1]}', "distinct"),
                                           ('{"token_ids": [5000]}', "0..4095"), ("not json", "token_ids list")])
def test_a_bad_draft_vocabulary_file_is_refused_with_its_path(tmp_path, content, error):
    from model_shards.weights import CheckpointError, read_draft_vocab

    (tmp_path / "draft_vocab.json").write_text(content)
    with pytest.raises(CheckpointError, match=error) as e:
        read_draft_vocab(tmp_path, 4096)
    assert "draft_vocab.json" in str(e.value)
    assert read_draft_vocab(tmp_path / "nowhere", 4096) is None


def test_tokenizer_round_trip_and_specials(tok):
    text = CODE + "        return [l.rstrip('\\n') for l in f]  # é ☃ 🙂\n\tx = {'a': 1}\n"
    assert tok.decode(tok.encode(text).ids, skip_special_tokens=False) == text
    assert [tok.token_to_id(t) for t in ("<pad>", "<s>", "</s>")] == [0, 1, 2]


def test_chat_template_renders_with_transformers():
    transformers = pytest.importorskip("transformers")
    t = transformers.AutoTokenizer.from_pretrained(str(FOLDER))
    text = t.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert text == "<s><|user|>\nhi<|end|>\n<|assistant|>\n"


def test_transformers_and_hybridserve_give_the_same_logits(ours, tok):
    transformers = pytest.importorskip("transformers")
    hf = transformers.NemotronHForCausalLM.from_pretrained(str(FOLDER), dtype=torch.float32).eval()
    ids = prompt_ids(tok)
    with torch.no_grad():
        ref = hf(torch.tensor([ids]), use_cache=False).logits[0].float()
    mine = our_logits(ours, ids)
    err = ((mine - ref).abs().max() / ref.abs().max()).item()
    assert err < MAX_REL_ERR, err
    assert torch.equal(mine.argmax(-1), ref.argmax(-1))


def test_greedy_generation_of_a_code_prompt(ours, tok):
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    plain = generate(ours, prompt_ids(tok), params)
    drafted = generate(ours, prompt_ids(tok), params, num_drafts=3)
    assert len(plain.tokens) == 24 and drafted.tokens == plain.tokens      # MTP drafting is lossless
    assert drafted.num_accepted > 0                                          # the trained MTP block helps
    assert tok.decode(plain.tokens).strip()
