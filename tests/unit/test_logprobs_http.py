"""`logprobs` / `top_logprobs` (chat), `logprobs` and `echo` (completions) through the HTTP front door with the
official `openai` SDK, stream and non-stream, on the shipped default model with MTP (fixed k=3, so drafts are
verified every step): greedy tokens equal MTP-off decoding (the oracle), the values equal the raw
distribution computed from the model's logits (tests/unit/test_logprobs.py's teacher-forced reference), the
top-5 plus the rest of the vocabulary sum to 1, and bad values are a 400 naming the field.
"""
from __future__ import annotations

import json
import math

import openai
import pytest

from model_shards.generate import generate
from model_shards.sampling_params import SamplingParams
from router.engine_config import EngineConfig
from tests.frontdoor_helpers import LocalServer
from tests.unit.test_logprobs import ATOL, FOLDER, teacher_forced

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
MAX_TOKENS = 12
CODE = "def read_lines(path):\n    with open(path) as f:\n"


@pytest.fixture(scope="module")
def server():
    cfg = EngineConfig(model=str(FOLDER), num_speculative_tokens=3, speculative_policy="fixed", max_model_len=512,
                       dtype="float32")
    with LocalServer(cfg, served_model_name="hybrid-mini", grpc=False, max_body_bytes=1 << 20) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def model_of(server):
    return server.engine.executor.worker.model


def check_item(item: dict, ref_row, token_id: int, tok):
    """One chat logprob item against the reference row: value, text, bytes, the top 5 and the sum to 1."""
    text = tok.decode([token_id], skip_special_tokens=False)
    assert item["token"] == text and item["bytes"] == list(text.encode())
    assert item["logprob"] == pytest.approx(ref_row[token_id].item(), abs=ATOL)
    top = item["top_logprobs"]
    assert len(top) == 5
    ref_top, ref_ids = ref_row.topk(5)
    assert [t["logprob"] for t in top] == pytest.approx(ref_top.tolist(), abs=ATOL)
    # the same 5 tokens (near-ties may be ordered either way by two float32 computations)
    assert sorted(t["token"] for t in top) == sorted(tok.decode([i], skip_special_tokens=False) for i in ref_ids.tolist())
    rest = ref_row.exp().sum().item() - ref_top.exp().sum().item()       # the vocabulary beyond the top 5
    assert sum(math.exp(t["logprob"]) for t in top) + rest == pytest.approx(1.0, abs=1e-3)


def greedy_oracle(server, prompt_ids):
    return generate(model_of(server), prompt_ids, SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True)).tokens


@pytest.mark.parametrize("stream", [False, True], ids=["non-stream", "stream"])
def test_chat_top_logprobs_equal_the_reference_and_mtp_changes_nothing(server, client, stream):
    msgs = [{"role": "user", "content": "Write a function that reads a file."}]
    kw = dict(model="hybrid-mini", messages=msgs, max_tokens=MAX_TOKENS, temperature=0, logprobs=True,
              top_logprobs=5, extra_body={"ignore_eos": True, "return_token_ids": True})
    if stream:
        chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
        items = [i for c in chunks if c.choices and c.choices[0].logprobs
                 for i in c.choices[0].logprobs.model_dump()["content"]]
        ids = [t for c in chunks if c.choices for t in (c.choices[0].model_extra or {}).get("token_ids") or []]
        usage = chunks[-1].usage
        assert all(c.choices[0].logprobs is None for c in chunks if c.choices and not
                   (c.choices[0].model_extra or {}).get("token_ids"))     # the role chunk carries none
    else:
        r = client.chat.completions.create(**kw)
        items, ids, usage = r.choices[0].logprobs.model_dump()["content"], r.choices[0].model_extra["token_ids"], r.usage
    prompt = server.fe.tokenizer.encode_chat(msgs)
    assert ids == greedy_oracle(server, prompt)                        # identical to MTP off
    assert usage.completion_tokens_details.accepted_prediction_tokens > 0   # and MTP did accept drafts
    ref = teacher_forced(model_of(server), prompt + ids)[len(prompt) - 1:-1]
    assert len(items) == len(ids) == MAX_TOKENS
    for item, row, t in zip(items, ref, ids):
        check_item(item, row, t, server.fe.tokenizer)
        assert item["token"] == item["top_logprobs"][0]["token"]       # greedy: the chosen one is the best


@pytest.mark.parametrize("stream", [False, True], ids=["non-stream", "stream"])
def test_completions_echo_with_logprobs_puts_the_prompt_first(server, client, stream):
    tok = server.fe.tokenizer
    kw = dict(model="hybrid-mini", prompt=CODE, max_tokens=MAX_TOKENS, temperature=0, echo=True, logprobs=3,
              extra_body={"ignore_eos": True})
    if stream:
        chunks = list(client.completions.create(stream=True, **kw))
        text = "".join(c.choices[0].text for c in chunks)
        parts = [c.choices[0].logprobs for c in chunks if c.choices[0].logprobs is not None]
        lp = {k: [v for p in parts for v in getattr(p, k)] for k in ("tokens", "token_logprobs", "top_logprobs",
                                                                      "text_offset")}
        assert chunks[0].choices[0].text == CODE                      # the echo comes first, on its own
    else:
        r = client.completions.create(**kw)
        text, lp = r.choices[0].text, r.choices[0].logprobs.model_dump()
    prompt = tok.encode(CODE)
    out = greedy_oracle(server, prompt)
    assert text == CODE + tok.decode(out)
    ids = prompt + out
    ref = teacher_forced(model_of(server), ids)
    assert lp["tokens"] == [tok.decode([t], skip_special_tokens=False) for t in ids]
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert lp["token_logprobs"][1:] == pytest.approx([ref[p, t].item() for p, t in enumerate(ids[1:])], abs=ATOL)
    for p, top in enumerate(lp["top_logprobs"][1:]):
        best = ref[p].topk(3)
        want = {tok.decode([i], skip_special_tokens=False): v for i, v in zip(best.indices.tolist(), best.values.tolist())}
        assert top.keys() >= want.keys() and len(top) <= 4          # the 3 best, plus the chosen if not among them
        assert [top[k] for k in want] == pytest.approx(list(want.values()), abs=ATOL)
    assert lp["text_offset"] == [sum(len(t) for t in lp["tokens"][:i]) for i in range(len(ids))]


@pytest.mark.parametrize("stream", [False, True], ids=["non-stream", "stream"])
def test_echo_without_logprobs_and_logprobs_without_echo(server, client, stream):
    tok = server.fe.tokenizer
    prompt = tok.encode(CODE)
    out = greedy_oracle(server, prompt)

    def run(**kw):
        kw = dict(model="hybrid-mini", prompt=CODE, max_tokens=MAX_TOKENS, temperature=0,
                  extra_body={"ignore_eos": True}, **kw)
        if not stream:
            c = client.completions.create(**kw).choices[0]
            return c.text, c.logprobs and c.logprobs.model_dump()
        chunks = list(client.completions.create(stream=True, **kw))
        parts = [c.choices[0].logprobs.model_dump() for c in chunks if c.choices[0].logprobs is not None]
        return "".join(c.choices[0].text for c in chunks), parts and {k: [v for p in parts for v in p[k]]
                                                                      for k in parts[0]}
    text, lp = run(echo=True)
    assert text == CODE + tok.decode(out) and not lp
    text, lp = run(logprobs=0)
    assert text == tok.decode(out) and len(lp["tokens"]) == MAX_TOKENS
    assert [len(t) for t in lp["top_logprobs"]] == [1] * MAX_TOKENS      # logprobs=0: only the chosen token
    assert lp["text_offset"][0] == 0


@pytest.mark.parametrize("kind,body,param", [
    ("chat", {"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ("chat", {"logprobs": True, "top_logprobs": -1}, "top_logprobs"),
    ("chat", {"top_logprobs": 2}, "top_logprobs"),                      # needs logprobs: true
    ("chat", {"logprobs": 3}, "logprobs"),                              # chat's is a boolean
    ("completion", {"logprobs": 21}, "logprobs"),
    ("completion", {"logprobs": -1}, "logprobs"),
    ("completion", {"logprobs": True}, "logprobs"),
])
def test_out_of_range_values_are_a_400_naming_the_field(server, kind, body, param):
    import httpx
    path, base = ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}) if kind == "chat" \
        else ("/v1/completions", {"prompt": "hi"})
    r = httpx.post(server.url + path, json={**base, **body, "max_tokens": 2}, timeout=30)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["message"].startswith(param), err
    if "top_logprobs" in body and body.get("logprobs"):
        assert "[0, 20]" in err["message"]


def test_requests_without_logprobs_get_null(server, client):
    r = client.chat.completions.create(model="hybrid-mini", messages=[{"role": "user", "content": "hi"}], max_tokens=3)
    assert r.choices[0].logprobs is None
    c = client.completions.create(model="hybrid-mini", prompt="hi", max_tokens=3)
    assert c.choices[0].logprobs is None


def test_responses_with_logprobs_conform_to_the_published_schema(server):
    import httpx
    jsonschema = pytest.importorskip("jsonschema")
    doc = httpx.get(server.url + "/openapi.json").json()

    def validate(name, body):
        jsonschema.Draft202012Validator({**doc["components"]["schemas"][name], "components": doc["components"]}
                                        ).validate(body)
    chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "logprobs": True, "top_logprobs": 2}
    comp = {"prompt": "hi", "max_tokens": 4, "logprobs": 2, "echo": True}
    for path, body, name in (("/v1/chat/completions", chat, "ChatCompletion"), ("/v1/completions", comp, "Completion")):
        r = httpx.post(server.url + path, json=body, timeout=60)
        assert r.json()["choices"][0]["logprobs"] is not None
        validate(name, r.json())
        raw = httpx.post(server.url + path, json={**body, "stream": True}, timeout=60).text
        chunks = [json.loads(line[6:]) for line in raw.splitlines() if line.startswith("data: {")]
        assert any(c["choices"][0]["logprobs"] for c in chunks)
        for c in chunks:
            validate(name + "Chunk", c)


class LogprobScriptedBackend:
    """tests/unit/test_chat_parsers_http.py's scripted backend, its tokens with made-up logprob entries."""

    def __init__(self, tokenizer, text: str, chunk: int):
        from tests.unit.test_chat_parsers_http import ScriptedBackend
        self.inner = ScriptedBackend(tokenizer, text, chunk)

    async def submit(self, request_id, prompt_ids, params):
        stream = await self.inner.submit(request_id, prompt_ids, params)
        inner_next = stream._next

        async def next_output():
            out = await inner_next()
            out.logprobs = [[-t / 1000, [t], [-t / 1000]] for t in out.new_token_ids]
            return out
        stream._next = next_output
        return stream

    async def ready(self):
        return True

    async def stats(self):
        return {}


def test_parsed_chat_streams_carry_each_tokens_logprobs_once():
    """Reasoning and tool-call parsing split or hold back text; each token's logprobs still arrive once, in order."""
    from fastapi.testclient import TestClient

    from router.frontend import Frontend, ModelInfo
    from router.http_app import build_app
    from router.tokenizer import load_tokenizer
    from tests.unit.test_chat_parsers_http import MSGS, TOOL_OUTPUT, WEATHER_TOOL

    tok = load_tokenizer(FOLDER)
    text = "Hmm.</think>" + TOOL_OUTPUT
    ids = tok.encode(text, add_special_tokens=False)
    fe = Frontend(LogprobScriptedBackend(tok, text, 3), tok, ModelInfo("m", 4096, tok.vocab_size, eos_token_ids=[2]),
                  reasoning_parser="deepseek_r1", tool_call_parser="qwen3_coder")
    http = TestClient(build_app(fe))
    body = {"messages": MSGS, "tools": [WEATHER_TOOL], "logprobs": True, "top_logprobs": 1}
    want = [tok.decode([t], skip_special_tokens=False) for t in ids]
    whole = http.post("/v1/chat/completions", json=body).json()["choices"][0]
    assert [i["token"] for i in whole["logprobs"]["content"]] == want and whole["message"]["tool_calls"]
    assert [i["logprob"] for i in whole["logprobs"]["content"]] == [-t / 1000 for t in ids]
    raw = http.post("/v1/chat/completions", json={**body, "stream": True}).text
    chunks = [json.loads(line[6:]) for line in raw.splitlines() if line.startswith("data: {")]
    streamed = [i for c in chunks if c["choices"][0]["logprobs"] for i in c["choices"][0]["logprobs"]["content"]]
    assert streamed == whole["logprobs"]["content"]
