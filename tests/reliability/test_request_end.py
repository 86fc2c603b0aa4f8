"""However a request ends early, the engine stops working on it: proven by the engine's own counters.

Against `hybridserve serve` (the Ray Serve path users run), on one process per replica and on
`-pp 2 -ep 2`: streams dropped after 3 chunks, a request ended by a stop string and a gRPC call
cancelled mid-way all leave nothing running, waiting or allocated within a few seconds, and the
engine counts them as aborted while they still had most of their tokens to go (so the test cannot
pass by the requests simply finishing).
"""
from __future__ import annotations

import concurrent.futures

import httpx
import pytest

from router.grpc_client import Client
from benchmarks.served import ServedCluster

pytestmark = pytest.mark.integration

MAX_TOKENS = 1500          # far more than the test's few seconds can generate
SETUPS = {
    "pp1": ("--max-num-seqs", "16"),
    "pp2-ep2-mtp": ("-pp", "2", "-ep", "2", "--num-speculative-tokens", "2", "--max-num-seqs", "16"),
}


@pytest.fixture(scope="module", params=list(SETUPS))
def served(request, preset_cache):
    with ServedCluster("--max-model-len", "2048", *SETUPS[request.param]) as s:
        yield s


def drop_after_chunks(url: str, n_chunks: int, prompt: str) -> int:
    body = {"model": "hybrid-mini", "prompt": prompt, "max_tokens": MAX_TOKENS, "ignore_eos": True, "stream": True,
            "temperature": 0}
    got = 0
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=120) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if line.startswith("data: {"):
                got += 1
                if got == n_chunks:
                    break                    # leaving the block closes the connection mid-stream
    return got


def test_dropped_streams_and_stop_strings_free_everything(served):
    before = served.metrics()
    prompts = [f"def function_{i}(x):" for i in range(12)]
    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        assert list(pool.map(lambda p: drop_after_chunks(served.url, 3, p), prompts)) == [3] * 12
    # A request that ends on a stop string: the first character it generates.
    r = httpx.post(served.url + "/v1/completions", timeout=120, json={
        "model": "hybrid-mini", "prompt": "def fibonacci(n):", "max_tokens": MAX_TOKENS, "ignore_eos": True,
        "temperature": 0, "stop": [" ", "\n", "(", ":"], "min_tokens": 0})
    assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] == "stop", r.text
    after = served.wait_aborted_and_idle(before, 13, timeout_s=5)
    aborted = after["engine_requests_aborted_total"] - before.get("engine_requests_aborted_total", 0)
    tokens = after.get("engine_generation_tokens_total", 0) - before.get("engine_generation_tokens_total", 0)
    assert aborted == 13, (aborted, after)
    assert tokens < 13 * MAX_TOKENS / 4, f"the engine generated {tokens} tokens for 13 requests it should have cut"


def test_cancelled_grpc_call_is_aborted(served):
    before = served.metrics()
    with Client(f"127.0.0.1:{served.grpc_port}") as c:
        stream = c.generate("go", max_tokens=MAX_TOKENS, ignore_eos=True)
        next(stream)
        next(stream)
        stream.cancel()
    after = served.wait_aborted_and_idle(before, 1, timeout_s=5)
    assert after["engine_requests_aborted_total"] == before.get("engine_requests_aborted_total", 0) + 1


def test_non_streaming_client_that_gives_up_is_aborted(served):
    before = served.metrics()
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(served.url + "/v1/completions", json={"prompt": "go", "max_tokens": MAX_TOKENS, "ignore_eos": True},
                   timeout=httpx.Timeout(30, read=1.0))
    after = served.wait_aborted_and_idle(before, 1, timeout_s=5)
    assert after["engine_requests_aborted_total"] == before.get("engine_requests_aborted_total", 0) + 1


def test_grpc_deadline_that_passes_is_aborted(served):
    import grpc

    before = served.metrics()
    with Client(f"127.0.0.1:{served.grpc_port}", timeout=1.0) as c:
        with pytest.raises(grpc.RpcError) as err:
            for _ in c.generate("go", max_tokens=MAX_TOKENS, ignore_eos=True):
                pass
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    after = served.wait_aborted_and_idle(before, 1, timeout_s=5)
    assert after["engine_requests_aborted_total"] == before.get("engine_requests_aborted_total", 0) + 1


def test_n3_stream_dropped_and_n3_stop_strings_abort_every_choice(served):
    """n > 1 (router/fork.py): one request, three sequences sharing a prefill. A client gone after every choice
    streamed, and three greedy choices that all end on a stop string, leave nothing running, waiting or
    allocated (refcounted prompt blocks included), each counted as one aborted request with most of its
    tokens to go."""
    import json

    before = served.metrics()
    body = {"model": "hybrid-mini", "prompt": "def shared_prefill(x):", "max_tokens": MAX_TOKENS, "ignore_eos": True,
            "stream": True, "temperature": 0, "n": 3}
    seen: dict[int, int] = {}
    with httpx.stream("POST", served.url + "/v1/completions", json=body, timeout=120) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if line.startswith("data: {"):
                (choice,) = json.loads(line[6:])["choices"]
                seen[choice["index"]] = seen.get(choice["index"], 0) + 1
                if len(seen) == 3 and min(seen.values()) >= 2:
                    break                    # every choice is running: the client leaves
    r = httpx.post(served.url + "/v1/completions", timeout=120, json={
        "model": "hybrid-mini", "prompt": "def fibonacci(n):", "max_tokens": MAX_TOKENS, "ignore_eos": True,
        "temperature": 0, "n": 3, "stop": [" ", "\n", "(", ":"], "min_tokens": 0})
    assert r.status_code == 200 and [c["finish_reason"] for c in r.json()["choices"]] == ["stop"] * 3, r.text
    after = served.wait_aborted_and_idle(before, 2, timeout_s=5)
    aborted = after["engine_requests_aborted_total"] - before.get("engine_requests_aborted_total", 0)
    tokens = after.get("engine_generation_tokens_total", 0) - before.get("engine_generation_tokens_total", 0)
    assert aborted == 2, (aborted, after)
    assert tokens < 2 * 3 * MAX_TOKENS / 4, f"the engine generated {tokens} tokens for 6 choices it should have cut"
