"""Every request value is range-checked at the front door and again by SamplingParams.validate() at the
engine: a value no plan can carry (msgpack) or no sampler can use is a 400 for that request alone, with
the field in `param` and the limit in the message, never a failed pass for every request in flight.

Also the failures the HTTP fuzzer (tests/integration/test_fuzz_http.py) and its review found, kept here
as regular tests.
"""
from __future__ import annotations

import asyncio
import json

import msgpack
import pytest
import torch
from fastapi.testclient import TestClient

from kernels.reference.sampling import probs_from_logits
from model_shards import speculative
from model_shards.generate import generate
from model_shards.model import HybridModel
from model_shards.presets import get_preset
from model_shards.sampling_params import SEED_MAX, SEED_MIN, SamplingParams
from router.api_schemas import ChatCompletionRequest, CompletionRequest, parse_body
from router.backend import admit
from cluster.contracts import SeqStep, StepPlan, decode_plan, encode
from router.engine import AsyncEngine
from router.engine_config import EngineConfig
from router.errors import InvalidRequest
from router.frontend import Frontend, ModelInfo
from router.grpc_client import build_request
from router.grpc_server import parse_request
from router.http_app import build_app
from router.openapi import build_openapi
from router.tokenizer import ByteTokenizer

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}

# (field, value, what the message must say): the poison requests, and their neighbours.
POISON = [
    ("seed", 2**70, "seed: must be in [-2**63, 2**63-1], got 1180591620717411303424"),
    ("seed", -2**70, "seed: must be in [-2**63, 2**63-1]"),
    ("seed", 2**63, "seed: must be in [-2**63, 2**63-1]"),               # OpenAI's seed: a signed int64
    ("max_tokens", 2**63, "max_tokens: must be in [1, 2**31-1], got 9223372036854775808"),
    ("max_completion_tokens", 2**40, "max_completion_tokens: must be in [1, 2**31-1]"),
    ("top_k", 2**40, "top_k: must be in [-1, 2**31-1]"),
    ("top_k", -2, "top_k: must be in [-1, 2**31-1]"),
    ("min_tokens", 2**40, "min_tokens: must be in [0, 2**31-1]"),
    ("stop_token_ids", [5, 2**40], "stop_token_ids[1]: must be a token id in [0, 2**31-1]"),
    ("stop_token_ids", [-1], "stop_token_ids[0]: must be a token id in [0, 2**31-1]"),
    ("temperature", 1e308, "temperature: must be a finite number in [0, 2], got 1e+308"),
    ("temperature", float("nan"), "temperature: must be a finite number in [0, 2], got nan"),
    ("top_p", float("inf"), "top_p: must be a finite number in [0, 1], got inf"),
    ("top_p", -5e-324, "top_p: must be a finite number in [0, 1]"),
    ("stop_token_ids", list(range(1025)), "stop_token_ids: List should have at most 1024 items"),
    ("stop", ["x"] * 5, "stop: at most 4 stop sequences, as in OpenAI's API (got 5)"),
    ("stop", "x" * 1025, "stop: String should have at most 1024 characters"),
    ("seed", True, "seed: Input should be a valid integer"),       # strict types: no silent bool -> 1
    ("max_tokens", "5", "max_tokens: Input should be a valid integer"),
]


@pytest.fixture(scope="module")
def engine(preset_cache) -> AsyncEngine:
    return AsyncEngine(EngineConfig(model="tiny", max_model_len=64))


def frontend(vocab_size: int = 300) -> Frontend:
    info = ModelInfo(name="m", max_model_len=64, vocab_size=vocab_size, eos_token_ids=[2])
    return Frontend(backend=None, tokenizer=ByteTokenizer(300), info=info)


def param_of(message: str) -> str:
    return message.split(":", 1)[0]


@pytest.mark.parametrize("field, value, says", POISON, ids=[f"{f}={v!r:.20}" for f, v, _ in POISON])
def test_poison_values_are_400s_naming_the_field_and_the_limit(field, value, says):
    fe = frontend()
    prepare = [lambda: fe.prepare_chat(parse_body(ChatCompletionRequest, {**CHAT, field: value}))]
    if field != "max_completion_tokens":                                   # chat only
        prepare.append(lambda: fe.prepare_completion(parse_body(CompletionRequest, {"prompt": "hi", field: value})))
    for run in prepare:
        with pytest.raises(InvalidRequest) as e:
            run()
        assert e.value.status == 400 and e.value.message.startswith(says), e.value.message
        assert e.value.param == param_of(says)


def test_a_subnormal_top_p_has_a_meaning_and_gets_a_normal_answer():
    """5e-324 is 0 in float32: found by the fuzzer, top-p filtering then dropped every token and
    torch.multinomial failed the engine's pass (500). The top token now always stays: near-greedy."""
    prep = frontend().prepare_chat(parse_body(ChatCompletionRequest, {**CHAT, "top_p": 5e-324, "temperature": 1}))
    assert prep.params.top_p == 5e-324
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))
    p = probs_from_logits(logits, 1.0, 0, 5e-324)
    assert torch.equal(p, torch.nn.functional.one_hot(logits.argmax(-1), 50).float())


def test_top_p_0_is_accepted_as_openai_does_and_keeps_only_the_top_token():
    """OpenAI accepts top_p 0 (the old (0, 1] refused it); the sampler gets the smallest positive top_p,
    which keeps the top token alone (the tests around this one)."""
    for body in ({**CHAT, "top_p": 0}, {**CHAT, "top_p": 0.0, "temperature": 1}):
        assert frontend().prepare_chat(parse_body(ChatCompletionRequest, body)).params.top_p == 5e-324


def test_a_subnormal_top_p_samples_the_greedy_tokens_with_and_without_mtp():
    model = HybridModel(get_preset("tiny")).init_random(0).eval()
    prompt = [5, 9, 40, 33, 17]
    greedy = generate(model, prompt, SamplingParams(max_tokens=8, ignore_eos=True)).tokens
    for k in (0, 2):
        params = SamplingParams(temperature=1.0, top_p=5e-324, seed=3, max_tokens=8, ignore_eos=True)
        assert generate(model, prompt, params, num_drafts=k).tokens == greedy


@pytest.mark.parametrize("kw, field", [
    ({"seed": 2**70}, "seed"), ({"seed": -2**63 - 1}, "seed"), ({"seed": 1.5}, "seed"),
    ({"max_tokens": 2**63}, "max_tokens"), ({"top_k": 2**40}, "top_k"), ({"top_k": -1}, "top_k"),
    ({"stop_token_ids": (2**40,)}, "stop_token_ids"), ({"stop_token_ids": (-3,)}, "stop_token_ids"),
    ({"stop_token_ids": tuple(range(1025))}, "stop_token_ids"), ({"temperature": 1e308}, "temperature"),
    ({"temperature": float("nan")}, "temperature"), ({"top_p": float("nan")}, "top_p"),
    ({"min_tokens": 17}, "min_tokens"), ({"ignore_eos": 1}, "ignore_eos"),
])
def test_the_engine_refuses_what_a_front_door_forgot(engine, kw, field):
    """SamplingParams.validate() at engine.add_request: the backend turns it into a 400 for that request."""
    with pytest.raises(InvalidRequest) as e:
        admit(engine, f"r-{field}", [5, 6], SamplingParams(**kw))
    assert e.value.param == field and e.value.message.startswith(field + ":"), e.value.message
    assert not engine.scheduler.waiting


def test_seeds_at_the_limits_travel_in_a_plan_and_sample(preset_cache):
    """[-2**63, 2**64-1] is what msgpack carries (plans between pipeline stages: 2**70 raised
    OverflowError there and failed every request in flight) and what torch.Generator.manual_seed takes."""
    for seed in (SEED_MIN, SEED_MAX, -1, 0):
        params = SamplingParams(temperature=1.0, seed=seed, max_tokens=4)
        params.validate()
        plan = StepPlan(1, 0, [SeqStep(1, [5], 0, 0, [0], params=params.to_dict(), seed=seed)])
        back = decode_plan(encode(plan)).seqs[0]
        assert back.seed == seed and SamplingParams.from_dict(back.params) == params
        speculative.step_generator(seed, 10**6, stream=3)
        torch.Generator().manual_seed(seed)
    with pytest.raises(OverflowError):
        msgpack.packb(SEED_MAX + 1)
    model = HybridModel(get_preset("tiny")).init_random(0).eval()
    for seed in (SEED_MIN, SEED_MAX):
        assert len(generate(model, [5, 6, 7], SamplingParams(temperature=1.0, seed=seed, max_tokens=3,
                                                              ignore_eos=True), num_drafts=2).tokens) == 3


@pytest.mark.parametrize("kw, says", [
    ({"seed": 2**63 - 1}, None),                                          # int64: fits
    ({"min_tokens": 2**32 - 1}, "min_tokens: must be in [0, 2**31-1]"),
    ({"top_k": -2**31}, "top_k: must be in [-1, 2**31-1]"),
    ({"temperature": float("nan")}, "temperature: must be a finite number in [0, 2]"),
    ({"top_p": 1.5}, "top_p: must be a finite number in [0, 1]"),
    ({"stop_token_ids": [2**32 - 1]}, "stop_token_ids[0]: must be a token id in [0, 2**31-1]"),
    ({"stop": ["x"] * 5}, "stop: at most 4 stop sequences"),
])
def test_grpc_requests_go_through_the_same_validation(kw, says):
    req = build_request("hello", max_tokens=4, **kw)
    if says is None:
        kind, body = parse_request(req)
        assert kind == "completion" and body.seed == kw["seed"]
        return
    with pytest.raises(InvalidRequest) as e:
        parse_request(req)
    assert e.value.message.startswith(says) and e.value.param == param_of(says), e.value.message


def test_grpc_without_input_is_a_400():
    with pytest.raises(InvalidRequest) as e:
        parse_request(build_request(None))
    assert e.value.param == "input"


# ---- the HTTP app (no engine: every request here is refused before one is needed) --------------------

@pytest.fixture(scope="module")
def http():
    return TestClient(build_app(frontend()), raise_server_exceptions=False)


@pytest.mark.parametrize("raw, field", [
    ('{"prompt": "a", "temperature": NaN}', "temperature"),              # Python's json accepts these
    ('{"prompt": "a", "top_p": Infinity}', "top_p"),
    ('{"prompt": "a", "seed": -Infinity}', "seed"),
    ('{"prompt": "\\ud800"}', "prompt"),                                  # a lone surrogate: UTF-8 cannot
    ('{"messages": [{"role": "user", "content": [{"type": "text", "text": "a\\udfff"}]}]}',
     "messages[0].content[0].text"),
    ('{"prompt": [[[[[[[[1]]]]]]]]}', "prompt[0][0]"),
    ('{"prompt": "a", "n": 100000000000000000000000}', "n"),
    ('{"prompt": [5, 1099511627776]}', "prompt[1]"),
    ('{"prompt": [-1]}', "prompt[0]"),
])
def test_http_poison_bodies_are_400s(http, raw, field):
    r = http.post("/v1/completions" if "prompt" in raw else "/v1/chat/completions", content=raw,
                  headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == field and err["message"].startswith(field + ":"), err


@pytest.mark.parametrize("raw", ['{"prompt": "a", "seed": ' + "9" * 5000 + "}",      # > 4300 digits
                                 '{"prompt": ' + "[" * 100_000 + "]" * 100_000 + "}"],  # nested past recursion
                         ids=["5000-digit-int", "nesting-100k"])
def test_http_bodies_python_json_cannot_decode_are_400s(http, raw):
    r = http.post("/v1/completions", content=raw, headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "body", r.text


def test_the_published_schema_carries_the_limits(http):
    doc = http.get("/openapi.json").json()
    assert doc == json.loads(json.dumps(build_openapi("hybridserve", "0.1.0", secured=False)))
    props = doc["components"]["schemas"]["CompletionRequest"]["properties"]
    seed = next(s for s in props["seed"]["anyOf"] if s.get("type") == "integer")
    assert (seed["minimum"], seed["maximum"]) == (-2**63, 2**63 - 1)             # OpenAI's: int64
    body = doc["paths"]["/v1/completions"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert body == {"$ref": "#/components/schemas/CompletionRequest"}


def test_every_400_names_its_field(http):
    """A sweep of single bad fields: param is set and the message starts with it."""
    for field, value, _ in POISON:
        r = http.post("/v1/chat/completions", content=json.dumps({**CHAT, field: value}),   # NaN as JSON's NaN
                      headers={"content-type": "application/json"})
        err = r.json()["error"]
        assert r.status_code == 400 and err["param"] and err["message"].startswith(err["param"] + ":"), err


def test_an_admitted_request_after_refusals_still_runs(engine):
    """The refusals above left nothing behind: the same engine serves a normal request."""

    async def run():
        await engine.start()
        try:
            out = []
            async for o in engine.generate("ok", [5, 6, 7], SamplingParams(max_tokens=3, ignore_eos=True)):
                out += o.new_token_ids
            return out
        finally:
            await engine.shutdown()

    assert len(asyncio.run(run())) == 3
