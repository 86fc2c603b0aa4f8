"""Where a served request's time goes: `python -m benchmarks.serve_profile`.

The same closed-loop workload (prompts of --input-len tokens, --output-len new tokens each, greedy, EOS
ignored, at most C in flight) runs twice, side by side in one run:
  1. in-process: the AsyncEngine with the whole model in this process, fed directly;
  2. served: `hybridserve serve` with the same engine settings, driven over HTTP by `hybridserve bench`
     (streaming /v1/completions) from its own process.
For the served run it reports the CPU time each process of the server (and the bench client) spent per
output token, the engine's steps and tokens per step (from /metrics), and, when py-spy is installed, from
a second, untimed run of the same workload (py-spy's sampling takes CPU), a sampled split of the model replica's and the ingress's time into pieces (model forward, tail, engine
loop, Ray Serve streaming, HTTP and SSE, ...). Prints tables and writes docs/BENCHMARKS.md
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
async def in_process(model: str, k: int, concurrency: int, num_prompts: int, input_len: int, output_len: int,
                     max_num_seqs: int, max_model_len: int, seed: int) -> dict:
    from model_shards.sampling_params import SamplingParams
    from router.engine import AsyncEngine
    from router.engine_config import EngineConfig

    engine = AsyncEngine(EngineConfig(model=model, num_speculative_tokens=k, max_num_seqs=max_num_seqs,
                                      max_model_len=max_model_len, speculative_policy="fixed"))
    await engine.start()
    prompts = bench_prompt_ids(engine.folder, num_prompts, input_len, output_len, seed)
    params = SamplingParams(max_tokens=output_len, ignore_eos=True, temperature=0.0)
    try:
        async def run(batch, tag):
            todo, done = list(enumerate(batch)), [0]

            async def worker():
                while todo:
                    i, p = todo.pop(0)
                    async for out in engine.generate(f"{tag}{i}", p, params):
                        done[0] += len(out.new_token_ids)
            t0 = time.perf_counter()
            await asyncio.gather(*[worker() for _ in range(concurrency)])
            return done[0], time.perf_counter() - t0
        await run(prompts[:max(2, concurrency)], "warm")
        steps0, busy0 = engine.stats_.steps, engine.executor.worker.busy_s
        toks, secs = await run(prompts, "p")
        steps = engine.stats_.steps - steps0
        return dict(tok_s=toks / secs, steps=steps, tokens_per_step=toks / max(steps, 1),
                    busy=(engine.executor.worker.busy_s - busy0) / secs)
    finally:
        await engine.shutdown()


# ---- served ----------------------------------------------------------------------------------------------
def served(model: str, k: int, concurrency: int, num_prompts: int, input_len: int, output_len: int,
           max_num_seqs: int, max_model_len: int, seed: int, spy_seconds: float) -> dict:
    args = ("--model", model, "--num-speculative-tokens", str(k), "--speculative-policy", "fixed",
            "--max-num-seqs", str(max_num_seqs),
            "--max-model-len", str(max_model_len), "--max-queued-requests", str(max(64, num_prompts)))
    with ServedCluster(*args) as s, tempfile.TemporaryDirectory() as tmp:
        from router.engine_config import resolve_checkpoint

        bench = [sys.executable, "-m", "router.cli", "bench", "--base-url", s.url, "--input-len", str(input_len),
                 "--tokenizer", str(resolve_checkpoint(model)),
                 "--output-len", str(output_len), "--seed", str(seed), "--disable-tqdm", "--repeats", "1",
                 "--num-warmups", "0", "--concurrency", str(concurrency)]
        subprocess.run(bench + ["--num-prompts", str(max(2, concurrency))], check=True, capture_output=True)
        m0, c0 = s.metrics(), cpu_seconds(s.proc.pid)
        client_log = open(Path(tmp, "bench.log"), "w+")
        client = subprocess.Popen(bench + ["--num-prompts", str(num_prompts), "--json", f"{tmp}/b.json"],
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
        c1 = cpu_seconds(s.proc.pid)
        time.sleep(1.2)                          # replicas report their counters twice a second
        m1 = s.metrics()
        if spy_seconds > 0:                      # the sampled pieces come from a second, untimed run: py-spy
            spies = start_spies(s, Path(tmp), spy_seconds)   # takes CPU the timed run must not lose
            subprocess.run(bench + ["--num-prompts", str(num_prompts)], check=True, capture_output=True)
            for p in spies.values():
                p.wait(timeout=spy_seconds + 30)
        else:
            spies = {}
        result = json.loads(Path(tmp, "b.json").read_text())
        fig = {key: v["median"] for key, v in result["figures"].items()}
        toks = fig["total_output_tokens"]
        cpu = {name: 1e3 * (c1[name] - c0.get(name, 0.0)) / toks for name in c1}
        cpu["bench client (hybridserve bench)"] = 1e3 * client_cpu / toks
        steps = m1.get("engine_steps_total", 0) - m0.get("engine_steps_total", 0)
        pieces = {}
        for cls, p in spies.items():
            if Path(tmp, f"{cls}.txt").exists():
                pieces[cls] = spy_pieces(Path(tmp, f"{cls}.txt"))
            else:
                print(f"[serve_profile] py-spy of {cls} gave nothing", file=sys.stderr)
        return dict(tok_s=fig["output_throughput"], ttft_ms=fig["ttft_median_ms"], tpot_ms=fig["tpot_median_ms"],
                    steps=steps, tokens_per_step=toks / max(steps, 1), cpu_ms_per_token=cpu, pieces=pieces)


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
        i, s = p["in_process"], p["served"]
        rows.append([p["label"], i["tok_s"], s["tok_s"], s["tok_s"] / i["tok_s"], i["tokens_per_step"],
                     s["tokens_per_step"], s["ttft_ms"], s["tpot_ms"]])
    out = [f"## Where a served request's time goes (`{cmd}`)", "",
           f"Machine: {machine()}. Closed loop: each point sends its prompts with at most C in flight, greedy, "
           "EOS ignored; in-process = the AsyncEngine fed directly in one process; served = `hybridserve serve` "
           "(Ray Serve: the ingress replica serving HTTP, the model replica, its model process) driven by "
           "`hybridserve bench` over HTTP from its own process.", "",
           table(["point", "in-process tok/s", "served tok/s", "served / in-process", "in-process tokens per step",
                  "served tokens per step", "served TTFT p50 ms", "served TPOT p50 ms"], rows), ""]
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
    ap.add_argument("--output-len", type=int, default=48)
    ap.add_argument("--prompts-per-stream", type=int, default=4)
    ap.add_argument("--spy-seconds", type=float, default=6.0, help="py-spy sampling per served point (0: off)")
    ap.add_argument("--seed", type=int, default=0)
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
            common = (a.model, k, c, n, a.input_len, a.output_len, max_seqs, max_len, a.seed)
            label = f"{c} stream{'s' if c > 1 else ''}" + (f", MTP k={k}" if k else "")
            print(f"[serve_profile] {label}: in-process ...", flush=True)
            ip = asyncio.run(in_process(*common))
            print(f"[serve_profile] {label}: served ...", flush=True)
            sv = served(*common, a.spy_seconds)
            points.append(dict(label=label, k=k, c=c, in_process=ip, served=sv))
    cmd = "python -m benchmarks.serve_profile" + "".join(f" {x}" for x in sys.argv[1:] if x != "--no-write")
    publish("serve-profile", report(points, cmd), not a.no_write)


if __name__ == "__main__":
    main()
