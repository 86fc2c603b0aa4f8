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
LONG, N_LONG = 1000, 6   # one sequence at a time (--max-num-seqs 1): ~10 s of work for the tiny model


def _gauge(metrics_text: str, name: str) -> float:
    """Sum of a gauge over its label sets in Prometheus text."""
    return sum(float(line.rsplit(" ", 1)[1]) for line in metrics_text.splitlines() if line.startswith(name + "{"))


def test_serve_command_answers_and_drains_from_outside_and_on_sigterm(preset_cache):
    port, grpc_port = free_port(), free_port()
    cmd = [sys.executable, "-m", "router.cli", "serve", "--model", "tiny", "--port", str(port),
           "--grpc-port", str(grpc_port), "--max-model-len", "1024", "--max-num-seqs", "1", "--num-cpus", "4", "--drain-timeout", "60",
           "--log-level", "INFO"]
    env = {**os.environ, "RAY_ADDRESS": ""}
    env.pop("RAY_ADDRESS")
    proc_cwd = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True, cwd=proc_cwd)
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

        long_results = []

        def long_request():
            long_results.append(httpx.post(f"http://127.0.0.1:{port}/v1/completions", timeout=120,
                                           json={"prompt": "x", "max_tokens": LONG, "ignore_eos": True}))
        threads = [threading.Thread(target=long_request) for _ in range(N_LONG)]
        for t in threads:
            t.start()
        deadline = time.time() + 60
        while "hybridserve:num_requests_running{" not in (m := httpx.get(f"http://127.0.0.1:{port}/metrics").text) \
                or not _gauge(m, "hybridserve:num_requests_running") >= 1:
            assert time.time() < deadline, "the long request never ran"
            time.sleep(0.05)
        # What a Kubernetes preStop hook runs: drain from outside, while the request still has tokens to go.
        ray_address = next(ln.split()[1] for ln in lines if ln.strip().startswith("ray "))   # the banner's
        drainer = subprocess.Popen([sys.executable, "-m", "router.cli", "drain", "--timeout", "60",
                                    "--address", ray_address], env=env,
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=proc_cwd)
        deadline = time.time() + 60
        while httpx.get(f"http://127.0.0.1:{port}/ready").status_code != 503:
            assert time.time() < deadline and drainer.poll() is None, drainer.communicate()[0]
            time.sleep(0.05)
        refused = httpx.post(f"http://127.0.0.1:{port}/v1/completions", timeout=30, json={"prompt": "y", "max_tokens": 4})
        assert refused.status_code == 503, refused.text
        drain_out = drainer.communicate(timeout=120)[0]
        assert drainer.returncode == 0 and "drained in" in drain_out, drain_out
        assert int(drain_out.split(" request(s) in flight")[0].rsplit(" ", 1)[1]) >= 1, drain_out
        for t in threads:
            t.join(120)
        assert [r.status_code for r in long_results] == [200] * N_LONG, [r.text for r in long_results]
        assert all(r.json()["usage"]["completion_tokens"] == LONG for r in long_results), "an in-flight request was cut"
        # MTP is on by default (--num-speculative-tokens auto: 3, the tiny preset has an MTP block, adaptive
        # policy): drafts were proposed and verified, and the policy's choices are counted.
        m = httpx.get(f"http://127.0.0.1:{port}/metrics").text
        assert _gauge(m, "hybridserve:spec_decode_num_draft_tokens_per_pos_total") > 0, m
        assert _gauge(m, "hybridserve:spec_decode_drafts_per_seq_count") > 0, m
        proc.send_signal(signal.SIGTERM)          # as Kubernetes does: to the main process only
        assert proc.wait(90) == 0
        reader.join(5)
        out = "".join(lines)
        assert "SIGTERM received" in out and "0 request(s) in flight" in out and "stopped" in out
        assert "POST /v1/chat/completions model=tiny prompt=" in out      # the per-request log line
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
