"""The gRPC front door offers what the HTTP API does where its messages fit: n choices, logprobs, echo,
penalties and logit_bias, structured outputs. Each answer is checked against the engine's greedy
output or against the HTTP API's answer to the same request on the same server."""
from __future__ import annotations

import json

import grpc
import httpx
import pytest

from router.engine_config import EngineConfig
from router.grpc_client import Client

pytestmark = pytest.mark.integration

PROMPT = "Once upon a time"


@pytest.fixture(scope="module")
def server(preset_cache):
    from tests.frontdoor_helpers import LocalServer

    cfg = EngineConfig(model="tiny", max_model_len=512, max_num_seqs=8, max_queued_requests=8)
    with LocalServer(cfg, served_model_name="tiny") as s:
        yield s


@pytest.fixture()
def grpc_client(server):
    with Client(f"127.0.0.1:{server.grpc_port}") as c:
        yield c


def http_completion(server, **body) -> dict:
    r = httpx.post(server.url + "/v1/completions", json=dict(model="tiny", prompt=PROMPT, **body), timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def test_n_choices_each_equal_the_greedy_output_and_usage_counts_the_prompt_once(server, grpc_client):
    prompt_ids = server.tokenizer.encode(PROMPT)
    want = server.greedy(prompt_ids, 6)
    out = grpc_client.complete(PROMPT, n=3, max_tokens=6, temperature=0.0, ignore_eos=True)
    assert [c.index for c in out.choices] == [0, 1, 2]
    assert [list(c.token_ids) for c in out.choices] == [want] * 3
    assert list(out.token_ids) == want and out.text == out.choices[0].text
    assert (out.usage.prompt_tokens, out.usage.completion_tokens) == (len(prompt_ids), 18)
    server.wait_cache_free()


def test_streamed_choices_carry_their_index_and_reassemble(server, grpc_client):
    want = server.greedy(server.tokenizer.encode(PROMPT), 5)
    got: dict[int, list[int]] = {0: [], 1: []}
    msgs = list(grpc_client.generate(PROMPT, n=2, max_tokens=5, temperature=0.0, ignore_eos=True))
    for m in msgs:
        got[m.index].extend(m.token_ids)
    assert got == {0: want, 1: want}
    assert sum(bool(m.finish_reason) for m in msgs) == 2
    assert [m.HasField("usage") for m in msgs] == [False] * (len(msgs) - 1) + [True]
    assert msgs[-1].usage.completion_tokens == 10


def test_logprobs_equal_the_http_apis_for_the_same_request(server, grpc_client):
    out = grpc_client.complete(PROMPT, max_tokens=5, temperature=0.0, ignore_eos=True, logprobs=3)
    body = http_completion(server, max_tokens=5, temperature=0.0, ignore_eos=True, logprobs=3)
    ref = body["choices"][0]["logprobs"]
    assert [t.token_id for t in out.choices[0].logprobs] == list(out.token_ids)
    assert [t.logprob for t in out.choices[0].logprobs] == pytest.approx(ref["token_logprobs"], abs=1e-5)
    for t, top in zip(out.choices[0].logprobs, ref["top_logprobs"]):
        assert len(t.top_logprobs) == 3
        assert t.top_logprobs[0].token_id == t.token_id                     # greedy: the chosen token is the top one
        assert {x.token: x.logprob for x in t.top_logprobs} == pytest.approx(
            {k: v for k, v in top.items() if k in {x.token for x in t.top_logprobs}}, abs=1e-5)


def test_echo_puts_the_prompt_first_with_its_logprobs(server, grpc_client):
    prompt_ids = server.tokenizer.encode(PROMPT)
    out = grpc_client.complete(PROMPT, max_tokens=3, temperature=0.0, ignore_eos=True, echo=True, logprobs=0)
    c = out.choices[0]
    assert c.text.startswith(PROMPT)
    assert list(c.token_ids[:len(prompt_ids)]) == prompt_ids
    assert len(c.logprobs) == len(prompt_ids) - 1 + 3           # the prompt's first token has none
    streamed = list(grpc_client.generate(PROMPT, max_tokens=3, temperature=0.0, ignore_eos=True, echo=True))
    assert streamed[0].text == PROMPT and list(streamed[0].token_ids) == prompt_ids


def test_penalties_and_logit_bias_equal_the_http_apis_output(server, grpc_client):
    kw = dict(max_tokens=8, temperature=0.0, ignore_eos=True, presence_penalty=1.5, frequency_penalty=0.5,
              repetition_penalty=1.3)
    out = grpc_client.complete(PROMPT, **kw)
    assert out.text == http_completion(server, **kw)["choices"][0]["text"]
    forced = grpc_client.complete(PROMPT, max_tokens=4, temperature=0.0, ignore_eos=True, logit_bias={42: 100.0})
    assert list(forced.token_ids) == [42] * 4


def test_guided_choice_and_json_schema(server, grpc_client):
    out = grpc_client.complete(PROMPT, max_tokens=20, temperature=0.0, choice=["alpha", "beta"])
    assert out.text in ("alpha", "beta")
    schema = {"type": "object", "properties": {"a": {"type": "boolean"}}, "required": ["a"],
              "additionalProperties": False}
    out = grpc_client.complete(messages=[{"role": "user", "content": "json please"}], max_tokens=40,
                               temperature=0.0, json_schema=json.dumps(schema))
    assert isinstance(json.loads(out.text)["a"], bool)


@pytest.mark.parametrize("kw, field", [
    (dict(prompt=PROMPT, logprobs=21), "logprobs"),
    (dict(messages=[{"role": "user", "content": "x"}], echo=True), "echo"),
    (dict(prompt=PROMPT, regex="a+", choice=["a"]), "guided_"),
    (dict(prompt=PROMPT, n=0), "n"),
])
def test_bad_values_are_invalid_argument_naming_the_field(grpc_client, kw, field):
    prompt = kw.pop("prompt", None)
    with pytest.raises(grpc.RpcError) as e:
        grpc_client.complete(prompt, max_tokens=2, **kw)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in e.value.details()


def test_cancelling_a_stream_of_several_choices_frees_every_one(server, grpc_client):
    aborted = server.stats().requests_aborted
    stream = grpc_client.generate(PROMPT, n=3, max_tokens=400, ignore_eos=True)
    next(stream)
    assert server.stats().running == 3                  # the three choices, each with tokens to go
    stream.cancel()
    s = server.wait_cache_free()
    assert s.kv_blocks_used == 0 and s.mamba_slots_used == 0 and s.running == 0
    assert s.requests_aborted > aborted
