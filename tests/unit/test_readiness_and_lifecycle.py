"""Readiness means a completion would be served; startup and shutdown never trip over a slow machine or
a replica that is still loading; the API key is compared in constant time."""
from __future__ import annotations

import asyncio
import os

import httpx
import pytest

from router.errors import AuthenticationError
from router.frontend import Frontend, ModelInfo
from router.http_app import build_app
from router.tokenizer import ByteTokenizer


class FakeBackend:
    def __init__(self, ready):
        self._ready = ready

    async def ready(self):
        if isinstance(self._ready, Exception):
            raise self._ready
        return self._ready

    async def stats(self):
        raise RuntimeError("the stats hub is gone")


def ready_status(fe: Frontend) -> int:
    async def get():
        transport = httpx.ASGITransport(app=build_app(fe))
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            return (await c.get("/ready")).status_code, (await c.get("/metrics")).status_code
    return asyncio.run(get())


def frontend(backend, loaded: bool = True) -> Frontend:
    info = ModelInfo("m", max_model_len=64, vocab_size=256)
    return Frontend(backend, ByteTokenizer(256) if loaded else None, info if loaded else None,
                    served_model_name="m")


def test_ready_is_200_only_when_a_completion_would_be_served():
    assert ready_status(frontend(FakeBackend(True))) == (200, 200)
    # The replicas are ready but the ingress has not fetched the model's info yet: completions would 503.
    assert ready_status(frontend(FakeBackend(True), loaded=False))[0] == 503
    assert ready_status(frontend(FakeBackend(False)))[0] == 503
    draining = frontend(FakeBackend(True))
    draining.draining = True
    assert ready_status(draining)[0] == 503


def test_ready_is_503_not_500_when_the_stats_it_reads_are_unavailable():
    assert ready_status(frontend(FakeBackend(RuntimeError("hub actor died")))) == (503, 200)


def test_api_key_check_uses_a_constant_time_comparison(monkeypatch):
    import hmac

    calls = []
    real = hmac.compare_digest
    monkeypatch.setattr(hmac, "compare_digest", lambda a, b: calls.append((a, b)) or real(a, b))
    fe = Frontend(FakeBackend(True), None, None, served_model_name="m", api_key="s3cret")
    fe.check_api_key("s3cret")
    with pytest.raises(AuthenticationError):
        fe.check_api_key("s3creT")
    assert len(calls) == 2


def test_a_replica_stopped_while_loading_shuts_down_cleanly(monkeypatch, preset_cache):
    """Serve may stop a replica (Ctrl-C during startup) while its weights still load."""
    from router import serve_app
    from router.engine_config import EngineConfig

    class Ctx:
        class replica_id:
            unique_id = "r-loading"
    monkeypatch.setattr(serve_app.serve, "get_replica_context", lambda: Ctx)
    forgotten = []
    monkeypatch.setattr(serve_app.ray, "get_actor", lambda name: forgotten.append(name) or (_ for _ in ()).throw(
        ValueError(f"no actor {name}")))                     # no Ray here: the hub is not found
    started = asyncio.Event()

    async def scenario():
        loop = asyncio.get_running_loop()
        server = serve_app.ModelServer.__new__(serve_app.ModelServer)
        cfg = serve_app.ServeConfig(engine=EngineConfig(model="tiny"), torch_threads=1)
        import router.engine as engine_mod

        def slow_engine(config):                 # loading weights; the result is never used
            loop.call_soon_threadsafe(started.set)
            import time
            time.sleep(0.5)
            return object()
        monkeypatch.setattr(engine_mod, "AsyncEngine", slow_engine)
        loading = asyncio.create_task(server.__init__(cfg))
        await started.wait()
        loading.cancel()
        with pytest.raises(asyncio.CancelledError):
            await loading
        await server.__del__()            # before the fix: AttributeError 'engine'
        return server

    server = asyncio.run(scenario())
    assert server.engine is None and forgotten == ["hybridserve-stats-hub"]


def test_startup_gives_serve_proxy_time_on_a_busy_machine_unless_the_user_chose(monkeypatch):
    from router import cli

    for k in (*cli.PATIENT_SERVE_ENV, *cli.SERVE_ONE_LOOP_ENV, *cli.BOUNDED_RAY_ENV):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("RAY_SERVE_PROXY_HEALTH_CHECK_PERIOD_S", "3")
    cli.patient_startup()
    assert float(os.environ["RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S"]) >= 30      # Serve's default: 5 s
    assert os.environ["RAY_SERVE_PROXY_HEALTH_CHECK_PERIOD_S"] == "3"


def test_ingress_shutdown_aborts_open_requests_in_the_engine(preset_cache):
    """Frontend.abort_all (drain timeout, ingress shutdown) ends requests in the engine, not just at the door."""
    from model_shards.sampling_params import SamplingParams
    from router.backend import LocalBackend
    from router.engine import AsyncEngine
    from router.engine_config import EngineConfig
    from router.frontend import Prepared

    engine = AsyncEngine(EngineConfig(model="tiny", max_model_len=512))
    fe = Frontend(LocalBackend(engine), ByteTokenizer(256), ModelInfo("tiny", max_model_len=512, vocab_size=256),
                  served_model_name="tiny")

    async def scenario():
        await engine.start()
        try:
            prep = Prepared("completion", "tiny", [5, 6, 7], SamplingParams(max_tokens=400, ignore_eos=True), [])
            gen = await fe.start("r1", prep, "test")
            deltas = gen.__aiter__()
            await deltas.__anext__()
            held = engine.blocks.used_slots
            assert await fe.abort_all("ingress shutting down") == 1
            for _ in range(200):
                if engine.blocks.all_free():
                    break
                await asyncio.sleep(0.01)
            return held
        finally:
            await engine.shutdown()

    held = asyncio.run(scenario())
    assert held == 1 and engine.blocks.all_free() and fe.in_flight == 0
    assert engine.stats_.requests_aborted == 1 and engine.stats_.tokens_generated < 400
