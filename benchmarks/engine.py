"""Engine throughput and overhead, side by side in one run (CPU): `python -m benchmarks.engine`.

Measures (same model, same prompts, greedy, ignore_eos):
  1. output tokens/s at 1, 8, 32 concurrent sequences: single-process engine vs Ray (pp=2, ep=2);
  2. per-step orchestration overhead: engine-loop time (schedule + apply result) per pass, and for
     the Ray replica the transport share of a pass (pass wall time minus the stages' compute);
  3. MTP on (k=3) vs off, single process;
  4. pipeline degree 2 with one vs two micro-batches in flight;
  5. single process without look-ahead (`async_scheduling=False`: each pass planned after the last
     one's result is applied).
Prints a table and writes it to docs/BENCHMARKS.md. Not a test: the numbers depend on the machine.
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import os
import random
import statistics
import time

from model_shards.sampling_params import SamplingParams
from router.engine import AsyncEngine
from router.engine_config import EngineConfig

from .common import machine, publish, run_batch, table


def prompts_for(n, length, seed=0, vocab=250):
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(length)] for _ in range(n)]


async def measure(cfg: EngineConfig, concurrency: list[int], max_tokens: int, k=None, prompt_len=32):
    engine = AsyncEngine(cfg)
    vocab = min(engine.model_config.vocab_size, 4000)
    await engine.start()
    rows = {}
    try:
        params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
        await run_batch(engine, prompts_for(2, 8, 99, vocab), SamplingParams(max_tokens=4, ignore_eos=True), k, "warm")
        for n in concurrency:
            engine.step_times.clear()
            engine.loop_overhead_s, steps0 = 0.0, engine.stats_.steps
            before = _busy(engine)
            toks, secs, outs = await run_batch(engine, prompts_for(n, prompt_len, n, vocab), params, k, f"c{n}-")
            steps = engine.stats_.steps - steps0
            busy = _busy(engine) - before
            rows[n] = dict(tok_s=toks / secs, secs=secs, steps=steps,
                           loop_ms=1e3 * engine.loop_overhead_s / max(steps, 1),
                           pass_ms=1e3 * statistics.mean(engine.step_times) if engine.step_times else 0.0,
                           busy_ms=1e3 * busy / max(steps, 1), outs=outs,
                           accept=_accept_len(engine))
    finally:
        await engine.shutdown()
    return rows


def _busy(engine) -> float:
    ex = engine.executor
    if hasattr(ex, "worker"):
        return ex.worker.busy_s
    return sum(s["busy_s"] for s in ex.stats())


def _accept_len(engine) -> float:
    s = engine.stats()
    passes = s.drafted_per_position[0] if s.drafted_per_position else 0
    return 1 + sum(s.accepted_per_position) / passes if passes else 1.0


def actor_call_overhead(passes: int = 100) -> tuple[float, float]:
    """ms per pass through a chain of two trivial stage actors: plain actor calls vs a Ray Compiled Graph."""
    import ray
    import torch
    from ray.dag import InputNode

    @ray.remote(num_cpus=0.25)
    class Stage:
        def run(self, plan, h=None):
            return torch.ones(16, 256) if h is None else h + 1

    a, b = Stage.remote(), Stage.remote()
    plan = b"x" * 200
    ray.get(b.run.remote(plan, a.run.remote(plan)))
    t0 = time.perf_counter()
    for _ in range(passes):
        ray.get(b.run.remote(plan, a.run.remote(plan)))
    plain = (time.perf_counter() - t0) / passes * 1e3
    with InputNode() as inp:
        dag = b.run.bind(inp, a.run.bind(inp))
    compiled = dag.experimental_compile()
    ray.get(compiled.execute(plan))
    t0 = time.perf_counter()
    for _ in range(passes):
        ray.get(compiled.execute(plan))
    cg = (time.perf_counter() - t0) / passes * 1e3
    compiled.teardown()
    for actor in (a, b):
        ray.kill(actor)
    return plain, cg


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--concurrency", default="1,8,32")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    conc = [int(x) for x in args.concurrency.split(",")]
    import ray
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    ray.init(num_cpus=16, include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1")
    # MTP off unless a row says k=3 (fixed: k drafts every step, as these rows have always measured).
    base = dict(model=args.model, max_model_len=512, max_num_seqs=max(conc), max_num_batched_tokens=1024,
                num_speculative_tokens=0)

    single = asyncio.run(measure(EngineConfig(**base), conc, args.max_tokens))
    no_ahead = asyncio.run(measure(EngineConfig(**base, async_scheduling=False), conc, args.max_tokens))
    ray22 = asyncio.run(measure(EngineConfig(**base, use_ray=True, pipeline_parallel_size=2,
                                             expert_parallel_size=2), conc, args.max_tokens))
    big = max(conc)
    mtp = asyncio.run(measure(EngineConfig(**{**base, "num_speculative_tokens": 3}, speculative_policy="fixed"),
                              [1, big], args.max_tokens, k=3))
    pp1mb = asyncio.run(measure(EngineConfig(**base, use_ray=True, pipeline_parallel_size=2, num_microbatches=1),
                                [big], args.max_tokens))
    pp2mb = asyncio.run(measure(EngineConfig(**base, use_ray=True, pipeline_parallel_size=2, num_microbatches=2),
                                [big], args.max_tokens))
    plain_ms, compiled_ms = actor_call_overhead()
    ray.shutdown()

    same = all(single[n]["outs"] == ray22[n]["outs"] == no_ahead[n]["outs"] for n in conc) and mtp[big]["outs"] == single[big]["outs"]
    rows = []
    for n in conc:
        rows.append([f"single process, {n} seqs", single[n]["tok_s"], 1.0, single[n]["loop_ms"], single[n]["pass_ms"],
                     single[n]["pass_ms"] - single[n]["busy_ms"]])
        rows.append([f"single process without look-ahead, {n} seqs", no_ahead[n]["tok_s"],
                     no_ahead[n]["tok_s"] / single[n]["tok_s"], no_ahead[n]["loop_ms"], no_ahead[n]["pass_ms"],
                     no_ahead[n]["pass_ms"] - no_ahead[n]["busy_ms"]])
        rows.append([f"Ray pp=2 ep=2, {n} seqs", ray22[n]["tok_s"], ray22[n]["tok_s"] / single[n]["tok_s"],
                     ray22[n]["loop_ms"], ray22[n]["pass_ms"], ray22[n]["pass_ms"] - ray22[n]["busy_ms"] / 2])
    for n in (1, big):
        rows.append([f"single process MTP k=3, {n} seqs (accept len {mtp[n]['accept']:.2f})", mtp[n]["tok_s"],
                     mtp[n]["tok_s"] / single[n]["tok_s"], mtp[n]["loop_ms"], mtp[n]["pass_ms"],
                     mtp[n]["pass_ms"] - mtp[n]["busy_ms"]])
    rows.append([f"Ray pp=2, 1 micro-batch, {big} seqs", pp1mb[big]["tok_s"], pp1mb[big]["tok_s"] / single[big]["tok_s"],
                 pp1mb[big]["loop_ms"], pp1mb[big]["pass_ms"], pp1mb[big]["pass_ms"] - pp1mb[big]["busy_ms"] / 2])
    rows.append([f"Ray pp=2, 2 micro-batches, {big} seqs", pp2mb[big]["tok_s"], pp2mb[big]["tok_s"] / single[big]["tok_s"],
                 pp2mb[big]["loop_ms"], pp2mb[big]["pass_ms"], pp2mb[big]["pass_ms"] - pp2mb[big]["busy_ms"] / 2])
    headers = ["setup", "output tok/s", "x single process", "engine loop ms/pass", "pass wall ms",
               "pass ms not computing (transport, waits)"]
    body = (f"## Engine (`python -m benchmarks.engine --model {args.model}`)\n\n"
            f"Machine: {machine()}; {args.max_tokens} new tokens per sequence, 32-token prompts, greedy. "
            f"Greedy tokens identical across setups: {same}.\n\n" + table(headers, rows) +
            "\n\n*engine loop ms/pass*: time the engine loop spends scheduling and applying a result (the "
            "orchestration overhead per step). *pass ms not computing*: a pass's wall time minus the "
            "compute time of one stage (Ray: the stages' mean), i.e. transport and queueing.\n\n"
            f"Ray Compiled Graphs, tried on a chain of two trivial stage actors (16x256 hidden): plain actor "
            f"calls {plain_ms:.2f} ms per pass, compiled graph {compiled_ms:.2f} ms per pass.\n")
    publish("engine", body, write=not args.no_write)


if __name__ == "__main__":
    main()
