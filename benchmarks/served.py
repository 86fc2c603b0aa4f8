"""`hybridserve serve` as users run it, for the reliability suite and benchmarks/soak.py: a subprocess
with its own local Ray cluster on loopback, its /metrics read as the engine's own counters, and the
memory of its whole process tree."""
from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import psutil


REPO = Path(__file__).resolve().parents[1]
_SAMPLE = re.compile(r'^hybridserve:(\w+)\{([^}]*)\} (\S+)$', re.M)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tree_rss_bytes(pid: int) -> int:
    """Resident memory of a process and all its descendants."""
    try:
        root = psutil.Process(pid)
        procs = [root] + root.children(recursive=True)
    except psutil.NoSuchProcess:
        return 0
    total = 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


class ServerProcess:
    """A server subprocess in its own session; `with` waits until GET `probe` answers 200, and stops it
    (SIGTERM, then SIGKILL of its process group) on the way out. Its output is kept in `lines`."""

    name, probe, poll_s, stop_timeout_s = "server", "/health", 0.5, 30.0

    def __init__(self, cmd: list[str], port: int, startup_timeout_s: float = 300, env: dict | None = None,
                 cwd: Path | None = None):
        self.cmd, self.port, self.startup_timeout_s, self.env, self.cwd = cmd, port, startup_timeout_s, env, cwd
        self.url = f"http://127.0.0.1:{port}"
        self.lines: list[str] = []
        self.proc: subprocess.Popen | None = None

    def __enter__(self):
        self.proc = subprocess.Popen(self.cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     env=self.env, start_new_session=True, cwd=self.cwd, errors="replace")
        threading.Thread(target=lambda: self.lines.extend(iter(self.proc.stdout.readline, "")), daemon=True).start()
        deadline = time.time() + self.startup_timeout_s
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited {self.proc.returncode}:\n{self.log()}")
            if time.time() > deadline:
                self.__exit__()
                raise RuntimeError(f"{self.name} not ready after {self.startup_timeout_s}s:\n{self.log()}")
            try:
                if httpx.get(self.url + self.probe, timeout=5).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(self.poll_s)

    def __exit__(self, *exc) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(self.stop_timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def log(self, last: int = 200) -> str:
        return "".join(self.lines[-last:])


class ServedCluster(ServerProcess):
    """`python -m router.cli serve ARGS` on free ports; `with ServedCluster(...) as s:` waits for /ready."""

    name, probe, stop_timeout_s = "hybridserve serve", "/ready", 90.0

    def __init__(self, *args: str, startup_timeout_s: float = 300, num_cpus: int = 8):
        port, self.grpc_port = free_port(), free_port()
        cmd = [sys.executable, "-m", "router.cli", "serve", "--port", str(port), "--grpc-port",
               str(self.grpc_port), "--num-cpus", str(num_cpus), "--log-level", "INFO", *args]
        env = dict(os.environ)
        env.pop("RAY_ADDRESS", None)
        super().__init__(cmd, port, startup_timeout_s, env=env, cwd=REPO)

    # ---- the engine's own counters, through /metrics --------------------------------------------------------
    def metrics(self) -> dict[str, float]:
        """Every `hybridserve:` sample summed over its labels but `finished_reason`/`status` (kept in the name)."""
        text = httpx.get(self.url + "/metrics", timeout=10).text
        out: dict[str, float] = {}
        for name, labels, value in _SAMPLE.findall(text):
            extra = re.search(r'(?:finished_reason|status|position)="([^"]*)"', labels)
            key = f"{name}:{extra.group(1)}" if extra else name
            out[key] = out.get(key, 0.0) + float(value)
        return out

    @staticmethod
    def idle(m: dict[str, float]) -> bool:
        """Nothing running or waiting, no KV block or Mamba slot held, on every replica."""
        return ("num_requests_running" in m and m["num_requests_running"] + m["num_requests_waiting"] == 0
                and m["kv_cache_usage_perc"] == 0 and m["mamba_slots_used"] == 0)

    def wait_until(self, pred, timeout_s: float, what: str = "the engine to be idle") -> float:
        """Seconds until `pred(metrics)` holds. Replicas report twice a second, so a condition must
        include what proves the report is new (a counter that moved), not only an idle engine."""
        t0 = time.time()
        while time.time() - t0 < timeout_s:
            if pred(self.metrics()):
                return time.time() - t0
            time.sleep(0.2)
        raise AssertionError(f"timed out after {timeout_s}s waiting for {what}: {self.metrics()}")

    def wait_aborted_and_idle(self, before: dict[str, float], n: int, timeout_s: float) -> dict[str, float]:
        """Wait until the engine has counted `n` more aborted requests than in `before`, and holds nothing."""
        key = "engine_requests_aborted_total"
        self.wait_until(lambda m: m.get(key, 0) - before.get(key, 0) >= n and self.idle(m), timeout_s,
                        f"{n} aborted requests and an idle engine")
        return self.metrics()

    # ---- the server's processes -----------------------------------------------------------------------------
    def tree_rss_bytes(self) -> int:
        """Resident memory of the serve process and all its descendants (Ray, replicas, actors)."""
        return tree_rss_bytes(self.proc.pid)

    def rss_by_process(self) -> dict[str, float]:
        """MiB of resident memory per kind of process in the tree (Ray names its workers ray::Class)."""
        out: dict[str, float] = {}
        try:
            procs = [psutil.Process(self.proc.pid)] + psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return out
        for p in procs:
            try:
                cmd = " ".join(p.cmdline())
                name = next((w for w in cmd.split() if w.startswith("ray::")), None) or p.name()
                name = name.split(".")[0] if name.startswith("ray::") else name
                out[name] = out.get(name, 0.0) + p.memory_info().rss / 2**20
            except psutil.NoSuchProcess:
                pass
        return out

    def actor_pids(self, class_name: str) -> list[int]:
        """PIDs of the Ray worker processes running actors of `class_name` (Ray names them ray::Class)."""
        root = psutil.Process(self.proc.pid)
        pids = []
        for p in root.children(recursive=True):
            try:
                if any(f"ray::{class_name}" in part for part in p.cmdline()):
                    pids.append(p.pid)
            except psutil.NoSuchProcess:
                pass
        return pids
