"""A served cluster under pressure and chaos: `-pp 2 -ep 2`, MTP on, a KV cache of 40 blocks (so
sequences are preempted), a small queue. What real clients do must not leak, deadlock, or let one bad
request hurt its neighbours; a killed stage actor costs its requests, not the server.
"""
from __future__ import annotations

import concurrent.futures
import os
import signal
import threading
import time

import httpx
import pytest

from benchmarks.chaos import MODEL, POISON, Mix, full_body, read_stream, references
from benchmarks.served import ServedCluster

pytestmark = pytest.mark.integration

PRESSURE = ("-pp", "2", "-ep", "2", "--num-speculative-tokens", "2", "--num-gpu-blocks-override", "40",
            "--max-num-seqs", "8", "--max-queued-requests", "16")
LENGTHS = [16, 48, 96]
CHAOS_SECONDS = float(os.environ.get("HYBRIDSERVE_CHAOS_SECONDS", "60"))


@pytest.fixture(scope="module")
def served(preset_cache):
    with ServedCluster(*PRESSURE) as s:
        yield s


@pytest.fixture(scope="module")
def refs(served):
    return references(served.url, LENGTHS)


def test_tight_cache_admits_no_more_context_than_it_holds(served):
    r = httpx.get(served.url + "/v1/models", timeout=10).json()
    assert r["data"][0]["max_model_len"] == 40 * 16 - 2 + 1      # 40 blocks of 16, 2 draft positions
    r = httpx.post(served.url + "/v1/completions", json=full_body(0, 1000), timeout=30)
    assert r.status_code == 400 and "maximum context length is 639" in r.json()["error"]["message"]


def read_stream_retrying_429(url: str, body: dict) -> tuple[int, str, str]:
    """A client that honours "queue is full; retry later": 24 greedy requests plus the poison ones that
    pass validation can exceed the 8 running + 16 queued this server holds."""
    for _ in range(200):
        status, text, err = read_stream(url, body)
        if status != 429:
            return status, text, err
        assert "queue_full" in err, err
        time.sleep(0.05)
    return status, text, err


def post_retrying_429(url: str, body: dict) -> httpx.Response:
    """The same client for the poison requests: one that passes validation (a subnormal top_p, say) is a
    request like any other and may meet a full queue, which is not the refusal checked here."""
    for _ in range(200):
        resp = httpx.post(url + "/v1/completions", json=body, timeout=300)
        if resp.status_code != 429:
            return resp
        assert resp.json()["error"]["code"] == "queue_full", resp.text
        time.sleep(0.05)
    return resp


def test_concurrent_greedy_text_equals_alone_while_poison_is_refused(served, refs):
    """24 greedy completions at once under preemption, poison requests among them."""
    with concurrent.futures.ThreadPoolExecutor(24 + len(POISON)) as pool:
        good = {key: pool.submit(read_stream_retrying_429, served.url, full_body(*key)) for key in refs}
        bad = [pool.submit(post_retrying_429, served.url, {**full_body(i, 8), **p}) for i, p in enumerate(POISON)]
        texts = {key: f.result() for key, f in good.items()}
        answers = [f.result() for f in bad]
    for key, (status, text, err) in texts.items():
        assert status == 200, (key, err)
        assert text == refs[key], f"{key}: concurrent {text!r} != alone {refs[key]!r}"
    for p, r in zip(POISON, answers):
        assert r.status_code < 500, (p, r.status_code, r.text)
        if r.status_code >= 400:
            err = r.json()["error"]
            assert err["param"], (p, err)
    m = served.metrics()
    assert m["engine_requests_failed_total"] == 0, m
    served.wait_until(served.idle, 5)


def test_mixed_chaos_traffic_leaks_nothing(served, refs):
    mix = Mix(served.url, served.grpc_port, refs, seed=int(time.time()))
    tally = mix.run(CHAOS_SECONDS, workers=6).summary()
    print("chaos tally:", tally)
    assert tally["failed"] == 0, mix.tally.failures[:10]
    assert tally["greedy_mismatches"] == 0, mix.tally.mismatches[:5]
    assert tally["completed"] > 0 and tally["aborted_by_client"] > 0 and tally["rejected_4xx"] > 0
    if tally["by_kind"].get("burst"):
        assert tally["rejected_429"] > 0, "a burst past the queue limit should have met 429s"
    served.wait_until(served.idle, 10, "every block and slot free after the mix")
    assert httpx.get(served.url + "/ready", timeout=10).status_code == 200


def test_killed_stage_actor_fails_its_request_and_the_replica_serves_again(served):
    box = {}

    def long_request():
        box["result"] = read_stream(served.url, {**full_body(0, 500)}, timeout=120)
        box["ended"] = time.time()

    before = served.metrics()
    t = threading.Thread(target=long_request)
    t.start()
    served.wait_until(lambda m: m.get("engine_generation_tokens_total", 0) > before.get(
        "engine_generation_tokens_total", 0), 30, "the long request to generate")
    t_kill = time.time()
    pids = served.actor_pids("StageActor")
    assert len(pids) == 2, pids
    os.kill(pids[-1], signal.SIGKILL)
    t.join(60)
    status, text, err = box["result"]
    assert status != 200 and "engine failure" in err, (status, err)
    assert box["ended"] - t_kill < 20, f"the request's error came {box['ended'] - t_kill:.1f}s after the kill"
    deadline = time.time() + 180
    while time.time() < deadline:                   # the replica rebuilds its actors: no server restart
        r = httpx.post(served.url + "/v1/completions", json=full_body(1, 8), timeout=120)
        if r.status_code == 200:
            break
        assert r.status_code == 503, r.text
        time.sleep(1)
    assert r.status_code == 200, r.text
    served.wait_until(lambda m: httpx.get(served.url + "/ready", timeout=10).status_code == 200, 5,
                      "/ready after the rebuild (replicas report twice a second)")
    assert served.proc.poll() is None
    assert served.metrics()["engine_requests_failed_total"] >= 1
