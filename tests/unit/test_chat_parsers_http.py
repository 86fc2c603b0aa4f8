"""`--reasoning-parser` and `--tool-call-parser` end to end: the real HTTP app (router/http_app.py), the real
Frontend and the default model's tokenizer and chat template (checkpoints/hybrid-mini), called with the
official `openai` SDK, stream and non-stream.

The engine is replaced at the frontend boundary by `ScriptedBackend`, which "generates" a scripted text
(its token ids under the default model's tokenizer, handed out a few tokens at a time as MTP does): the
tiny default model was never trained to call tools or to think, so it would not write `<tool_call>` or
`</think>` by itself. Everything else is what a client meets: validation, the chat template rendering the
tools, the prompt the engine would get, stop strings, SSE framing and the parsed response fields.
"""
from __future__ import annotations

import itertools
import json
from pathlib import Path

import openai
import pytest
from fastapi.testclient import TestClient

from router.frontend import Frontend, ModelInfo
from router.http_app import build_app
from router.outputs import RequestOutput
from router.request_stream import RequestStream
from router.tokenizer import load_tokenizer

FOLDER = Path(__file__).resolve().parents[2] / "checkpoints" / "hybrid-mini"
WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "The current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"},
                                                    "metric": {"type": "boolean"}}, "required": ["city"]}}}
MSGS = [{"role": "system", "content": "You are a weather bot."}, {"role": "user", "content": "Weather in Paris?"}]
TOOL_OUTPUT = ("Let me look that up.\n<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n"
               "<parameter=days>\n3\n</parameter>\n<parameter=metric>\ntrue\n</parameter>\n</function>\n</tool_call>")


class ScriptedBackend:
    """A backend whose every request outputs `text` (then eos), `chunk` tokens per engine step."""

    def __init__(self, tokenizer, text: str = "", chunk: int = 3):
        self.tokenizer, self.text, self.chunk = tokenizer, text, chunk
        self.prompts: list[list[int]] = []

    async def submit(self, request_id, prompt_ids, params):
        self.prompts.append(list(prompt_ids))
        ids = self.tokenizer.encode(self.text, add_special_tokens=False)
        finish = "length" if len(ids) > params.max_tokens else "stop"
        ids = ids[:params.max_tokens]
        steps = [ids[i:i + self.chunk] for i in range(0, len(ids), self.chunk)] or [[]]
        outs = iter([RequestOutput(request_id, step, finish if k == len(steps) - 1 else None,
                                   num_prompt_tokens=len(prompt_ids),
                                   num_output_tokens=min(len(ids), (k + 1) * self.chunk))
                     for k, step in enumerate(steps)])

        async def next_output():
            try:
                return next(outs)
            except StopIteration:
                raise StopAsyncIteration from None
        return RequestStream(request_id, next_output, lambda: None)

    async def ready(self):
        return True

    async def stats(self):
        return {}


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(FOLDER)


def serve(tokenizer, text: str, chunk: int = 3, **parsers):
    backend = ScriptedBackend(tokenizer, text, chunk)
    info = ModelInfo("hybrid-mini", max_model_len=4096, vocab_size=tokenizer.vocab_size, eos_token_ids=[2])
    fe = Frontend(backend, tokenizer, info, **parsers)
    http = TestClient(build_app(fe))
    return backend, openai.OpenAI(base_url="http://testserver/v1", api_key="unused", http_client=http, max_retries=0)


def reassemble(chunks) -> tuple[str | None, str | None, list[dict], str | None]:
    """What an OpenAI client makes of streamed chunks: content, reasoning_content, tool_calls, finish_reason."""
    content, reasoning, calls, finish = [], [], {}, None
    for c in chunks:
        if not c.choices:
            continue
        d = c.choices[0].delta
        content.append(d.content or "")
        reasoning.append(getattr(d, "reasoning_content", None) or "")
        for tc in d.tool_calls or []:
            if tc.index not in calls:
                assert tc.id and tc.type == "function" and tc.function.name and tc.function.arguments == ""
                calls[tc.index] = {"id": tc.id, "type": tc.type, "function": {"name": tc.function.name,
                                                                               "arguments": ""}}
            else:
                assert tc.id is None and tc.function.name is None
            calls[tc.index]["function"]["arguments"] += tc.function.arguments or ""
        finish = c.choices[0].finish_reason or finish
    return "".join(content) or None, "".join(reasoning) or None, [calls[i] for i in sorted(calls)], finish


@pytest.mark.parametrize("chunk", [1, 3, 7])
def test_tool_calls_stream_and_non_stream(tokenizer, chunk):
    backend, client = serve(tokenizer, TOOL_OUTPUT, chunk, tool_call_parser="qwen3_coder")
    r = client.chat.completions.create(model="hybrid-mini", messages=MSGS, tools=[WEATHER_TOOL], max_tokens=200)
    msg = r.choices[0].message
    assert r.choices[0].finish_reason == "tool_calls" and msg.content == "Let me look that up.\n"
    [tc] = msg.tool_calls
    assert tc.type == "function" and tc.id.startswith("call_") and tc.function.name == "get_weather"
    assert json.loads(tc.function.arguments) == {"city": "Paris", "days": 3, "metric": True}
    # the tools were rendered into the prompt by the checkpoint's chat template
    prompt = tokenizer.decode(backend.prompts[-1], skip_special_tokens=False)
    assert "<tools>\n" + json.dumps(WEATHER_TOOL["function"], ensure_ascii=False) + "\n</tools>" in prompt
    assert prompt.startswith("<s><|system|>\nYou are a weather bot.\n\n# Tools") and "<tool_call>" in prompt
    assert backend.prompts[-1] == tokenizer.encode_chat(
        [{"role": m["role"], "content": m["content"]} for m in MSGS], tools=[WEATHER_TOOL])

    chunks = list(client.chat.completions.create(model="hybrid-mini", messages=MSGS, tools=[WEATHER_TOOL],
                                                 max_tokens=200, stream=True))
    content, reasoning, calls, finish = reassemble(chunks)
    assert (content, reasoning, finish) == ("Let me look that up.\n", None, "tool_calls")
    assert [{**c, "id": None} for c in calls] == [{**tc.model_dump(), "id": None}]      # ids are per response
    assert all("<tool_call>" not in (c.choices[0].delta.content or "") for c in chunks if c.choices)


def test_the_tool_round_trip_renders_and_without_a_parser_tools_are_a_400(tokenizer):
    backend, client = serve(tokenizer, "It is sunny in Paris.", tool_call_parser="qwen3_coder")
    convo = [*MSGS, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"sky": "sunny"}'}]
    r = client.chat.completions.create(model="hybrid-mini", messages=convo, tools=[WEATHER_TOOL])
    assert r.choices[0].message.content == "It is sunny in Paris." and r.choices[0].finish_reason == "stop"
    assert not r.choices[0].message.tool_calls
    prompt = tokenizer.decode(backend.prompts[-1], skip_special_tokens=False)
    assert prompt.endswith("<|assistant|>\n<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n"
                           "</parameter>\n</function>\n</tool_call>\n<|end|>\n<|user|>\n<tool_response>\n"
                           '{"sky": "sunny"}\n</tool_response>\n<|end|>\n<|assistant|>\n')
    _, plain = serve(tokenizer, TOOL_OUTPUT)
    with pytest.raises(openai.BadRequestError) as e:
        plain.chat.completions.create(model="hybrid-mini", messages=MSGS, tools=[WEATHER_TOOL])
    assert e.value.body["param"] == "tools" and "--tool-call-parser" in e.value.body["message"]
    r = plain.chat.completions.create(model="hybrid-mini", messages=MSGS, tools=[WEATHER_TOOL], tool_choice="none")
    assert r.choices[0].message.content == TOOL_OUTPUT and not r.choices[0].message.tool_calls


@pytest.mark.parametrize("body, param", [
    ({"tools": [{"type": "function", "function": {"name": "get weather"}}]}, "tools[0].function.name"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": []}}]}, "tools[0].function.parameters"),
    ({"tools": [WEATHER_TOOL], "tool_choice": {"type": "function", "function": {"name": "get_time"}}},
     "tool_choice.function.name"),
    ({"tools": [WEATHER_TOOL], "tool_choice": "required", "guided_regex": "a+"}, "guided_regex"),
    ({"tool_choice": "auto"}, "tool_choice"),
    ({"chat_template_kwargs": "enable_thinking=false"}, "chat_template_kwargs"),
])
def test_validation_errors_are_400_with_openais_param(tokenizer, body, param):
    _, client = serve(tokenizer, TOOL_OUTPUT, tool_call_parser="qwen3_coder")
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="hybrid-mini", messages=MSGS, extra_body=body)
    assert e.value.status_code == 400 and e.value.body["param"] == param
    assert e.value.body["message"].startswith(param + ":")


@pytest.mark.parametrize("chunk", [1, 2, 5])
def test_reasoning_when_the_template_opened_think(tokenizer, chunk):
    """enable_thinking (chat_template_kwargs) makes the checkpoint's template end with `<think>\\n`: the output
    starts inside the reasoning and only closes it; a stop string still cuts the content."""
    output = "The user wants the weather. I should answer briefly.\n</think>\n\nIt is sunny. STOP and more"
    backend, client = serve(tokenizer, output, chunk, reasoning_parser="nemotron")
    kw = dict(model="hybrid-mini", messages=MSGS, stop=["STOP"], extra_body={"chat_template_kwargs":
                                                                             {"enable_thinking": True}})
    r = client.chat.completions.create(**kw)
    msg = r.choices[0].message
    assert tokenizer.decode(backend.prompts[-1], skip_special_tokens=False).endswith("<|assistant|>\n<think>\n")
    assert msg.reasoning_content == "The user wants the weather. I should answer briefly.\n"
    assert msg.content == "\n\nIt is sunny. " and r.choices[0].finish_reason == "stop"
    content, reasoning, calls, finish = reassemble(client.chat.completions.create(**kw, stream=True))
    assert (content, reasoning, calls, finish) == (msg.content, msg.reasoning_content, [], "stop")


def test_reasoning_off_by_template_and_model_opened_think(tokenizer):
    _, client = serve(tokenizer, "<think>hmm</think>Hello!", reasoning_parser="nemotron")
    r = client.chat.completions.create(model="hybrid-mini", messages=MSGS)
    assert (r.choices[0].message.reasoning_content, r.choices[0].message.content) == ("hmm", "Hello!")
    r = client.chat.completions.create(model="hybrid-mini", messages=MSGS,
                                       extra_body={"chat_template_kwargs": {"enable_thinking": False}})
    assert (r.choices[0].message.reasoning_content, r.choices[0].message.content) == (None,
                                                                                      "<think>hmm</think>Hello!")


def test_reasoning_and_tool_calls_together_with_max_tokens(tokenizer):
    output = "Paris weather needed.</think>" + TOOL_OUTPUT
    _, client = serve(tokenizer, output, 4, reasoning_parser="deepseek_r1", tool_call_parser="nemotron")
    kw = dict(model="hybrid-mini", messages=MSGS, tools=[WEATHER_TOOL])
    r = client.chat.completions.create(**kw)
    msg = r.choices[0].message
    assert msg.reasoning_content == "Paris weather needed." and msg.content == "Let me look that up.\n"
    assert [json.loads(tc.function.arguments) for tc in msg.tool_calls] == [{"city": "Paris", "days": 3,
                                                                             "metric": True}]
    content, reasoning, calls, finish = reassemble(client.chat.completions.create(**kw, stream=True))
    assert (content, reasoning, finish) == (msg.content, msg.reasoning_content, "tool_calls")
    assert [c["function"] for c in calls] == [tc.function.model_dump() for tc in msg.tool_calls]
    # cut inside the call by max_tokens: the partial call is content, finish_reason "length"
    r = client.chat.completions.create(**kw, max_tokens=30)
    assert r.choices[0].finish_reason == "length" and not r.choices[0].message.tool_calls
    assert "<tool_call>" in r.choices[0].message.content
    content, _, calls, finish = reassemble(client.chat.completions.create(**kw, max_tokens=30, stream=True))
    assert (content, calls, finish) == (r.choices[0].message.content, [], "length")


def test_without_parsers_the_response_shape_is_unchanged(tokenizer):
    _, client = serve(tokenizer, "<think>x</think>" + TOOL_OUTPUT)
    http = client._client
    body = http.post("/v1/chat/completions", json={"messages": MSGS}).json()
    assert body["choices"][0]["message"] == {"role": "assistant", "content": "<think>x</think>" + TOOL_OUTPUT}
    assert body["choices"][0]["finish_reason"] == "stop"
    raw = http.post("/v1/chat/completions", json={"messages": MSGS, "stream": True}).text
    events = [json.loads(line[6:]) for line in raw.splitlines() if line.startswith("data: {")]
    assert all(set(e["choices"][0]["delta"]) <= {"role", "content"} for e in events)


def test_return_token_ids_go_with_the_parsed_deltas(tokenizer):
    _, client = serve(tokenizer, TOOL_OUTPUT, 5, tool_call_parser="qwen3_coder")
    http = client._client
    body = {"messages": MSGS, "tools": [WEATHER_TOOL], "return_token_ids": True}
    whole = http.post("/v1/chat/completions", json=body).json()["choices"][0]
    raw = http.post("/v1/chat/completions", json={**body, "stream": True}).text
    events = [json.loads(line[6:]) for line in raw.splitlines() if line.startswith("data: {")]
    ids = list(itertools.chain.from_iterable(e["choices"][0]["token_ids"] for e in events))
    assert ids == whole["token_ids"] == tokenizer.encode(TOOL_OUTPUT, add_special_tokens=False)
    assert [e["choices"][0]["finish_reason"] for e in events if e["choices"][0]["finish_reason"]] == ["tool_calls"]


def test_parsed_responses_conform_to_the_published_schema(tokenizer):
    """`/openapi.json` documents reasoning_content and tool_calls (message and delta), and null content."""
    jsonschema = pytest.importorskip("jsonschema")
    _, client = serve(tokenizer, "Hmm.</think>" + TOOL_OUTPUT, 3, reasoning_parser="deepseek_r1",
                      tool_call_parser="qwen3_coder")
    http = client._client
    doc = http.get("/openapi.json").json()

    def validator(name):
        return jsonschema.Draft202012Validator({**doc["components"]["schemas"][name],
                                                "components": doc["components"]})
    body = {"messages": MSGS, "tools": [WEATHER_TOOL]}
    whole = http.post("/v1/chat/completions", json=body).json()
    validator("ChatCompletion").validate(whole)
    assert whole["choices"][0]["message"]["tool_calls"] and whole["choices"][0]["message"]["reasoning_content"]
    raw = http.post("/v1/chat/completions", json={**body, "stream": True}).text
    chunks = [json.loads(line[6:]) for line in raw.splitlines() if line.startswith("data: {")]
    for c in chunks:
        validator("ChatCompletionChunk").validate(c)
    assert any("tool_calls" in c["choices"][0]["delta"] for c in chunks)
    empty = serve(tokenizer, TOOL_OUTPUT, tool_call_parser="qwen3_coder")[1]._client
    validator("ChatCompletion").validate(empty.post("/v1/chat/completions", json=body).json())


def test_the_options_on_the_cli_and_in_serve_config_args():
    from router.cli import build_parser
    from router.serve_options import serve_args_from_dict, serve_config_from_args

    cfg = serve_config_from_args(build_parser().parse_args(["serve"]))
    assert (cfg.reasoning_parser, cfg.tool_call_parser) == (None, None)          # off by default
    cfg = serve_config_from_args(build_parser().parse_args(
        ["serve", "--reasoning-parser", "nemotron", "--tool-call-parser", "qwen3_coder", "--enable-auto-tool-choice"]))
    assert (cfg.reasoning_parser, cfg.tool_call_parser) == ("nemotron", "qwen3_coder")
    # a Serve config file's / the Helm chart's `args` (extraArgs), parsed by the same parser
    cfg = serve_config_from_args(serve_args_from_dict({"reasoning_parser": "deepseek_r1", "tool-call-parser": "nemotron",
                                                       "enable_auto_tool_choice": True}))
    assert (cfg.reasoning_parser, cfg.tool_call_parser) == ("deepseek_r1", "nemotron")
    for bad in ({"reasoning_parser": "gpt"}, {"tool_call_parser": "hermes"}):
        with pytest.raises(ValueError, match="invalid choice"):
            serve_args_from_dict(bad)
    with pytest.raises(ValueError, match="--enable-auto-tool-choice: needs --tool-call-parser"):
        serve_config_from_args(serve_args_from_dict({"enable_auto_tool_choice": True}))
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--reasoning-parser", "bogus"])
