"""Where a pass's time goes inside the running engine, MTP off vs k = 3, at one sequence:
`python -m benchmarks.engine_profile`.

pass_anatomy.py times pieces alone with warm weights; this wraps the engine worker's own methods (a
timer around each call, ~1 us each) while the engine serves held-out prompts one at a time, so the
figures include what a real pass pays: weights evicted by the rest of the model, the request's prefill,
Python around each piece. Per pass = total over the run / passes (a request's prefill is one of them).
It only wraps methods by name, so it also runs on earlier commits of this repo (copy the file there).
Prints a table and writes docs/BENCHMARKS.md (section "engine-profile"). Not a test.
"""
from __future__ import annotations

import argparse
import asyncio
import collections
import functools
import logging
import time

from model_shards.sampling_params import SamplingParams
from router.engine import AsyncEngine
from router.engine_config import EngineConfig, resolve_checkpoint

from .common import machine, publish, run_batch, table
from .mtp import heldout_prompts

TOTAL: dict[str, float] = collections.defaultdict(float)


def _timed(name: str, fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            TOTAL[name] += time.perf_counter() - t0
    return wrapper


def _instrument(engine) -> None:
    """Timers around the worker's pass, the model's pieces and each layer kind's blocks."""
    import model_shards.tail as tail
    worker = engine.executor.worker
    model, cache = worker.model, worker.cache
    worker.execute = _timed("whole pass (worker)", worker.execute)
    cache.commit_many = _timed("commit of last pass's Mamba states", cache.commit_many)
    model.logits = _timed("logits (norm_f + lm_head)", model.logits)
    tail._mtp_draft = _timed("MTP drafting (all of it)", tail._mtp_draft)
    kinds = {"M": "Mamba layers", "*": "attention layers", "E": "MoE layers"}
    for layer in model.backbone.layers.values():
        layer.forward = _timed(kinds[layer.kind], layer.forward)


async def run(args) -> tuple[list[list], float]:
    folder = resolve_checkpoint(args.model)
    prompts = heldout_prompts(folder, args.prompts, args.prompt_len)
    engine = AsyncEngine(EngineConfig(model=str(folder), num_speculative_tokens=3, max_model_len=1024,
                                      max_num_seqs=4, max_num_batched_tokens=2048, torch_threads=1,
                                      speculative_policy="fixed"))
    await engine.start()
    try:
        _instrument(engine)
        greedy = SamplingParams(max_tokens=args.max_tokens, ignore_eos=True)
        for k in (0, 3):                                           # warm both paths
            await run_batch(engine, prompts[:1], greedy, k, f"warm{k}-")
        per_pass, rate = {}, {}
        for k in (0, 3):
            TOTAL.clear()
            steps0, tokens, seconds = engine.executor.worker.num_steps, 0, 0.0
            for i, p in enumerate(prompts):
                n, s, _ = await run_batch(engine, [p], greedy, k, f"k{k}-{i}-")
                tokens, seconds = tokens + n, seconds + s
            passes = engine.executor.worker.num_steps - steps0
            per_pass[k] = {name: 1e3 * t / passes for name, t in TOTAL.items()}
            per_pass[k]["engine wall per pass"] = 1e3 * seconds / passes
            rate[k] = tokens / seconds
    finally:
        await engine.shutdown()
    names = ["engine wall per pass", "whole pass (worker)", "Mamba layers", "MoE layers", "attention layers",
             "logits (norm_f + lm_head)", "MTP drafting (all of it)", "commit of last pass's Mamba states"]
    step = per_pass[0]["whole pass (worker)"]
    rows = [[n, per_pass[0].get(n, 0.0), per_pass[3].get(n, 0.0), per_pass[3].get(n, 0.0) / step] for n in names]
    return rows, rate[3] / rate[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    rows, speedup = asyncio.run(run(args))
    body = (f"## Inside an engine pass (`python -m benchmarks.engine_profile --model {args.model}`)\n\n"
            f"Machine: {machine()}; one sequence at a time, {args.prompts} held-out prompts of {args.prompt_len} "
            f"tokens, {args.max_tokens} new tokens, greedy; ms per pass (a request's prefill is one of its "
            "passes), timers around the engine worker's own methods.\n\n"
            + table(["piece", "MTP off: ms per pass", "k=3: ms per pass", "k=3: in decode steps (MTP-off passes)"], rows)
            + f"\n\nSpeedup k=3 over MTP off in this run (tokens/s ratio, the same {args.prompts} prompts): "
            f"{speedup:.2f}x. Layers include their pre-norm and residual; MTP drafting includes the MTP "
            "catch-up over the settled tokens and k-1 recursive steps.\n")
    publish("engine-profile", body, write=not args.no_write)


if __name__ == "__main__":
    main()
