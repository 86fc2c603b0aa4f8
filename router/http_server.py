"""The ingress's own HTTP server: uvicorn on the ingress replica's event loop.

Why not Serve's HTTP proxy: through the proxy every SSE chunk crosses one more process (the ingress
sends each ASGI message to the proxy as a Ray streamed item), which on a CPU costs as much as a
quarter of a served token (benchmarks/serve_profile.py). The ingress already owns the gRPC port the same
way. `hybridserve serve --http-server proxy` keeps Serve's proxy (the app is the same FastAPI app).
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import socket

import uvicorn

log = logging.getLogger("hybridserve.http")


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self):
        """Signals belong to the Ray worker process (and to `hybridserve serve`'s drain), not to us."""
        yield


class HttpServer:
    def __init__(self, app, host: str, port: int):
        self.host, self.port = host, port
        self.server = _Server(uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False,
                                             lifespan="off", timeout_graceful_shutdown=5))
        self._task: asyncio.Task | None = None

    async def start(self, timeout_s: float = 30.0) -> None:
        """Listen; raises OSError naming the address if it cannot be bound (the replica then fails to start)."""
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((self.host, self.port))
        except OSError as e:
            sock.close()
            raise OSError(e.errno, f"HTTP server: cannot listen on {self.host}:{self.port}: {e.strerror}") from None
        self._task = asyncio.create_task(self.server.serve(sockets=[sock]))
        deadline = asyncio.get_running_loop().time() + timeout_s
        while not self.server.started:
            if self._task.done() or asyncio.get_running_loop().time() > deadline:
                raise RuntimeError(f"HTTP server on {self.host}:{self.port} did not start")
            await asyncio.sleep(0.02)
        log.info("HTTP listening on %s:%d", self.host, self.port)

    async def stop(self) -> None:
        if self._task is None:
            return
        self.server.should_exit = True
        try:
            await asyncio.wait_for(self._task, 10)
        except (asyncio.TimeoutError, Exception):  # noqa: BLE001 - shutting down regardless
            self._task.cancel()
