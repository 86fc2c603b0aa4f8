"""Structured outputs at the front door (router/structured_outputs.py, router/tool_grammar.py): which
request fields become which grammar, the 400s for what cannot be enforced, and the forced tool call's
grammar, checked against the tool-call parser: every call it accepts parses into the declared arguments,
and it refuses calls of other tools, unknown parameters and values of the wrong type.
"""
from __future__ import annotations

import json
from pathlib import Path

import llguidance
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from model_shards import grammar
from router.api_schemas import ChatCompletionRequest, CompletionRequest, parse_body
from router.errors import InvalidRequest
from router.frontend import Frontend, ModelInfo
from router.tokenizer import load_tokenizer
from router.tool_call_parser import parse_block
from router.tool_grammar import tool_call_lark

FOLDER = Path(__file__).resolve().parents[2] / "checkpoints" / "hybrid-mini"
TOK = grammar._tokenizer(str(FOLDER), 4096, 2, 1)          # the default model's tokenizer.json
WEATHER = {"type": "object", "properties": {
    "city": {"type": "string"}, "days": {"type": "integer"}, "metric": {"type": "boolean"},
    "unit": {"type": "string", "enum": ["C", "F"]}, "lat": {"type": "number"},
    "tags": {"type": "array", "items": {"type": "string"}}}, "required": ["city", "days"]}
TOOLS = {"get_weather": WEATHER, "search": {"type": "object", "properties": {"q": {"type": "string"}},
                                            "required": ["q"]}, "ping": None}
CHAT = {"messages": [{"role": "user", "content": "hi"}]}


def accepts(g: str, text: str) -> bool:
    """Whether the grammar takes the whole text (as the tokenizer splits it) and is then complete."""
    m = llguidance.LLMatcher(TOK, g)
    toks = TOK.tokenize_str(text)
    return m.try_consume_tokens(toks) == len(toks) and m.is_accepting()


def grammar_of(body: dict, kind=ChatCompletionRequest) -> str:
    return parse_body(kind, {**(CHAT if kind is ChatCompletionRequest else {"prompt": "x"}), **body}).grammar()


def call_text(name: str, args: dict) -> str:
    body = "".join(f"<parameter={k}>\n{v if isinstance(v, str) else json.dumps(v, separators=(',', ':'))}\n"
                   f"</parameter>\n" for k, v in args.items())
    return f"<tool_call>\n<function={name}>\n{body}</function>\n</tool_call>"


def test_each_field_becomes_the_grammar_it_names():
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    rf = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema, "strict": True}}
    for body in ({"response_format": rf}, {"guided_json": schema}, {"guided_json": json.dumps(schema)},
                 {"structured_outputs": {"json": schema}}):
        g = grammar_of(body)
        assert accepts(g, '{"a":12}') and not accepts(g, '{"a": 12}') and not accepts(g, '{"a":"x"}')
    for body in ({"response_format": {"type": "json_object"}}, {"structured_outputs": {"json_object": True}}):
        g = grammar_of(body)
        assert accepts(g, '{"b":[1,2]}') and not accepts(g, "[1]")
    assert grammar_of({"response_format": {"type": "text"}}) == "" and grammar_of({}) == ""
    g = grammar_of({"guided_regex": "[0-9]{3}-x"}, CompletionRequest)
    assert accepts(g, "123-x") and not accepts(g, "12-x")
    for body in ({"guided_choice": ["red", 'green "x"']}, {"structured_outputs": {"choice": ["red", 'green "x"']}}):
        g = grammar_of(body)
        assert accepts(g, "red") and accepts(g, 'green "x"') and not accepts(g, "blue")
    for lark in ('start: "a" b\nb: "b"+', 'root ::= "a" "b"+'):                # Lark, or GBNF
        g = grammar_of({"guided_grammar": lark})
        assert accepts(g, "abbb") and not accepts(g, "ba")


@pytest.mark.parametrize("body, param", [
    ({"response_format": {"type": "xml"}}, "response_format.type"),
    ({"response_format": {"type": "json_schema"}}, "response_format.json_schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": {}}}}, "response_format.json_schema.name"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "foo"}}}},
     "response_format.json_schema.schema"),
    ({"guided_json": "{not json"}, "guided_json"),
    ({"guided_json": {"type": "string", "format": "no-such-format"}}, "guided_json"),
    ({"guided_regex": "[a-"}, "guided_regex"),
    ({"guided_choice": []}, "guided_choice"),
    ({"guided_grammar": "start: undefined_rule"}, "guided_grammar"),
    ({"guided_regex": "a", "guided_choice": ["a"]}, "guided_choice"),
    ({"response_format": {"type": "json_object"}, "guided_regex": "a"}, "guided_regex"),
    ({"structured_outputs": {"regex": 5}}, "structured_outputs.regex"),
    ({"structured_outputs": {"choice": "a"}}, "structured_outputs.choice"),
    ({"structured_outputs": {"json": {"type": "nope"}}}, "structured_outputs.json"),
    ({"guided_json": {}, "structured_outputs": {"grammar": "start: a"}}, "structured_outputs.grammar"),
])
def test_what_cannot_be_enforced_is_a_400_naming_the_field(body, param):
    with pytest.raises(InvalidRequest) as e:
        grammar_of(body)
    assert e.value.status == 400 and e.value.param == param and e.value.message.startswith(param + ":"), e.value


@settings(max_examples=30, deadline=None)
@given(city=st.text(st.characters(blacklist_characters="<\n", blacklist_categories=("Cs",)), min_size=1, max_size=20),
       days=st.integers(-10**6, 10**6), metric=st.none() | st.booleans(), unit=st.none() | st.sampled_from("CF"),
       lat=st.none() | st.floats(-90, 90), tags=st.none() | st.lists(st.text("abc ", max_size=4), max_size=3))
def test_a_required_call_the_grammar_accepts_parses_into_the_declared_arguments(city, days, metric, unit, lat, tags):
    args = {"city": city, "days": days, "metric": metric, "unit": unit, "lat": lat, "tags": tags}
    args = {k: v for k, v in args.items() if v is not None}           # declared order, optional ones left out
    text = call_text("get_weather", args)
    assert accepts(grammar.llguidance.LLMatcher.grammar_from_lark(tool_call_lark(TOOLS)), text)
    assert accepts(grammar.llguidance.LLMatcher.grammar_from_lark(tool_call_lark(TOOLS, "get_weather")), text)
    calls = parse_block(text[len("<tool_call>"):-len("</tool_call>")], TOOLS)
    assert calls == [("get_weather", json.dumps(args, ensure_ascii=False))]


def test_the_tool_call_grammar_refuses_what_would_not_parse_into_the_declared_arguments():
    g_any = llguidance.LLMatcher.grammar_from_lark(tool_call_lark(TOOLS))
    g_named = llguidance.LLMatcher.grammar_from_lark(tool_call_lark(TOOLS, "search"))
    assert accepts(g_any, call_text("search", {"q": "x"})) and accepts(g_named, call_text("search", {"q": "x"}))
    assert accepts(g_any, call_text("ping", {}))
    assert not accepts(g_named, call_text("get_weather", {"city": "P", "days": 1}))    # only the named tool
    assert not accepts(g_any, call_text("get_weather", {"city": "P"}))                  # a required one missing
    assert not accepts(g_any, call_text("get_weather", {"city": "P", "days": "two"}))   # not an integer
    assert not accepts(g_any, call_text("get_weather", {"city": "P", "days": 1, "unit": "K"}))   # not in enum
    assert not accepts(g_any, call_text("get_weather", {"days": 1, "city": "P"}))       # out of declared order
    assert not accepts(g_any, call_text("nope", {}))
    assert not accepts(g_any, "Sure! " + call_text("ping", {}))                         # the call, nothing else


@pytest.mark.parametrize("choice, only", [("required", None), ({"type": "function", "function": {"name": "search"}},
                                                                "search")])
def test_a_forced_tool_choice_sends_the_tool_call_grammar(choice, only):
    tools = [{"type": "function", "function": {"name": n, **({"parameters": p} if p else {})}} for n, p in TOOLS.items()]
    g = grammar_of({"tools": tools, "tool_choice": choice})
    assert g == llguidance.LLMatcher.grammar_from_lark(tool_call_lark(TOOLS, only))
    assert grammar_of({"tools": tools, "tool_choice": "auto"}) == ""


@pytest.mark.parametrize("parser, thinking, good, bad", [
    # The template opened <think>: reasoning up to the first </think>, then the JSON.
    ("nemotron", True, ['plan: a {"x"} </thin\n</think>\n\n{"a":1}', '</think>{"a":1}'],
     ['{"a":1}', 'x</think>y</think>{"a":1}', 'x</think>{"a": 1}']),
    # The output may open <think> itself (qwen3 / nemotron semantics), or answer right away.
    ("qwen3", None, ['<think>hm</think>\n{"a":1}', '{"a":1}'], ['hm</think>{"a":1}', '<think>{"a":1}']),
    # Thinking off (the template closed it): the grammar from the first token, as without a parser.
    ("nemotron", False, ['{"a":1}'], ['</think>{"a":1}']),
])
def test_with_a_reasoning_parser_the_grammar_applies_after_the_reasoning(parser, thinking, good, bad):
    info = ModelInfo(name="m", max_model_len=4096, vocab_size=4096, eos_token_ids=[2])
    fe = Frontend(backend=None, tokenizer=load_tokenizer(FOLDER), info=info, reasoning_parser=parser)
    kwargs = {} if thinking is None else {"chat_template_kwargs": {"enable_thinking": thinking}}
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    prep = fe.prepare_chat(parse_body(ChatCompletionRequest, {**CHAT, **kwargs, "guided_json": schema}))
    for text in good:
        assert accepts(prep.params.grammar, text), text
    for text in bad:
        assert not accepts(prep.params.grammar, text), text
