"""The tool-call parser (`--tool-call-parser qwen3_coder`, router/tool_call_parser.py), the combined chat
output (router/chat_output.py) and the request's tool fields (router/tool_schemas.py).

Parser outputs are OpenAI's: `tool_calls` with arguments JSON converted by the declared parameter types,
the text before the first call as content, finish_reason "tool_calls"; malformed or cut-off XML stays
content. The streamed deltas (first delta of a call: index, id, type, name, arguments ""; then arguments)
reassemble to exactly the non-streamed message however the text is cut.
"""
from __future__ import annotations

import itertools
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from router.api_schemas import ChatCompletionRequest, parse_body, parse_tokenize
from router.chat_output import ChatParsing, merge_deltas
from router.errors import InvalidRequest, Unsupported
from router.frontend import Frontend, ModelInfo
from router.tokenizer import ByteTokenizer
from router.tool_call_parser import ToolCallStream, convert_value, parse_block

WEATHER = {"type": "object", "properties": {
    "city": {"type": "string"}, "days": {"type": "integer"}, "metric": {"type": "boolean"},
    "lat": {"type": "number"}, "opts": {"type": "object"}, "tags": {"type": "array", "items": {"type": "string"}},
    "note": {"type": ["string", "null"]}}, "required": ["city"]}
TOOLS = {"get_weather": WEATHER, "search": {"type": "object", "properties": {"q": {"type": "string"}}}}


def call(name: str, **params) -> str:
    body = "".join(f"<parameter={k}>\n{v}\n</parameter>\n" for k, v in params.items())
    return f"<tool_call>\n<function={name}>\n{body}</function>\n</tool_call>"


# (model output, content, [(name, arguments as parsed JSON)]), as Qwen3-Coder / Nemotron 3 write them.
RECORDED = [
    ("I'll check the weather.\n" + call("get_weather", city="Paris", days="3"),
     "I'll check the weather.\n", [("get_weather", {"city": "Paris", "days": 3})]),
    (call("get_weather", city="New York", metric="true", lat="40.7", opts='{"units": "C"}', tags='["a", "b"]',
          note="null"),
     None, [("get_weather", {"city": "New York", "metric": True, "lat": 40.7, "opts": {"units": "C"},
                             "tags": ["a", "b"], "note": None})]),
    # two calls (parallel), whitespace between and after them dropped
    (call("get_weather", city="Paris") + "\n" + call("search", q="louvre hours") + "\n",
     None, [("get_weather", {"city": "Paris"}), ("search", {"q": "louvre hours"})]),
    # multi-line string values keep their inner newlines; one newline each side is the format's
    (call("search", q="line one\nline two\n"), None, [("search", {"q": "line one\nline two\n"})]),
    # a value that does not parse as its declared type stays text; undeclared parameters are text
    (call("get_weather", city="Paris", days="three", extra="42"), None,
     [("get_weather", {"city": "Paris", "days": "three", "extra": "42"})]),
    # unclosed </parameter> before the next one, missing </tool_call> at the end: accepted (as vLLM does)
    ("<tool_call>\n<function=search>\n<parameter=q>\nabc\n<parameter=r>\nx\n</parameter>\n</function>",
     None, [("search", {"q": "abc", "r": "x"})]),
    # a function without parameters
    ("<tool_call>\n<function=search>\n</function>\n</tool_call>", None, [("search", {})]),
    # no call at all
    ("The weather in Paris is sunny.", "The weather in Paris is sunny.", []),
    # malformed or cut off: content, tags and all, never an error
    ("Sure. <tool_call>\n<function=get_weather>\n<parameter=city>\nPar",
     "Sure. <tool_call>\n<function=get_weather>\n<parameter=city>\nPar", []),
    ("<tool_call>oops</tool_call> then text", "<tool_call>oops</tool_call> then text", []),
    ("<tool_call></tool_call>", "<tool_call></tool_call>", []),
    ("<tool_call>\n<function=bad name>\n</function>\n</tool_call>",
     "<tool_call>\n<function=bad name>\n</function>\n</tool_call>", []),
    ("<tool_", "<tool_", []),
    # text after a call is content too (the model should not write any: the template says so)
    (call("search", q="x") + "\nDone.", "\nDone.", [("search", {"q": "x"})]),
]


def ids():
    counter = itertools.count()
    return lambda: f"call_{next(counter)}"


def whole(text: str, parsing: ChatParsing, finish: str = "stop") -> tuple[dict, str]:
    return parsing.new(ids()).message(text, finish)


def streamed(text: str, cuts: list[int], parsing: ChatParsing, finish: str = "stop") -> tuple[dict, str, list]:
    out, deltas, prev, fin = parsing.new(ids()), [], 0, None
    for c in sorted(cuts):
        d, fin = out.step(text[prev:c])
        deltas += d
        prev = c
    d, fin = out.step(text[prev:], finish)
    deltas += d
    return merge_deltas(deltas, reasoning=parsing.reasoning_state is not None), fin, deltas


def check_openai_delta_shapes(deltas: list[dict]) -> None:
    seen = set()
    for d in deltas:
        assert len(d) == 1 and next(iter(d.values())) != "", d
        for tc in d.get("tool_calls", ()):
            if tc["index"] not in seen:
                assert tc["index"] == len(seen), "calls are numbered 0, 1, ... in order"
                assert set(tc) == {"index", "id", "type", "function"} and tc["type"] == "function"
                assert tc["id"].startswith("call_") and tc["function"]["arguments"] == "" and tc["function"]["name"]
                seen.add(tc["index"])
            else:
                assert set(tc) == {"index", "function"} and set(tc["function"]) == {"arguments"}


@pytest.mark.parametrize("text, content, calls", RECORDED)
def test_recorded_outputs_parse_to_openai_tool_calls(text, content, calls):
    parsing = ChatParsing(None, TOOLS)
    msg, finish = whole(text, parsing)
    assert msg["content"] == content
    got = [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in msg.get("tool_calls", [])]
    assert got == calls
    assert finish == ("tool_calls" if calls else "stop")
    for c in msg.get("tool_calls", []):
        assert c["type"] == "function" and c["id"].startswith("call_")
        assert c["function"]["arguments"] == json.dumps(json.loads(c["function"]["arguments"]), ensure_ascii=False)


@pytest.mark.parametrize("text, content, calls", RECORDED)
def test_recorded_outputs_stream_to_the_same_message_at_every_cut(text, content, calls):
    parsing = ChatParsing(None, TOOLS)
    expected = whole(text, parsing)
    for i in range(len(text) + 1):
        msg, finish, deltas = streamed(text, [i], parsing)
        assert (msg, finish) == expected, f"cut at {i}"
        check_openai_delta_shapes(deltas)
    msg, finish, deltas = streamed(text, list(range(len(text))), parsing)       # one character at a time
    assert (msg, finish) == expected
    assert not any("<tool_call>" in d.get("content", "") for d in deltas) or not calls


def test_convert_value_by_declared_type():
    assert convert_value("3", {"type": "integer"}) == 3
    assert convert_value("3.5", {"type": "integer"}) == "3.5"
    assert convert_value(" 2.5 ", {"type": "number"}) == 2.5
    assert convert_value("NaN", {"type": "number"}) == "NaN"
    assert convert_value("True", {"type": "boolean"}) is True
    assert convert_value("yes", {"type": "boolean"}) == "yes"
    assert convert_value('{"a": [1]}', {"type": "object"}) == {"a": [1]}
    assert convert_value("[1, 2]", {"type": "array"}) == [1, 2]
    assert convert_value("[1, 2]", {"type": "object"}) == "[1, 2]"
    assert convert_value("null", {"type": ["string", "null"]}) is None
    assert convert_value("null", {"type": "string"}) == "null"
    assert convert_value("5", {"anyOf": [{"type": "integer"}, {"type": "string"}]}) == 5
    assert convert_value(" 42 ", {"type": "string"}) == " 42 "            # strings are kept as written
    assert convert_value("42", None) == "42"                              # undeclared: text
    assert convert_value("1" * 5000, {"type": "integer"}) == "1" * 5000   # past Python's int parsing limit


def test_parse_block_needs_whole_functions():
    assert parse_block("\n<function=search>\n<parameter=q>\nx\n</parameter>\n</function>\n", TOOLS) == \
        [("search", '{"q": "x"}')]
    assert parse_block("<function=search>\n<parameter=q>\nx\n</parameter>\n", TOOLS) is None      # no </function>
    assert parse_block("text <function=search></function>", TOOLS) is None
    assert parse_block("  \n ", TOOLS) is None


def test_parallel_tool_calls_false_keeps_the_first_call():
    text = call("search", q="a") + call("search", q="b")
    msg, finish = whole(text, ChatParsing(None, TOOLS, parallel_tool_calls=False))
    assert [c["function"]["arguments"] for c in msg["tool_calls"]] == ['{"q": "a"}'] and finish == "tool_calls"


def test_reasoning_then_tool_call_and_a_call_inside_reasoning_is_reasoning():
    text = "I need " + call("search", q="inner") + " weather.</think>Checking.\n" + call("get_weather", city="Oslo")
    parsing = ChatParsing("reasoning", TOOLS)
    msg, finish = whole(text, parsing)
    assert msg["reasoning_content"] == "I need " + call("search", q="inner") + " weather."
    assert msg["content"] == "Checking.\n" and finish == "tool_calls"
    assert [c["function"]["name"] for c in msg["tool_calls"]] == ["get_weather"]
    for i in range(len(text) + 1):
        assert streamed(text, [i], parsing)[:2] == (msg, finish)


def test_length_cut_after_a_call_is_still_tool_calls_and_a_cut_call_is_content():
    text = call("search", q="a") + "\n<tool_call>\n<function=sea"
    msg, finish = whole(text, ChatParsing(None, TOOLS), "length")
    assert finish == "tool_calls" and len(msg["tool_calls"]) == 1
    assert msg["content"] == "<tool_call>\n<function=sea"            # the whitespace between blocks: dropped
    msg, finish = whole("<tool_call>\n<function=sea", ChatParsing(None, TOOLS), "length")
    assert finish == "length" and msg == {"role": "assistant", "content": "<tool_call>\n<function=sea"}


# ---- property: random outputs, random cuts ---------------------------------------------------------------

PIECES = st.sampled_from([
    call("get_weather", city="Paris", days="3"), call("search", q="x y"), "<tool_call>", "</tool_call>",
    "<function=search>", "</function>", "<parameter=q>", "</parameter>", "\n", " ", "text", "<", "</", "<tool",
    "<think>", "</think>", "é☃", "{", '"'])


@settings(max_examples=300, deadline=None)
@given(pieces=st.lists(PIECES, max_size=10), reasoning=st.sampled_from([None, "start", "reasoning"]),
       finish=st.sampled_from(["stop", "length"]), parallel=st.booleans(), data=st.data())
def test_random_outputs_stream_to_the_non_streamed_message(pieces, reasoning, finish, parallel, data):
    text = "".join(pieces)
    cuts = data.draw(st.lists(st.integers(0, len(text)), max_size=8))
    parsing = ChatParsing(reasoning, TOOLS, parallel)
    expected = whole(text, parsing, finish)
    msg, fin, deltas = streamed(text, cuts, parsing, finish)
    assert (msg, fin) == expected
    check_openai_delta_shapes(deltas)
    for c in msg.get("tool_calls", []):
        assert isinstance(json.loads(c["function"]["arguments"]), dict)
    if reasoning is None and "<tool_call>" not in text:
        assert msg["content"] == text                          # nothing to parse: the text, unchanged


def test_tool_call_stream_holds_only_what_may_be_a_tag():
    s = ToolCallStream(TOOLS, new_id=ids())
    assert s.feed("Hello <tool") == [("content", "Hello ")]
    assert s.feed("box>") == [("content", "<toolbox>")]
    assert s.feed("<tool_call>\n<function=search>\n") == []
    assert s.feed("</function>\n</tool_call>") == [("call", 0, "call_0", "search", "{}")]
    assert s.feed("\n  \n") == [] and s.finish() == []


# ---- the request's tool fields (router/tool_schemas.py) ----------------------------------------------------

CHAT = {"model": "m", "messages": [{"role": "user", "content": "weather in Paris?"}]}
TOOL = {"type": "function", "function": {"name": "get_weather", "description": "Current weather",
                                         "parameters": WEATHER}}


def frontend(tool_call_parser: str | None = "qwen3_coder", reasoning_parser: str | None = None) -> Frontend:
    info = ModelInfo(name="m", max_model_len=4096, vocab_size=300, eos_token_ids=[2])
    return Frontend(backend=None, tokenizer=ByteTokenizer(300), info=info, tool_call_parser=tool_call_parser,
                    reasoning_parser=reasoning_parser)


@pytest.mark.parametrize("extra, param", [
    ({"tools": [{"type": "retrieval", "function": {"name": "f"}}]}, "tools[0].type"),
    ({"tools": [{"type": "function"}]}, "tools[0].function"),
    ({"tools": [{"type": "function", "function": {"name": "bad name"}}]}, "tools[0].function.name"),
    ({"tools": [{"type": "function", "function": {"name": "x" * 65}}]}, "tools[0].function.name"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": "{}"}}]}, "tools[0].function.parameters"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}]},
     "tools[0].function.parameters"),
    ({"tools": [TOOL, TOOL]}, "tools[1].function.name"),
    ({"tools": TOOL}, "tools"),
    ({"tools": [TOOL], "tool_choice": "always"}, "tool_choice"),
    ({"tools": [TOOL], "tool_choice": 5}, "tool_choice"),
    ({"tools": [TOOL], "tool_choice": {"type": "function"}}, "tool_choice.function.name"),
    ({"tools": [TOOL], "tool_choice": {"type": "x", "function": {"name": "get_weather"}}}, "tool_choice.type"),
    ({"tools": [TOOL], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
     "tool_choice.function.name"),
    ({"tool_choice": "auto"}, "tool_choice"),                       # tool_choice without tools
    ({"parallel_tool_calls": False}, "parallel_tool_calls"),       # parallel_tool_calls without tools
    ({"tools": [{"type": "function", "function": {"name": f"t{i}"}} for i in range(129)]}, "tools"),   # > 128
    ({"tools": [TOOL], "parallel_tool_calls": "yes"}, "parallel_tool_calls"),
    ({"chat_template_kwargs": "enable_thinking"}, "chat_template_kwargs"),
    ({"chat_template_kwargs": ["enable_thinking"]}, "chat_template_kwargs"),
    ({"chat_template_kwargs": {"messages": []}}, "chat_template_kwargs.messages"),
    ({"messages": [{"role": "user", "content": "hi", "tool_calls": []}, {"role": "user", "content": "x",
      "tool_calls": [{"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}]},
     "messages[1].tool_calls"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "f", "arguments": "not json"}}]}]},
     "messages[1].tool_calls[0].function.arguments"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "f"}}]}]}, "messages[1].tool_calls[0].function.arguments"),
])
def test_invalid_tool_fields_are_400s_naming_openais_param(extra, param):
    with pytest.raises(InvalidRequest) as e:
        frontend().prepare_chat(parse_body(ChatCompletionRequest, {**CHAT, **extra}))
    assert e.value.status == 400 and e.value.param == param and e.value.message.startswith(param + ":"), e.value


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_weather"}}])
def test_forcing_a_tool_call_gives_a_grammar_and_parses_the_call(choice):
    """What the grammar accepts: tests/unit/test_structured_outputs.py; here: it is sent, and parsed."""
    prep = frontend().prepare_chat(parse_body(ChatCompletionRequest, {**CHAT, "tools": [TOOL], "tool_choice": choice}))
    assert "get_weather" in prep.params.grammar and prep.parsing.tools == {"get_weather": WEATHER}
    auto = frontend().prepare_chat(parse_body(ChatCompletionRequest, {**CHAT, "tools": [TOOL]}))
    assert auto.params.grammar == ""


def test_tools_need_a_parser_unless_tool_choice_is_none():
    with pytest.raises(Unsupported) as e:
        frontend(None).prepare_chat(parse_body(ChatCompletionRequest, {**CHAT, "tools": [TOOL]}))
    assert e.value.param == "tools" and "--tool-call-parser" in e.value.message
    prep = frontend(None).prepare_chat(parse_body(ChatCompletionRequest, {**CHAT, "tools": [TOOL],
                                                                           "tool_choice": "none"}))
    assert prep.parsing is None                                 # shown to the model, not parsed


def test_what_a_request_gets_parsed_by():
    fe = frontend("qwen3_coder", "nemotron")
    prep = fe.prepare_chat(parse_body(ChatCompletionRequest, {**CHAT, "tools": [TOOL], "tool_choice": "auto",
                                                              "parallel_tool_calls": False}))
    assert prep.parsing == ChatParsing("start", {"get_weather": WEATHER}, parallel_tool_calls=False)
    prep = fe.prepare_chat(parse_body(ChatCompletionRequest, {**CHAT, "tools": [TOOL], "tool_choice": "none"}))
    assert prep.parsing == ChatParsing("start", None)
    assert frontend().prepare_chat(parse_body(ChatCompletionRequest, CHAT)).parsing is None     # no tools
    with pytest.raises(ValueError, match="tool_call_parser"):
        frontend("hermes")


def test_tools_and_template_kwargs_reach_the_template_and_tokenize_agrees():
    fe = frontend()
    tmpl = ("{% for m in messages %}{{ m['role'] }}:{{ m['content'] }}{% if m['tool_calls'] is defined %}"
            "{{ m['tool_calls'] | tojson }}{% endif %};{% endfor %}{% if tools %}{{ tools | tojson }}{% endif %}"
            "{% if enable_thinking is defined %}think={{ enable_thinking }}{% endif %}")
    fe.tokenizer.chat_template = tmpl
    convo = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "content": "sunny", "tool_call_id": "call_1"}]
    body = {**CHAT, "messages": convo, "tools": [TOOL], "chat_template_kwargs": {"enable_thinking": False}}
    prep = fe.prepare_chat(parse_body(ChatCompletionRequest, body))
    text = fe.tokenizer.decode(prep.prompt_ids)
    assert text.startswith('user:hi;assistant:[{"id": "call_1", "type": "function", "function": {"name": '
                           '"get_weather", "arguments": {"city": "Paris"}}}];tool:sunny;')   # arguments: an object
    assert '"name": "get_weather"' in text and "Current weather" in text and text.endswith("think=False")
    assert fe.tokenize(parse_tokenize({k: v for k, v in body.items() if k != "model"}))["tokens"] == prep.prompt_ids


# ---- the default model's chat template (checkpoints/hybrid-mini, training/tokenizer.py) ---------------------

ROLE_TAG_TEMPLATE = ("{{ bos_token }}{% for message in messages %}{{ '<|' + message['role'] + '|>\n' + "
                     "message['content'] + '<|end|>\n' }}{% endfor %}{% if add_generation_prompt %}"
                     "{{ '<|assistant|>\n' }}{% endif %}")      # the template before tools and enable_thinking


def test_default_template_renders_plain_conversations_as_before_and_is_what_training_exports():
    from pathlib import Path

    from router.tokenizer import render_chat_template
    from training.tokenizer import CHAT_TEMPLATE, tokenizer_config

    folder = Path(__file__).resolve().parents[2] / "checkpoints" / "hybrid-mini"
    assert (folder / "tokenizer_config.json").read_text() == json.dumps(tokenizer_config(), indent=2) + "\n"
    texts = ["hi", "", "x\ny {{ }} <think> <tool_call>", " spaced "]
    for n in range(1, 5):
        for k, roles in enumerate(itertools.product(["system", "user", "assistant"], repeat=n)):
            msgs = [{"role": r, "content": texts[(k + i) % len(texts)]} for i, r in enumerate(roles)]
            for gen in (True, False):
                for extra in ({}, {"tools": None}, {"tools": []}):
                    assert render_chat_template(CHAT_TEMPLATE, msgs, gen, bos_token="<s>", eos_token="</s>",
                                                **extra) == \
                        render_chat_template(ROLE_TAG_TEMPLATE, msgs, gen, bos_token="<s>", eos_token="</s>")
