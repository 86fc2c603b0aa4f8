"""Structured outputs and forced tool calls through `hybridserve serve` as users run it: the default model
with MTP on (`--num-speculative-tokens 3`, fixed: every pass drafts) and `--tool-call-parser qwen3_coder`,
called with the official `openai` SDK and with the Vercel AI SDK (tests/js).

The tiny default model was never trained for JSON or tools; the grammar alone makes its output parse and
validate, and greedy output under a grammar is the oracle's with MTP off.
"""
from __future__ import annotations

import asyncio
import json
import random
import shutil
import subprocess
from pathlib import Path

import jsonschema
import openai
import pytest

from benchmarks.served import ServedCluster
from model_shards.generate import generate
from model_shards.sampling_params import SamplingParams
from model_shards.weights import load_checkpoint
from router.api_schemas import CompletionRequest, parse_body
from router.engine import AsyncEngine
from router.engine_config import EngineConfig
from tests.engine_helpers import collect, oracle

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]
JS = REPO / "tests" / "js"
PERSON = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 16}, "age": {"type": "integer", "minimum": 0, "maximum": 120},
    "city": {"enum": ["Paris", "Rome", "Oslo"]}, "tags": {"type": "array", "items": {"type": "string", "maxLength": 8},
                                                         "maxItems": 3}},
    "required": ["name", "age", "city", "tags"], "additionalProperties": False}
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "The weather in a city", "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                     "days": {"type": "integer", "minimum": 1, "maximum": 7},
                                     "unit": {"type": "string", "enum": ["C", "F"]}},
    "required": ["city", "days"]}}}
SEARCH = {"type": "function", "function": {"name": "search", "parameters": {
    "type": "object", "properties": {"q": {"type": "string", "maxLength": 20}}, "required": ["q"]}}}
TOPICS = ["a chef", "a pilot", "my aunt", "a robot", "the mayor", "a cat owner", "a student", "a painter", "a baker",
          "a sailor", "a doctor", "a poet", "a runner", "a farmer", "a coder", "a singer", "a judge", "a nurse",
          "a miner", "a tailor", "a monk", "a clown"]


@pytest.fixture(scope="module")
def server():
    with ServedCluster("--num-speculative-tokens", "3", "--speculative-policy", "fixed",
                       "--tool-call-parser", "qwen3_coder", num_cpus=2) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=120)


def test_json_schema_outputs_validate_on_20_prompts(client):
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    accepted = 0
    for i, topic in enumerate(random.sample(TOPICS, 20)):
        sampled = dict(temperature=0.8, seed=random.randrange(2**31)) if i % 2 else dict(temperature=0)
        r = client.chat.completions.create(model="hybrid-mini", messages=[{"role": "user", "content": f"Describe {topic}."}],
                                           response_format=fmt, max_tokens=320, **sampled)
        choice = r.choices[0]
        assert choice.finish_reason == "stop", choice
        jsonschema.validate(json.loads(choice.message.content), PERSON)
        accepted += r.usage.completion_tokens_details.accepted_prediction_tokens
    assert accepted > 0                      # MTP drafted and had drafts accepted under the grammar


def test_greedy_output_under_a_grammar_is_the_oracles_without_mtp(client):
    """The served tokens (MTP k=3) equal the single-process oracle's at k=0 for the same grammar."""
    model = load_checkpoint(REPO / "checkpoints" / "hybrid-mini")
    rng = random.Random()
    for body in ({"guided_json": PERSON}, {"guided_regex": r"(yes|no), because [a-z ]{1,30}\."},
                 {"response_format": {"type": "json_object"}}):
        prompt = [rng.randrange(7, 4096) for _ in range(rng.randrange(4, 24))]
        r = client.completions.create(model="hybrid-mini", prompt=prompt, max_tokens=96, temperature=0,
                                      extra_body={**body, "return_token_ids": True})
        served = r.choices[0].token_ids
        g = parse_body(CompletionRequest, {"prompt": prompt, **body}).grammar()
        want = generate(model, prompt, SamplingParams(max_tokens=96, stop_token_ids=(2,), grammar=g), num_drafts=0)
        assert served == want.tokens, (body, prompt)


def test_guided_choice_and_regex(client):
    for topic in random.sample(TOPICS, 3):
        r = client.chat.completions.create(model="hybrid-mini", messages=[{"role": "user", "content": f"Is {topic} happy?"}],
                                           max_tokens=16, extra_body={"guided_choice": ["yes", "no", "not sure"]})
        assert r.choices[0].message.content in ("yes", "no", "not sure") and r.choices[0].finish_reason == "stop"
        r = client.completions.create(model="hybrid-mini", prompt=f"The phone number of {topic} is", max_tokens=24,
                                      extra_body={"guided_regex": r"\+33 [0-9]{3}-[0-9]{4}"})
        assert __import__("re").fullmatch(r"\+33 [0-9]{3}-[0-9]{4}", r.choices[0].text), r.choices[0].text


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "search"}}])
def test_a_forced_tool_call_parses_into_the_declared_arguments(client, choice):
    tools = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER, SEARCH)}
    for topic in random.sample(TOPICS, 3):
        r = client.chat.completions.create(model="hybrid-mini", messages=[{"role": "user", "content": f"Weather for {topic}?"}],
                                           tools=[WEATHER, SEARCH], tool_choice=choice, max_tokens=256, temperature=0)
        c = r.choices[0]
        assert c.finish_reason == "tool_calls" and not c.message.content and len(c.message.tool_calls) == 1, c
        fn = c.message.tool_calls[0].function
        assert fn.name == "search" if isinstance(choice, dict) else fn.name in tools
        jsonschema.validate(json.loads(fn.arguments), tools[fn.name])


def test_streamed_deltas_reassemble_to_the_same_response(client):
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}
    kw = dict(model="hybrid-mini", messages=[{"role": "user", "content": "Describe a baker."}], max_tokens=320,
              temperature=0)
    whole = client.chat.completions.create(response_format=fmt, **kw).choices[0]
    text = "".join(ch.choices[0].delta.content or "" for ch in client.chat.completions.create(
        response_format=fmt, stream=True, **kw) if ch.choices)
    assert text == whole.message.content
    whole = client.chat.completions.create(tools=[WEATHER], tool_choice="required", **kw).choices[0]
    args, name, finish = "", None, None
    for ch in client.chat.completions.create(tools=[WEATHER], tool_choice="required", stream=True, **kw):
        if not ch.choices:
            continue
        for d in ch.choices[0].delta.tool_calls or ():
            name = d.function.name or name
            args += d.function.arguments or ""
        finish = ch.choices[0].finish_reason or finish
    assert (name, args, finish) == (whole.message.tool_calls[0].function.name,
                                    whole.message.tool_calls[0].function.arguments, "tool_calls")


def test_a_schema_that_cannot_be_enforced_is_a_400(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="hybrid-mini", messages=[{"role": "user", "content": "hi"}],
                                       response_format={"type": "json_schema",
                                                        "json_schema": {"name": "x", "schema": {"type": "nope"}}})
    assert e.value.body["param"] == "response_format.json_schema.schema"


def test_the_ai_sdk_tool_loop_and_generate_object(server):
    """tests/js/ai_sdk_check.mjs: streamText whose tool executes, the loop continuing to an answer, and
    generateObject with a zod schema (installed by `make test`: npm ci in tests/js)."""
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed: the AI SDK test needs Node.js >= 18")
    if not (JS / "node_modules" / "ai").is_dir():
        pytest.skip("tests/js/node_modules is missing: run `npm ci` in tests/js (make test does)")
    run = subprocess.run([node, "ai_sdk_check.mjs", server.url + "/v1", "hybrid-mini"], cwd=JS,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert out["steps"] == 2 and out["executed"] == [out["toolCall"]] and len(out["objects"]) == 3


def test_a_two_stage_ray_pipeline_masks_as_the_oracle(ray_local, preset_cache):
    """The grammar state lives on the last of two Ray stage actors (byte tokenizer of the tiny preset),
    with chunked prefill, MTP k=3 and batching: greedy tokens equal the oracle's with MTP off."""
    engine = AsyncEngine(EngineConfig(model="tiny", use_ray=True, pipeline_parallel_size=2, num_speculative_tokens=3,
                                      speculative_policy="fixed", max_model_len=160, max_num_batched_tokens=24))
    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 99},
                                               "ok": {"type": "boolean"}}, "required": ["n", "ok"],
              "additionalProperties": False}
    bodies = [{"guided_json": schema}, {"guided_regex": "[ab]{1,6}c"}, {"guided_choice": ["yes", "no"]}] * 2
    rng = random.Random()
    prompts = [[rng.randrange(3, 250) for _ in range(rng.randrange(3, 50))] for _ in bodies]
    params = [SamplingParams(max_tokens=40, stop_token_ids=(2,), grammar=parse_body(CompletionRequest, {
        "prompt": "x", **b}).grammar()) for b in bodies]

    async def scenario():
        await engine.start()
        try:
            return await asyncio.gather(*[collect(engine, f"g{i}", p, c, 3) for i, (p, c) in enumerate(zip(prompts, params))])
        finally:
            await engine.shutdown()

    for (tokens, reason), prompt, p in zip(asyncio.run(scenario()), prompts, params):
        assert reason == "stop" and tokens == oracle(engine.folder, prompt, p), prompt
