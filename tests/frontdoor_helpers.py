"""Helpers for front-door tests: an in-process HTTP + gRPC server on loopback around a real engine,
the engine's own greedy output as the reference, and SSE parsing."""
from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import threading
import time

from model_shards.sampling_params import SamplingParams


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalServer:
    """uvicorn + the gRPC server in one background event loop, with an AsyncEngine on that loop."""

    def __init__(self, engine_config, *, served_model_name: str = "tiny", api_key: str | None = None,
                 max_body_bytes: int = 64 * 1024, grpc: bool = True):
        import uvicorn

        from router.backend import LocalBackend, model_info
        from router.engine import AsyncEngine
        from router.frontend import Frontend, ModelInfo
        from router.grpc_server import GrpcServer
        from router.http_app import build_app
        from router.tokenizer import load_tokenizer

        self.engine = AsyncEngine(engine_config)
        self.info = ModelInfo.from_dict(model_info(self.engine))
        self.tokenizer = load_tokenizer(self.info.folder, vocab_size=self.info.vocab_size)
        self.fe = Frontend(LocalBackend(self.engine), self.tokenizer, self.info, served_model_name=served_model_name,
                           api_key=api_key)
        self.port, self.grpc_port = free_port(), (free_port() if grpc else 0)
        self.grpc = None
        server = self

        @contextlib.asynccontextmanager
        async def lifespan(_app):
            await server.engine.start()
            if server.grpc_port:
                server.grpc = GrpcServer(server.fe, "127.0.0.1", server.grpc_port)
                await server.grpc.start()
            yield
            if server.grpc:
                await server.grpc.stop(0.5)
            await server.engine.shutdown()

        app = build_app(self.fe, max_body_bytes=max_body_bytes, lifespan=lifespan)
        self.uvicorn = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning",
                                                     timeout_graceful_shutdown=1))
        self.loop: asyncio.AbstractEventLoop | None = None
        self.thread = threading.Thread(target=self._run, daemon=True, name="frontdoor-test-server")

    def _run(self):
        self.loop = asyncio.new_event_loop()
        asyncio.set_event_loop(self.loop)
        self.loop.run_until_complete(self.uvicorn.serve())

    def __enter__(self):
        self.thread.start()
        deadline = time.time() + 60
        while not self.uvicorn.started:
            if time.time() > deadline or not self.thread.is_alive():
                raise RuntimeError("test server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc):
        self.uvicorn.should_exit = True
        self.thread.join(30)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def call(self, coro, timeout: float = 120):
        """Run a coroutine on the server's loop (where the engine lives)."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def greedy(self, prompt_ids: list[int], max_tokens: int) -> list[int]:
        """The engine's own greedy output for these prompt ids (eos ends it, as for clients)."""
        async def run():
            out = []
            async for o in self.engine.generate(f"ref-{time.monotonic_ns()}", prompt_ids,
                                                SamplingParams(temperature=0.0, max_tokens=max_tokens)):
                out += o.new_token_ids
            return out
        return self.call(run())

    def stats(self):
        return self.call(_stats(self.engine))

    def wait_cache_free(self, timeout: float = 10.0):
        """Poll until no sequence holds KV blocks or a Mamba slot; returns the final stats."""
        deadline = time.time() + timeout
        while True:
            s = self.stats()
            if s.kv_blocks_used == 0 and s.mamba_slots_used == 0 and s.running == 0 and s.waiting == 0:
                return s
            if time.time() > deadline:
                raise AssertionError(f"cache not freed: {s}")
            time.sleep(0.02)


async def _stats(engine):
    import copy
    return copy.deepcopy(engine.stats())


def parse_sse(raw: bytes) -> list:
    """`data:` events of an SSE body: JSON objects, and the string "[DONE]"."""
    events = []
    for block in raw.decode().split("\n\n"):
        block = block.strip()
        if not block:
            continue
        assert block.startswith("data: "), block
        data = block[len("data: "):]
        events.append(data if data == "[DONE]" else json.loads(data))
    return events
