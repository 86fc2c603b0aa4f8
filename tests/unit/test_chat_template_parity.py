"""The chat template is rendered exactly as transformers' `apply_chat_template` renders it.

The reference is transformers itself (the tokenizer loaded from checkpoints/hybrid-mini, local files only),
fed the conversation the way vLLM feeds it from an OpenAI request (developer as system, text parts joined by
"\\n", tool-call arguments as objects). Ours is the whole request path: the OpenAI body validated by
`ChatCompletionRequest`, rendered by router/tokenizer.py, tokenized. Strings and ids must be identical, on the
shipped template (system, developer, user, assistant, tool-call, tool-result and reasoning turns; tools or
none; enable_thinking on, off, unset; generation prompt or a continued final message) and on a template
using what transformers' jinja environment adds (`{% generation %}`, `namespace`, `dict`, `tools`/`documents`
always defined, the special tokens by name, reasoning under all its names).
"""
from __future__ import annotations

import copy
import itertools
import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from router.api_schemas import ChatCompletionRequest, parse_body
from router.tokenizer import load_tokenizer, render_chat_template

FOLDER = Path(__file__).resolve().parents[2] / "checkpoints" / "hybrid-mini"
OURS = load_tokenizer(FOLDER)

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city ☃",
                                            "parameters": {"type": "object", "properties": {
                                                "city": {"type": "string"}, "days": {"type": "integer"}}}}}
CALL = {"id": "call_1", "type": "function",
        "function": {"name": "get_weather", "arguments": json.dumps({"city": "Zürich", "days": 3})}}
CONVERSATIONS = {
    "system": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}],
    "developer_and_parts": [
        {"role": "developer", "content": [{"type": "text", "text": "Be brief."},
                                          {"type": "text", "text": "No emoji."}]},
        {"role": "user", "content": [{"type": "text", "text": "héllo"}, {"type": "text", "text": "wörld 🙂"}]}],
    "tool_round_trip": [
        {"role": "system", "content": "You can look up the weather."},
        {"role": "user", "content": "Weather in Zürich and Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [CALL, {**CALL, "id": "call_2", "function": {
            "name": "get_weather", "arguments": json.dumps({"city": "Paris", "days": 1})}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
        {"role": "tool", "tool_call_id": "call_2", "content": [{"type": "text", "text": "rain"}]},
        {"role": "assistant", "content": "Sunny in Zürich, rain in Paris."},
        {"role": "user", "content": "Thanks!"}],
    "reasoning": [
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "<think>\nsimple sum\n</think>\n\n4", "reasoning_content": "simple sum"},
        {"role": "user", "content": "and 3+3?"},
        {"role": "assistant", "content": "<think>\n</think>\n\nIt is", "name": "calc"}],
}


@pytest.fixture(scope="module")
def reference():
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(FOLDER), local_files_only=True)


def as_vllm_passes_them(messages: list[dict]) -> list[dict]:
    """An OpenAI conversation as vLLM hands it to `apply_chat_template` (the mapping under test, written out)."""
    out = []
    for m in copy.deepcopy(messages):
        if m["role"] == "developer":
            m["role"] = "system"
        if isinstance(m.get("content"), list):
            m["content"] = "\n".join(p["text"] for p in m["content"])
        if m.get("content") is None:
            m["content"] = ""
        for call in m.get("tool_calls", ()):
            call["function"]["arguments"] = json.loads(call["function"]["arguments"])
        out.append(m)
    return out


def ours(body: dict) -> tuple[str, list[int]]:
    req = parse_body(ChatCompletionRequest, body)
    text = OURS.apply_chat_template(req.chat_messages(), req.add_generation_prompt, req.continue_final_message,
                                    **req.template_kwargs())
    return text, OURS.encode_rendered(text, req.add_special_tokens)


def theirs(reference, body: dict) -> tuple[str, list[int]]:
    kw = dict(tools=body.get("tools"), add_generation_prompt=body.get("add_generation_prompt", True),
              continue_final_message=body.get("continue_final_message", False), **body.get("chat_template_kwargs", {}))
    messages = as_vllm_passes_them(body["messages"])
    text = reference.apply_chat_template(messages, tokenize=False, **kw)
    return text, list(reference.apply_chat_template(messages, tokenize=True, return_dict=False, **kw))


GRID = list(itertools.product(sorted(CONVERSATIONS), [False, True], [None, True, False], ["new", "none", "continue"]))


@pytest.mark.parametrize("name, tools, thinking, prompt", GRID)
def test_the_shipped_template_renders_as_transformers_renders_it(reference, name, tools, thinking, prompt):
    body = {"messages": CONVERSATIONS[name], "add_generation_prompt": prompt == "new",
            "continue_final_message": prompt == "continue"}
    if tools:
        body["tools"] = [WEATHER]
    if thinking is not None:
        body["chat_template_kwargs"] = {"enable_thinking": thinking}
    if prompt == "continue" and body["messages"][-1]["role"] != "assistant":
        body["messages"] = body["messages"] + [{"role": "assistant", "content": "Let me"}]
    text, ids = ours(body)
    want_text, want_ids = theirs(reference, body)
    assert text == want_text
    assert ids == want_ids


def test_vllms_add_special_tokens_tokenizes_the_rendered_chat_as_the_tokenizer_would(reference):
    """On top of what the template writes (this tokenizer.json adds nothing itself: BOS comes from the template;
    one that adds BOS: tests/unit/test_tokenizer.py)."""
    body = {"messages": CONVERSATIONS["system"], "add_special_tokens": True}
    text, ids = ours(body)
    assert ids == reference(text, add_special_tokens=True)["input_ids"]
    assert ids.count(OURS.bos_token_id) == 1


@settings(max_examples=40, deadline=None)
@given(texts=st.lists(st.text(alphabet=st.characters(codec="utf-8"), max_size=20) |
                      st.sampled_from(["<|end|>", "<s>", "</s>", "<think>", "{{ x }}", "</tool_response>"]),
                      min_size=1, max_size=5),
       add_generation_prompt=st.booleans())
def test_any_text_renders_and_tokenizes_as_transformers_does(reference, texts, add_generation_prompt):
    """Random contents (special-token text and Jinja syntax included: a template never evaluates content)."""
    roles = itertools.cycle(["user", "assistant"])
    body = {"messages": [{"role": "system", "content": texts[0]}] + [{"role": next(roles), "content": t}
                                                                      for t in texts[1:]],
            "add_generation_prompt": add_generation_prompt}
    assert ours(body) == theirs(reference, body)


# What transformers' environment offers templates beyond plain Jinja, in one template.
ENVIRONMENT_TEMPLATE = (
    "{%- set ns = namespace(n=0) -%}"
    "{{ bos_token }}|{{ pad_token }}|{{ tools is none }}|{{ documents is none }}|{{ dict(a=1) | tojson }}\n"
    "{%- for m in messages %}"
    "{%- set ns.n = ns.n + 1 %}"
    "[{{ m.role }}{% if m.name is defined %}:{{ m.name }}{% endif %}]"
    "{% if m.thinking is defined %}(thinking {{ m.thinking }}/{{ m.reasoning_content }}){% endif %}"
    "{% if m.role == 'assistant' %}{% generation %}{{ m.content }}{% endgeneration %}"
    "{% else %}{{ m.content }}{% endif %}"
    "{%- endfor %}#{{ ns.n }}"
    "{% if add_generation_prompt %}[assistant]{% endif %}")


@pytest.mark.parametrize("messages, kwargs", [
    ([{"role": "user", "content": "hi", "name": None}, {"role": "assistant", "content": "yo", "reasoning": "r"}], {}),
    ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo", "reasoning_content": "rc"}],
     {"add_generation_prompt": True}),
    ([{"role": "user", "content": "hi", "name": "ann"}], {"tools": [WEATHER]}),
])
def test_transformers_jinja_environment_features(reference, messages, kwargs):
    want = reference.apply_chat_template(messages, chat_template=ENVIRONMENT_TEMPLATE, tokenize=False, **kwargs)
    extra = {k: v for k, v in kwargs.items() if k != "add_generation_prompt"}
    got = render_chat_template(ENVIRONMENT_TEMPLATE, messages, kwargs.get("add_generation_prompt", False),
                               **OURS.special_tokens_map(), **extra)
    assert got == want


@settings(max_examples=30, deadline=None)
@given(prompt=st.text(alphabet=st.characters(codec="utf-8"), max_size=30) | st.sampled_from(["<s>hi</s>", "<|user|>"]),
       add_special_tokens=st.booleans())
def test_tokenize_and_detokenize_answer_what_vllms_transformers_calls_give(reference, prompt, add_special_tokens):
    """vLLM's /tokenize: `tokenizer(prompt, add_special_tokens=...)`, `convert_ids_to_tokens` for token_strs;
    its /detokenize: `tokenizer.decode(tokens)` (special tokens kept)."""
    from router.api_schemas import DetokenizeRequest, parse_tokenize
    from router.frontend import Frontend, ModelInfo

    fe = Frontend(None, OURS, ModelInfo("hybrid-mini", max_model_len=4096, vocab_size=OURS.vocab_size))
    out = fe.tokenize(parse_tokenize({"prompt": prompt, "add_special_tokens": add_special_tokens,
                                      "return_token_strs": True}))
    ids = reference(prompt, add_special_tokens=add_special_tokens)["input_ids"]
    assert out == {"count": len(ids), "max_model_len": 4096, "tokens": ids,
                   "token_strs": reference.convert_ids_to_tokens(ids)}
    assert fe.detokenize(parse_body(DetokenizeRequest, {"tokens": ids})) == {"prompt": reference.decode(ids)}
