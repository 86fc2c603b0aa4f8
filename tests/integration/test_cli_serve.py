"""`hybridserve serve` as a user runs it: one command, a curl-style chat completion, SIGTERM drains."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest

from tests.frontdoor_helpers import free_port

pytestmark = pytest.mark.integration


def test_serve_command_answers_and_drains_on_sigterm(preset_cache):
    port, grpc_port = free_port(), free_port()
    cmd = [sys.executable, "-m", "router.cli", "serve", "--model", "tiny", "--port", str(port),
           "--grpc-port", str(grpc_port), "--max-model-len", "1024", "--num-cpus", "4", "--drain-timeout", "60",
           "--log-level", "INFO"]
    env = {**os.environ, "RAY_ADDRESS": ""}
    env.pop("RAY_ADDRESS")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True, cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(proc.stdout.readline, "")), daemon=True)
    reader.start()
    try:
        deadline = time.time() + 180
        while not any("Press Ctrl-C" in ln for ln in lines):
            assert proc.poll() is None, "".join(lines)
            assert time.time() < deadline, "".join(lines)
            time.sleep(0.2)
        out = "".join(lines)
        assert f"http://127.0.0.1:{port}/v1" in out and f"127.0.0.1:{grpc_port}" in out
        r = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", timeout=60,
                       json={"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1

        long_result = {}

        def long_request():
            long_result["r"] = httpx.post(f"http://127.0.0.1:{port}/v1/completions", timeout=120,
                                          json={"prompt": "x", "max_tokens": 600, "ignore_eos": True})
        t = threading.Thread(target=long_request)
        t.start()
        time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)          # as Kubernetes does: to the main process only
        t.join(120)
        assert long_result["r"].status_code == 200
        assert long_result["r"].json()["usage"]["completion_tokens"] == 600, "the in-flight request was cut"
        assert proc.wait(90) == 0
        reader.join(5)
        out = "".join(lines)
        assert "SIGTERM received" in out and "draining: 1 request(s) in flight" in out and "stopped" in out
        assert "POST /v1/chat/completions model=tiny prompt=" in out      # the per-request log line
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
