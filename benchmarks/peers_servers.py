"""The peers' processes for benchmarks/peers.py: llama.cpp's `llama-server` (found, or built from the
llama.cpp that the llama-cpp-python source distribution vendors, cached outside the repo), a sampler of
a process tree's resident memory, and the greedy-parity requests each server answers with token ids.

Building llama-server (what `--build-llama-server` runs; about 5 minutes on 2 cores):

    CACHE=~/.cache/hybridserve/llama.cpp
    python -m pip download --no-deps --no-binary :all: llama-cpp-python==0.3.36 -d $CACHE
    tar xzf $CACHE/llama_cpp_python-0.3.36.tar.gz -C $CACHE
    cmake -S $CACHE/llama_cpp_python-0.3.36/vendor/llama.cpp -B $CACHE/build -G Ninja \
        -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
        -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_SERVER=ON -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_UI=OFF \
        -DLLAMA_USE_PREBUILT_UI=OFF
    cmake --build $CACHE/build --target llama-server -j2

(`-DLLAMA_USE_PREBUILT_UI=OFF` keeps the build off the network: the web UI is otherwise downloaded; the
server then has no web page, its API is unchanged. Without ninja: `pip install ninja`, or drop `-G Ninja`.)
"""
from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from .served import ServerProcess, free_port, tree_rss_bytes

LLAMA_CPP_PYTHON_VERSION = "0.3.36"
CACHE = Path(os.environ.get("HYBRIDSERVE_CACHE", Path.home() / ".cache" / "hybridserve"))
LLAMA_DIR = CACHE / "llama.cpp"
CMAKE_OPTIONS = ("-DCMAKE_BUILD_TYPE=Release", "-DBUILD_SHARED_LIBS=OFF", "-DLLAMA_BUILD_TESTS=OFF",
                 "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_TOOLS=ON", "-DLLAMA_BUILD_SERVER=ON",
                 "-DLLAMA_OPENSSL=OFF", "-DLLAMA_BUILD_UI=OFF", "-DLLAMA_USE_PREBUILT_UI=OFF")


def cached_llama_server(root: Path = LLAMA_DIR) -> Path:
    return root / "build" / "bin" / "llama-server"


def build_commands(root: Path = LLAMA_DIR, version: str = LLAMA_CPP_PYTHON_VERSION,
                   ninja: bool = True) -> list[list[str]]:
    src = root / f"llama_cpp_python-{version}"
    return [[sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
             f"llama-cpp-python=={version}", "-d", str(root)],
            ["tar", "xzf", str(root / f"llama_cpp_python-{version}.tar.gz"), "-C", str(root)],
            ["cmake", "-S", str(src / "vendor" / "llama.cpp"), "-B", str(root / "build"),
             *(["-G", "Ninja"] if ninja else []), *CMAKE_OPTIONS],
            ["cmake", "--build", str(root / "build"), "--target", "llama-server", "-j", str(os.cpu_count() or 2)]]


def find_llama_server(override: str | None) -> tuple[Path | None, str]:
    """(binary, how it was found) or (None, a message saying how to build it)."""
    if override:
        p = Path(override).expanduser()
        return (p, "--llama-server") if p.is_file() and os.access(p, os.X_OK) else (None, f"--llama-server {p}: not an executable file")
    if cached_llama_server().is_file():
        return cached_llama_server(), f"the cached build ({cached_llama_server()})"
    found = shutil.which("llama-server")
    if found:
        return Path(found), f"PATH ({found})"
    cmds = "\n".join("    " + shlex.join(c) for c in build_commands())
    return None, ("llama-server not found (not in the cache, not on PATH, no --llama-server): skipping llama.cpp. "
                  f"Rerun with --build-llama-server (about 5 minutes on 2 cores), or build it by hand:\n{cmds}")


def build_llama_server(root: Path = LLAMA_DIR, log=print) -> Path:
    """Download, extract, configure and build, skipping the steps whose output is already there."""
    root.mkdir(parents=True, exist_ok=True)
    ninja = shutil.which("ninja") is not None
    if not ninja:
        log("ninja not found: building with make (pip install ninja for the faster build)")
    steps = build_commands(root, ninja=ninja)
    tarball = root / f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}.tar.gz"
    done = [tarball.exists(), (root / f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}").is_dir(),
            (root / "build" / "CMakeCache.txt").exists(), False]
    t0 = time.time()
    for cmd, skip in zip(steps, done):
        if skip:
            continue
        log(f"$ {shlex.join(cmd)}")
        with open(root / "build.log", "a") as f:
            rc = subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT)
        if rc:
            raise RuntimeError(f"building llama-server failed (exit {rc}) at: {shlex.join(cmd)}; see {root / 'build.log'}")
    log(f"built {cached_llama_server(root)} in {time.time() - t0:.0f}s")
    return cached_llama_server(root)


# ---- memory ---------------------------------------------------------------------------------------
def tree_rss_mib(pid: int) -> float:
    return tree_rss_bytes(pid) / 2**20


class MemorySampler:
    """Samples the resident memory of a process and its descendants every `every_s`; `reset()` starts a
    new window and `peak` is the largest sample of the current window."""

    def __init__(self, pid: int, every_s: float = 0.5):
        self.pid, self.every_s = pid, every_s
        self.peak = tree_rss_mib(pid)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            self.peak = max(self.peak, tree_rss_mib(self.pid))

    def reset(self) -> None:
        self.peak = tree_rss_mib(self.pid)

    def __enter__(self) -> "MemorySampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.peak = max(self.peak, tree_rss_mib(self.pid))
        self._stop.set()
        self._thread.join(5)


# ---- llama-server -----------------------------------------------------------------------------------
def llama_server_command(binary: Path, gguf: Path, slots: int, ctx_per_slot: int, port: int, threads: int) -> list[str]:
    """One slot per stream, each with ctx_per_slot tokens; no flash attention (greedy parity is checked
    against it), no prompt cache (every server computes every prompt)."""
    return [str(binary), "-m", str(gguf), "-np", str(slots), "-c", str(slots * ctx_per_slot),
            "--host", "127.0.0.1", "--port", str(port), "-fa", "off", "-t", str(threads), "-tb", str(threads),
            "--no-cache-prompt", "-cram", "0", "--no-webui"]


class LlamaServer(ServerProcess):
    name, probe, poll_s = "llama-server", "/health", 0.3

    def __init__(self, binary: Path, gguf: Path, slots: int, ctx_per_slot: int, threads: int,
                 startup_timeout_s: float = 300):
        port = free_port()
        super().__init__(llama_server_command(binary, gguf, slots, ctx_per_slot, port, threads), port,
                         startup_timeout_s)

    def tokenize(self, text: str) -> list[int]:
        r = httpx.post(self.url + "/tokenize", json={"content": text, "add_special": True}, timeout=60)
        r.raise_for_status()
        return [t if isinstance(t, int) else t["id"] for t in r.json()["tokens"]]


# ---- greedy parity ----------------------------------------------------------------------------------
def _together(fn, items: list) -> list:
    """fn over every item at once (the server batches them), results in order."""
    with ThreadPoolExecutor(max_workers=max(1, len(items))) as pool:
        return list(pool.map(fn, items))


def hybridserve_tokens(url: str, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    """Greedy output ids of each prompt (sent as token ids, all at once) from `hybridserve serve`."""
    def one(ids: list[int]) -> list[int]:
        r = httpx.post(url + "/v1/completions", timeout=1800,
                       json={"prompt": ids, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
                             "return_token_ids": True})
        r.raise_for_status()
        return list(r.json()["choices"][0]["token_ids"])
    return _together(one, prompts)


def llama_server_tokens(url: str, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    """Greedy output ids from llama-server's own /completion (token-id prompts, `return_tokens`)."""
    def one(ids: list[int]) -> list[int]:
        r = httpx.post(url + "/completion", timeout=1800,
                       json={"prompt": ids, "n_predict": max_tokens, "temperature": 0, "ignore_eos": True,
                             "return_tokens": True, "cache_prompt": False})
        r.raise_for_status()
        return list(r.json()["tokens"])
    return _together(one, prompts)
