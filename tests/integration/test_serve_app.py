"""The Ray Serve application on loopback: ingress (HTTP + gRPC) and model replicas.

Few and well chosen, because each deployment costs seconds and memory: one app for the request path
(outputs equal greedy, cancellation frees the cache, queue limit) with the ingress serving HTTP itself
(the default), one for autoscaling behind Serve's HTTP proxy (`--http-server proxy`).
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import re
import threading
import time

import httpx
import openai
import pytest

from model_shards.sampling_params import SamplingParams
from router.engine_config import EngineConfig
from router.grpc_client import Client
from router.tokenizer import ByteTokenizer
from tests.frontdoor_helpers import free_port

pytestmark = pytest.mark.integration

MSGS = [{"role": "user", "content": "Hello there"}]
TOK = ByteTokenizer(256)        # the tiny preset has no tokenizer.json: the ingress uses bytes too


def engine_config(**kw) -> EngineConfig:
    return EngineConfig(model="tiny", max_model_len=1024, **kw)


def greedy_refs(requests: list[tuple[list[int], int]]) -> list[list[int]]:
    """The engine's own greedy output, from an engine in this process (same preset, same weights)."""
    from router.engine import AsyncEngine

    async def run():
        eng = AsyncEngine(engine_config())
        await eng.start()
        try:
            outs = []
            for i, (ids, n) in enumerate(requests):
                toks = []
                async for o in eng.generate(f"ref{i}", ids, SamplingParams(temperature=0.0, max_tokens=n)):
                    toks += o.new_token_ids
                outs.append(toks)
            return outs
        finally:
            await eng.shutdown()
    return asyncio.run(run())


def deploy(cfg):
    from ray import serve

    from router.serve_app import build_application, start_serve

    start_serve(cfg)
    serve.run(build_application(cfg), name=cfg.app_name, route_prefix="/")


def engine_metric(url: str, name: str) -> dict[str, float]:
    """{replica: value} of one engine gauge from /metrics."""
    text = httpx.get(url + "/metrics", timeout=10).text
    pat = re.compile(r'^hybridserve:' + name + r'\{model_name="[^"]*",replica="([^"]+)"\} (\S+)$', re.M)
    return {r: float(v) for r, v in pat.findall(text)}


def wait_for(cond, timeout: float, what: str, interval: float = 0.2):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


@pytest.fixture(scope="module")
def ray_cluster(preset_cache):
    """Ray on loopback (as tests/conftest.py's ray_local, but for module-scoped fixtures)."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=16, include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1")
    return ray


@pytest.fixture(scope="module")
def app(ray_cluster):
    from ray import serve

    from router.serve_app import ServeConfig

    cfg = ServeConfig(engine=engine_config(max_num_seqs=2, max_queued_requests=1), app_name="hs-test",
                      port=free_port(), grpc_port=free_port(), torch_threads=1, served_model_name="tiny")
    deploy(cfg)
    url = f"http://127.0.0.1:{cfg.port}"
    wait_for(lambda: httpx.get(url + "/ready").status_code == 200, 30, "/ready")
    yield cfg, url
    serve.shutdown()


def test_serve_outputs_equal_greedy_http_and_grpc(app):
    cfg, url = app
    chat_ids = TOK.encode_chat(MSGS)
    comp_ids = TOK.encode("Once upon")
    ref_chat, ref_comp = greedy_refs([(chat_ids, 16), (comp_ids, 10)])
    client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
    r = client.chat.completions.create(model="tiny", messages=MSGS, max_tokens=16, temperature=0,
                                       extra_body={"return_token_ids": True})
    assert r.choices[0].token_ids == ref_chat and r.choices[0].message.content == TOK.decode(ref_chat)
    chunks = list(client.chat.completions.create(model="tiny", messages=MSGS, max_tokens=16, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == TOK.decode(ref_chat)
    assert chunks[-1].usage.completion_tokens == len(ref_chat)
    r = client.completions.create(model="tiny", prompt="Once upon", max_tokens=10, temperature=0)
    assert r.choices[0].text == TOK.decode(ref_comp)
    with Client(f"127.0.0.1:{cfg.grpc_port}") as c:
        parts = list(c.generate(messages=MSGS, max_tokens=16, temperature=0))
        assert sum((list(p.token_ids) for p in parts), []) == ref_chat
        # the health status follows readiness as the gRPC server polls it (every 0.5 s): SERVING soon
        deadline = time.monotonic() + 15
        while c.health() != "SERVING" and time.monotonic() < deadline:
            time.sleep(0.25)
        assert c.health() == "SERVING"
    assert "hybridserve:time_to_first_token_seconds_count" in httpx.get(url + "/metrics").text


def test_serve_disconnect_frees_the_cache(app):
    """Each way a client leaves aborts the request in the engine (its counter moves, while the request
    still had most of its 900 tokens to go) and frees its slot and blocks."""
    _, url = app

    def aborted() -> float:
        return sum(engine_metric(url, "engine_requests_aborted_total").values())

    def freed_after(n_aborted: float) -> bool:
        return (aborted() >= n_aborted and sum(engine_metric(url, "mamba_slots_used").values()) == 0
                and sum(engine_metric(url, "kv_cache_blocks_used").values()) == 0)

    base = aborted()
    body = {"prompt": "go", "max_tokens": 900, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=30) as r:
        it = r.iter_bytes()
        next(it)
        wait_for(lambda: sum(engine_metric(url, "mamba_slots_used").values()) == 1, 10, "the request to run")
    # connection closed mid-stream: Serve cancels the ingress handler, which closes the request's stream
    wait_for(lambda: freed_after(base + 1), 10, "the stream's abort and a free cache")
    with pytest.raises(httpx.ReadTimeout):          # a non-streaming client that gives up
        httpx.post(url + "/v1/completions", json={"prompt": "go", "max_tokens": 900, "ignore_eos": True},
                   timeout=httpx.Timeout(30, read=0.5))
    wait_for(lambda: freed_after(base + 2), 10, "the unary request's abort and a free cache")
    with Client(f"127.0.0.1:{app[0].grpc_port}") as c:
        stream = c.generate("go", max_tokens=900, ignore_eos=True)
        next(stream)
        stream.cancel()
    wait_for(lambda: freed_after(base + 3), 10, "the gRPC call's abort and a free cache")
    tokens = sum(engine_metric(url, "engine_generation_tokens_total").values())
    assert tokens < 3 * 900, "the cut requests ran to max_tokens"


def test_serve_queue_limit(app):
    _, url = app
    body = {"prompt": "q", "max_tokens": 200, "ignore_eos": True}
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        rs = list(pool.map(lambda _: httpx.post(url + "/v1/completions", json=body, timeout=120), range(8)))
    codes = [r.status_code for r in rs]
    assert 429 in codes and 200 in codes and set(codes) <= {200, 429}, [(r.status_code, r.text[:300]) for r in rs]
    for r in rs:
        if r.status_code == 429:
            assert int(r.headers["Retry-After"]) >= 1 and r.json()["error"]["type"] == "rate_limit_error"
        else:
            assert r.json()["usage"]["completion_tokens"] == 200


def test_autoscaling_on_kv_cache_usage_adds_a_replica_under_load_and_removes_it(ray_cluster):
    """The engine policy (router/autoscaling.py) scales on KV-cache usage: two clients can never push the
    ongoing-requests signal (2 / target 100) or the sequences signal (2 / max_num_seqs 4) to 1, but
    their 150-token sequences fill a 24-block cache past the 0.3 target."""
    from ray import serve

    from router.serve_app import ServeConfig

    cfg = ServeConfig(engine=engine_config(max_num_seqs=4, max_queued_requests=8, num_kv_blocks=24),
                      app_name="hs-scale", port=free_port(), grpc_port=0, min_replicas=1, max_replicas=2,
                      target_ongoing_requests=100, target_kv_cache_usage=0.3, http_server="proxy",
                      torch_threads=1, autoscaling_overrides={"upscale_delay_s": 0.5, "downscale_delay_s": 3,
                                                              "metrics_interval_s": 0.5, "look_back_period_s": 1})
    serve.shutdown()                    # the request-path app (HTTP options are per Serve instance)
    deploy(cfg)
    url = f"http://127.0.0.1:{cfg.port}"

    def running_replicas() -> int:
        d = serve.status().applications[cfg.app_name].deployments["ModelServer"]
        return sum(n for s, n in d.replica_states.items() if str(s).endswith("RUNNING"))

    try:
        assert running_replicas() == 1
        stop = threading.Event()

        def load():
            while not stop.is_set():
                httpx.post(url + "/v1/completions", json={"prompt": "load", "max_tokens": 150, "ignore_eos": True},
                           timeout=120)

        threads = [threading.Thread(target=load, daemon=True) for _ in range(2)]
        for t in threads:
            t.start()
        wait_for(lambda: running_replicas() == 2, 90, "a second replica", interval=0.5)
        # Both replicas serve: each one's engine steps while the load continues.
        before = engine_metric(url, "engine_steps_total")
        wait_for(lambda: len(engine_metric(url, "engine_steps_total")) == 2, 10, "stats from both replicas")
        time.sleep(3)
        after = engine_metric(url, "engine_steps_total")
        assert len(after) == 2 and all(after[r] > before.get(r, 0) for r in after), (before, after)
        stop.set()
        for t in threads:
            t.join(120)
        wait_for(lambda: running_replicas() == 1, 60, "scale-down to one replica", interval=0.5)
        r = httpx.post(url + "/v1/completions", json={"prompt": "after", "max_tokens": 4}, timeout=30)
        assert r.status_code == 200
    finally:
        serve.shutdown()
