"""Where a served request's time goes: `python -m benchmarks.serve_profile`.

The same closed-loop workload (prompts of --input-len tokens, --output-len new tokens each, greedy, EOS
ignored, at most C in flight) runs on two sides, both up at once, in timed rounds that alternate between
them (so a change in a shared machine's speed falls on both; the ratio is per round):
  1. in-process: the AsyncEngine with the whole model in this process, fed directly;
  2. served: `hybridserve serve` with the same engine settings, driven over HTTP by `hybridserve bench`
     (streaming /v1/completions) from its own process.
For the served runs it reports the CPU time each process of the server (and the bench client) spent per
output token, the engine's steps and tokens per step (from /metrics), and, when py-spy is installed, from
a further, untimed run (py-spy's sampling takes CPU), a sampled split of the model replica's and the
ingress's time into pieces (model forward, tail, engine loop, Ray Serve streaming, HTTP and SSE, ...).
Prints tables and writes docs/BENCHMARKS.md
("serve-profile"). Not a test: the numbers depend on the machine.
"""
from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

from .common import machine, publish, table
from .served import ServedCluster

# py-spy frames -> piece. A sample goes to the piece of its innermost frame that matches (leaf first).
PIECES = [
    ("tail: sampling, verification, MTP drafting", r"model_shards/(tail|speculative|drafter|mtp)\.py|run_tail"),
    ("model forward (layers, logits)", r"model_shards/|kernels/"),
    ("executor: plan to batch, commits; the pipe to the model process", r"cluster/"),
    ("engine loop and scheduler", r"router/(engine|scheduler|block_manager|sequence)\.py"),
    ("replica generator", r"router/(serve_app|request_stream|backend)\.py"),
    ("frontend: tokenize, detokenize, stops", r"router/(frontend|detokenizer|tokenizer|responses)\.py"),
    ("HTTP app: FastAPI, SSE", r"router/http_app\.py|starlette|fastapi|uvicorn|h11|anyio"),
    ("Ray Serve and Ray core (streams, handles)", r"ray/"),
]

MODEL_PROCESS = "model process (cluster/process_executor.py)"
THREAD_FRAMES = r"(Thread\.run|Thread\._bootstrap|_WorkItem\.run|_worker) "


def spy_pieces(raw: Path) -> dict[str, float]:
    """py-spy's raw (collapsed) stacks -> share of samples per piece."""
    counts: collections.Counter = collections.Counter()
    for line in raw.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        frames = stack.split(";")[::-1]
        if not frames[0] or re.match(THREAD_FRAMES, frames[0]):
            piece = "native code under a thread's frame (Ray's C++ core worker, lock waits)"
        else:
            piece = next((name for f in frames for name, pat in PIECES if re.search(pat, f)), "other (Python, asyncio)")
        counts[piece] += int(n)
    total = sum(counts.values()) or 1
    return {k: v / total for k, v in counts.items()}


def cpu_seconds(root: int) -> dict[str, float]:
    """CPU seconds (user + system) per kind of process in the tree (Ray names its workers ray::Class)."""
    out: dict[str, float] = collections.defaultdict(float)
    procs = [psutil.Process(root)] + psutil.Process(root).children(recursive=True)
    for p in procs:
        try:
            cmd = p.cmdline()
            name = next((w for w in cmd if w.startswith("ray::")), None) or p.name()
            if "cluster.process_executor" in cmd:
                name = MODEL_PROCESS
            t = p.cpu_times()
            out[name.split(".")[0] if name.startswith("ray::") else name] += t.user + t.system
        except psutil.Error:
            pass
    return out


def bench_prompt_ids(folder, n: int, input_len: int, output_len: int, seed: int) -> list[list[int]]:
    """The token ids of what `hybridserve bench --tokenizer folder --seed seed` sends (texts of exactly
    input_len tokens), so both sides of a point run the same prompts."""
    from router.bench.prompts import random_prompts
    from router.tokenizer import load_tokenizer

    tok = load_tokenizer(folder)
    return [tok.encode(p.text) for p in random_prompts(n, input_len, output_len, seed, tokenizer=tok)]


# ---- in-process ------------------------------------------------------------------------------------------
class InProcess:
    """The AsyncEngine (its default executor: the model in this process) fed directly by C workers."""

    def __init__(self, model: str, k: int, max_num_seqs: int, max_model_len: int, async_scheduling: bool = True):
        from router.engine import AsyncEngine
        from router.engine_config import EngineConfig

        self.engine = AsyncEngine(EngineConfig(model=model, num_speculative_tokens=k, max_num_seqs=max_num_seqs,
                                               max_model_len=max_model_len, speculative_policy="fixed",
                                               async_scheduling=async_scheduling))

    async def run(self, prompts: list[list[int]], concurrency: int, output_len: int, tag: str) -> dict:
        from model_shards.sampling_params import SamplingParams

        params = SamplingParams(max_tokens=output_len, ignore_eos=True, temperature=0.0)
        todo, toks, ttfts, tpots = list(enumerate(prompts)), [0], [], []

        async def worker():
            while todo:
                i, p = todo.pop(0)
                t0, first = time.perf_counter(), None
                async for out in self.engine.generate(f"{tag}{i}", p, params):
                    first = first or time.perf_counter()
                    toks[0] += len(out.new_token_ids)
                ttfts.append(first - t0)
                tpots.append((time.perf_counter() - first) / max(1, output_len - 1))
        steps0, t0 = self.engine.stats_.steps, time.perf_counter()
        await asyncio.gather(*[worker() for _ in range(concurrency)])
        secs, steps = time.perf_counter() - t0, self.engine.stats_.steps - steps0
        return dict(tok_s=toks[0] / secs, tokens_per_step=toks[0] / max(steps, 1),
                    ttft_ms=1e3 * statistics.median(ttfts), tpot_ms=1e3 * statistics.median(tpots))


# ---- served ----------------------------------------------------------------------------------------------
class Served:
    """`hybridserve bench` runs against a ServedCluster, each from its own process, with the CPU time every
    process of the server (and the client) spent."""

    def __init__(self, s: ServedCluster, model: str, concurrency: int, input_len: int, output_len: int,
                 seed: int, tmp: Path):
        from router.engine_config import resolve_checkpoint

        self.s, self.tmp = s, tmp
        self.bench = [sys.executable, "-m", "router.cli", "bench", "--base-url", s.url, "--input-len",
                      str(input_len), "--tokenizer", str(resolve_checkpoint(model)), "--output-len", str(output_len),
                      "--seed", str(seed), "--disable-tqdm", "--repeats", "1", "--num-warmups", "0",
                      "--concurrency", str(concurrency)]
        self.cpu_s: dict[str, float] = collections.defaultdict(float)     # summed over the timed runs
        self.tokens = 0

    def warm(self, num_prompts: int) -> None:
        subprocess.run(self.bench + ["--num-prompts", str(num_prompts)], check=True, capture_output=True)

    def run(self, num_prompts: int) -> dict:
        m0, c0 = self.s.metrics(), cpu_seconds(self.s.proc.pid)
        out = self.tmp / "b.json"
        with open(self.tmp / "bench.log", "w+") as client_log:
            client = subprocess.Popen(self.bench + ["--num-prompts", str(num_prompts), "--json", str(out)],
                                      stdout=subprocess.DEVNULL, stderr=client_log)
            client_cpu = 0.0
            while client.poll() is None:            # the client's own CPU, read before it exits
                try:
                    t = psutil.Process(client.pid).cpu_times()
                    client_cpu = t.user + t.system
                except psutil.Error:
                    pass
                time.sleep(0.2)
            if client.returncode:
                client_log.seek(0)
                raise RuntimeError(f"bench failed: {client_log.read()[-2000:]}")
        c1 = cpu_seconds(self.s.proc.pid)
        fig = {key: v["median"] for key, v in json.loads(out.read_text())["figures"].items()}
        for name in c1:
            self.cpu_s[name] += c1[name] - c0.get(name, 0.0)
        self.cpu_s["bench client (hybridserve bench)"] += client_cpu
        self.tokens += fig["total_output_tokens"]
        self.s.wait_until(lambda m: m.get("engine_steps_total", 0) > m0.get("engine_steps_total", 0) and
                          m.get("engine_generation_tokens_total", 0) - m0.get("engine_generation_tokens_total", 0)
                          >= fig["total_output_tokens"], 30, "the replica's report of this run")
        m1 = self.s.metrics()
        steps = m1.get("engine_steps_total", 0) - m0.get("engine_steps_total", 0)
        return dict(tok_s=fig["output_throughput"], ttft_ms=fig["ttft_median_ms"], tpot_ms=fig["tpot_median_ms"],
                    tokens_per_step=fig["total_output_tokens"] / max(steps, 1))

    def cpu_ms_per_token(self) -> dict[str, float]:
        return {name: 1e3 * secs / max(1, self.tokens) for name, secs in self.cpu_s.items()}

    def spy(self, num_prompts: int, seconds: float) -> dict[str, dict[str, float]]:
        """py-spy's split of a further, untimed run (its sampling takes CPU a timed run must not lose)."""
        spies = start_spies(self.s, self.tmp, seconds)
        if not spies:
            return {}
        subprocess.run(self.bench + ["--num-prompts", str(num_prompts)], check=True, capture_output=True)
        for p in spies.values():
            p.wait(timeout=seconds + 30)
        pieces = {}
        for cls in spies:
            if Path(self.tmp, f"{cls}.txt").exists():
                pieces[cls] = spy_pieces(Path(self.tmp, f"{cls}.txt"))
            else:
                print(f"[serve_profile] py-spy of {cls} gave nothing", file=sys.stderr)
        return pieces


async def measure_point(model: str, k: int, concurrency: int, num_prompts: int, input_len: int, output_len: int,
                        max_num_seqs: int, max_model_len: int, seed: int, rounds: int, spy_seconds: float,
                        async_scheduling: bool = True) -> dict:
    """Both sides up at once, timed rounds alternating between them (in-process first, then served
    first, ...), so a change in the machine's speed falls on both; per-round ratios and medians."""
    ip = InProcess(model, k, max_num_seqs, max_model_len, async_scheduling)
    await ip.engine.start()
    args = ("--model", model, "--num-speculative-tokens", str(k), "--speculative-policy", "fixed",
            "--async-scheduling" if async_scheduling else "--no-async-scheduling",
            "--max-num-seqs", str(max_num_seqs),
            "--max-model-len", str(max_model_len), "--max-queued-requests", str(max(64, num_prompts)))
    try:
        prompts = bench_prompt_ids(ip.engine.folder, num_prompts, input_len, output_len, seed)
        with ServedCluster(*args) as s, tempfile.TemporaryDirectory() as tmp:
            sv = Served(s, model, concurrency, input_len, output_len, seed, Path(tmp))
            await ip.run(prompts[:max(2, concurrency)], concurrency, output_len, "warm")
            await asyncio.to_thread(sv.warm, max(2, concurrency))
            ips, svs = [], []
            for r in range(rounds):
                for side in (("in", "served") if r % 2 == 0 else ("served", "in")):
                    if side == "in":
                        ips.append(await ip.run(prompts, concurrency, output_len, f"r{r}-"))
                    else:
                        svs.append(await asyncio.to_thread(sv.run, num_prompts))
            pieces = await asyncio.to_thread(sv.spy, num_prompts, spy_seconds) if spy_seconds > 0 else {}
    finally:
        await ip.engine.shutdown()
    med = lambda runs: {key: statistics.median(r[key] for r in runs) for key in runs[0]}    # noqa: E731
    return dict(in_process=med(ips), served=dict(med(svs), cpu_ms_per_token=sv.cpu_ms_per_token(), pieces=pieces),
                ratios=[b["tok_s"] / a["tok_s"] for a, b in zip(ips, svs)], rounds_tok_s=(ips, svs))


def start_spies(s: ServedCluster, folder: Path, seconds: float) -> dict[str, subprocess.Popen]:
    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if seconds <= 0 or not Path(spy).exists():
        return {}
    out = {}
    targets = {cls: s.actor_pids(f"ServeReplica:hybridserve:{cls}")[:1] for cls in ("ModelServer", "Ingress")}
    targets["model process"] = [p.pid for p in psutil.Process(s.proc.pid).children(recursive=True)
                                if "cluster.process_executor" in " ".join(p.cmdline())][:1]
    for cls, pids in targets.items():
        for pid in pids:
            out[cls] = subprocess.Popen([spy, "record", "-p", str(pid), "-d", str(max(1, round(seconds))), "-r", "100", "-f", "raw",
                                         "-o", str(folder / f"{cls}.txt"), "--nonblocking"],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return out


# ---- report ----------------------------------------------------------------------------------------------
def report(points: list[dict], cmd: str) -> str:
    rows = []
    for p in points:
        i, s, r = p["in_process"], p["served"], p["ratios"]
        rows.append([p["label"], i["tok_s"], s["tok_s"], f"{statistics.median(r):.3f} ({min(r):.3f}-{max(r):.3f})",
                     i["tokens_per_step"], s["tokens_per_step"], i["ttft_ms"], s["ttft_ms"], i["tpot_ms"],
                     s["tpot_ms"]])
    rounds = len(points[0]["ratios"]) if points else 0
    out = [f"## Where a served request's time goes (`{cmd}`)", "",
           f"Machine: {machine()}. Closed loop: each point sends its prompts with at most C in flight, greedy, "
           "EOS ignored; in-process = the AsyncEngine fed directly in one process; served = `hybridserve serve` "
           "(Ray Serve: the ingress replica serving HTTP, the model replica, its model process) driven by "
           "`hybridserve bench` over HTTP from its own process. Both sides are up at once and their timed "
           f"rounds alternate ({rounds} each, in-process first in even rounds, served first in odd ones); "
           "figures are medians over rounds, the ratio is per round (median, min-max).", "",
           table(["point", "in-process tok/s", "served tok/s", "served / in-process, per round",
                  "in-process tokens per step", "served tokens per step", "in-process TTFT p50 ms",
                  "served TTFT p50 ms", "in-process TPOT p50 ms", "served TPOT p50 ms"], rows), ""]
    by_k = {p["k"]: p for p in points if p["c"] == 1}
    if 0 in by_k and len(by_k) > 1:
        k = max(by_k)
        e2e = by_k[k]["served"]["tok_s"] / by_k[0]["served"]["tok_s"]
        eng = by_k[k]["in_process"]["tok_s"] / by_k[0]["in_process"]["tok_s"]
        out += [f"MTP k={k} at one stream: {eng:.2f}x in-process, {e2e:.2f}x served ({e2e / eng:.2f} of the "
                "in-engine speed-up survives the serving path).", ""]
    names = sorted({n for p in points for n in p["served"]["cpu_ms_per_token"]},
                   key=lambda n: -max(p["served"]["cpu_ms_per_token"].get(n, 0) for p in points))
    names = [n for n in names if max(p["served"]["cpu_ms_per_token"].get(n, 0) for p in points) >= 0.01]
    out += ["CPU time per output token (ms) by process, served runs (2 cores = 2 CPU-seconds per second):", "",
            table(["process"] + [p["label"] for p in points],
                  [[n] + [p["served"]["cpu_ms_per_token"].get(n, 0.0) for p in points] for n in names]), ""]
    out += ["How to read the py-spy tables: the share of each process's sampled stacks whose innermost "
            "frame of ours (or of Ray, FastAPI, uvicorn) falls in a piece. \"native code under a thread's "
            "frame\" is mostly threads blocked in C (Ray's core-worker threads, pool workers waiting for "
            "work) that py-spy's non-blocking sampling cannot tell from busy ones.", ""]
    for cls in ("model process", "ModelServer", "Ingress"):
        pieces = sorted({k for p in points for k in p["served"]["pieces"].get(cls, {})})
        if not pieces:
            continue
        where = cls if cls == "model process" else f"{cls} replica's process"
        out += [f"Inside the {where} (py-spy samples of its busy threads, share of samples):", "",
                table(["piece"] + [p["label"] for p in points],
                      [[k] + [f"{100 * p['served']['pieces'].get(cls, {}).get(k, 0.0):.0f}%" for p in points]
                       for k in pieces]), ""]
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--concurrency", default="1,32")
    ap.add_argument("--mtp", default="0,3", help="num_speculative_tokens values; MTP runs at one stream only")
    ap.add_argument("--input-len", type=int, default=64)
    ap.add_argument("--output-len", type=int, default=128, help="new tokens per request (issue 12's workload)")
    ap.add_argument("--prompts-per-stream", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=3, help="timed rounds of each side, alternating")
    ap.add_argument("--spy-seconds", type=float, default=6.0, help="py-spy sampling per served point (0: off)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-async-scheduling", dest="async_scheduling", action="store_false",
                    help="both sides without look-ahead (router/scheduler.py), to see what it does")
    ap.add_argument("--no-write", action="store_true")
    a = ap.parse_args()
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    conc = [int(x) for x in a.concurrency.split(",")]
    ks = [int(x) for x in a.mtp.split(",")]
    max_seqs, max_len = max(conc), a.input_len + a.output_len + 16
    points = []
    for k in ks:
        for c in (conc if k == 0 else [1]):
            n = max(8, a.prompts_per_stream * c)
            label = f"{c} stream{'s' if c > 1 else ''}" + (f", MTP k={k}" if k else "")
            print(f"[serve_profile] {label}: {a.rounds} rounds of each side ...", flush=True)
            point = asyncio.run(measure_point(a.model, k, c, n, a.input_len, a.output_len, max_seqs, max_len,
                                              a.seed, a.rounds, a.spy_seconds, a.async_scheduling))
            points.append(dict(label=label, k=k, c=c, **point))
    cmd = "python -m benchmarks.serve_profile" + "".join(f" {x}" for x in sys.argv[1:] if x != "--no-write")
    publish("serve-profile", report(points, cmd), not a.no_write)


if __name__ == "__main__":
    main()
