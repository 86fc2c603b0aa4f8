"""Where a pass's time goes inside the running engine, MTP off vs k = 3, fused blocks on and off, at one sequence,
and op by op in a decode pass of many sequences: `python -m benchmarks.engine_profile`.

pass_anatomy.py times pieces alone with warm weights; this wraps the engine worker's own methods (a
timer around each call, ~1 us each) while the engine serves held-out prompts one at a time, so the
figures include what a real pass pays: weights evicted by the rest of the model, the request's prefill,
Python around each piece. Per pass = total over the run / passes (a request's prefill is one of them).
It only wraps methods by name, so it also runs on earlier commits of this repo (copy the file there).
The batch table times every kernel entry point the model calls (kernels/ops.py; the outermost call
only, so nested ones are not counted twice) and every fused block (one C call) in the decode passes of
--batch sequences decoding together, MTP off, with the fused blocks and without them; what a pass spends
outside them is Python and torch glue.
Prints tables and writes docs/BENCHMARKS.md (section "engine-profile"). Not a test.
"""
from __future__ import annotations

import argparse
import asyncio
import collections
import functools
import logging
import time

from kernels.fast import blocks as fused
from model_shards import fused_blocks
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


def _timed_op(name: str, fn, depth=[0]):
    """Like _timed, for kernel entry points: only the outermost of nested calls counts."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if depth[0]:
            return fn(*args, **kwargs)
        depth[0] += 1
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            depth[0] -= 1
            TOTAL[name] += time.perf_counter() - t0
    return wrapper


async def run_batch_profile(args, fused_on: bool = True) -> tuple[list[list], int, float]:
    """ms per decode pass of `args.batch` sequences, by kernel entry point (rows), passes, tokens/s; with
    the fused blocks (each block one C call: a row of its own) or without them (the modules' ops)."""
    from kernels import ops
    folder = resolve_checkpoint(args.model)
    prompts = heldout_prompts(folder, args.batch, args.prompt_len)
    engine = AsyncEngine(EngineConfig(model=str(folder), num_speculative_tokens=0, max_model_len=1024,
                                      max_num_seqs=args.batch, max_num_batched_tokens=4096, torch_threads=1))
    await engine.start()
    fused_blocks.ENABLED = fused_on
    blocks: dict = {}
    saved = {n: getattr(ops, n) for n in dir(ops) if not n.startswith("_") and callable(getattr(ops, n))
             and getattr(getattr(ops, n), "__module__", "").startswith("kernels.")}   # re-exports too (linear)
    try:
        greedy = SamplingParams(max_tokens=args.max_tokens, ignore_eos=True)
        await run_batch(engine, prompts, SamplingParams(max_tokens=4, ignore_eos=True), 0, "warm-")
        for n, fn in saved.items():
            setattr(ops, n, _timed_op(f"ops.{n}", fn))
        blocks = {cls: cls.__call__ for cls in (fused.MoEBlock, fused.MambaBlock, fused.AttentionBlock)}
        for cls, fn in blocks.items():                # a fused block is one C call: its own row
            cls.__call__ = _timed_op(f"fused block: {cls.__name__} (one C call)", fn)
        worker, counted = engine.executor.worker, [0]
        inner = worker.execute

        def execute(plan, hidden=None):              # count decode passes of the whole batch only
            before = dict(TOTAL)
            t0 = time.perf_counter()
            try:
                return inner(plan, hidden)
            finally:
                if len(plan.seqs) == args.batch and all(st.num_tokens == 1 for st in plan.seqs):
                    TOTAL["whole pass (worker)"] += time.perf_counter() - t0
                    counted[0] += 1
                else:
                    TOTAL.clear()
                    TOTAL.update(before)
        worker.execute = execute
        TOTAL.clear()
        n, sec, _ = await run_batch(engine, prompts, greedy, 0, "batch-")
    finally:
        for name, fn in saved.items():
            setattr(ops, name, fn)
        for cls, fn in blocks.items():
            cls.__call__ = fn
        fused_blocks.ENABLED = True
        await engine.shutdown()
    passes = max(1, counted[0])
    whole = 1e3 * TOTAL.pop("whole pass (worker)", 0.0) / passes
    rows = sorted(([name, 1e3 * t / passes, 1e3 * t / passes / whole] for name, t in TOTAL.items()),
                  key=lambda r: -r[1])
    rest = whole - sum(r[1] for r in rows)
    rows = [["whole decode pass (worker)", whole, 1.0]] + rows + \
        [["the rest: Python and torch glue (layer modules, views, the plan to tensors, sampling)", rest, rest / whole]]
    return rows, passes, n / sec


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
        modes = [(0, True), (3, True), (0, False), (3, False)]    # (k, fused blocks)
        for k, on in modes:                                        # warm every path
            fused_blocks.ENABLED = on
            await run_batch(engine, prompts[:1], greedy, k, f"warm{k}{on}-")
        totals = {m: collections.defaultdict(float) for m in modes}
        passes, tokens, seconds = dict.fromkeys(modes, 0), dict.fromkeys(modes, 0), dict.fromkeys(modes, 0.0)
        for i, p in enumerate(prompts):                            # the modes interleaved, prompt by prompt
            for k, on in (modes if i % 2 == 0 else modes[::-1]):
                fused_blocks.ENABLED = on
                TOTAL.clear()
                steps0 = engine.executor.worker.num_steps
                n, sec, _ = await run_batch(engine, [p], greedy, k, f"k{k}{on}-{i}-")
                passes[k, on] += engine.executor.worker.num_steps - steps0
                tokens[k, on], seconds[k, on] = tokens[k, on] + n, seconds[k, on] + sec
                for name, t in TOTAL.items():
                    totals[k, on][name] += t
    finally:
        fused_blocks.ENABLED = True
        await engine.shutdown()
    per_pass = {m: {name: 1e3 * t / passes[m] for name, t in totals[m].items()} for m in modes}
    for m in modes:
        per_pass[m]["engine wall per pass"] = 1e3 * seconds[m] / passes[m]
    rate = {m: tokens[m] / seconds[m] for m in modes}
    names = ["engine wall per pass", "whole pass (worker)", "Mamba layers", "MoE layers", "attention layers",
             "logits (norm_f + lm_head)", "MTP drafting (all of it)", "commit of last pass's Mamba states"]
    step = per_pass[0, True]["whole pass (worker)"]
    rows = [[n, per_pass[0, True].get(n, 0.0), per_pass[3, True].get(n, 0.0), per_pass[3, True].get(n, 0.0) / step,
             per_pass[0, False].get(n, 0.0), per_pass[3, False].get(n, 0.0)] for n in names]
    ratios = {"k=3 over MTP off": rate[3, True] / rate[0, True],
              "k=3 over MTP off, blocks unfused": rate[3, False] / rate[0, False],
              "fused blocks over unfused, MTP off": rate[0, True] / rate[0, False],
              "fused blocks over unfused, k=3": rate[3, True] / rate[3, False]}
    return rows, ratios


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--batch", type=int, default=32, help="sequences decoding together in the op-by-op table")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    rows, ratios = asyncio.run(run(args))
    batch_rows, batch_passes, batch_tok_s = asyncio.run(run_batch_profile(args))
    unfused_rows, _, unfused_tok_s = asyncio.run(run_batch_profile(args, fused_on=False))
    batch_rows = ([[f"fused blocks: {r[0]}", *r[1:]] for r in batch_rows]
                  + [[f"without them: {r[0]}", *r[1:]] for r in unfused_rows])
    body = (f"## Inside an engine pass (`python -m benchmarks.engine_profile --model {args.model}`)\n\n"
            f"Machine: {machine()}; one sequence at a time, {args.prompts} held-out prompts of {args.prompt_len} "
            f"tokens, {args.max_tokens} new tokens, greedy; ms per pass (a request's prefill is one of its "
            "passes), timers around the engine worker's own methods. Four modes, interleaved prompt by prompt: "
            "MTP off and k=3, each with the fused blocks (the default; docs/KERNELS.md) and with "
            "`HYBRIDSERVE_FUSED_BLOCKS=0`'s unfused modules.\n\n"
            + table(["piece", "MTP off: ms per pass", "k=3: ms per pass", "k=3: in decode steps (MTP-off passes)",
                     "MTP off, unfused: ms per pass", "k=3, unfused: ms per pass"], rows)
            + f"\n\nTokens/s ratios in this run (the same {args.prompts} prompts): "
            + "; ".join(f"{name} {r:.2f}x" for name, r in ratios.items())
            + ". Layers include their pre-norm and residual; MTP drafting includes the MTP "
            "catch-up over the settled tokens and k-1 recursive steps.\n\n"
            f"Op by op, {args.batch} sequences decoding together (MTP off, {args.batch} held-out prompts at once, "
            f"{args.max_tokens} new tokens each; {batch_passes} decode passes of all {args.batch} timed, prefill passes "
            f"left out; {batch_tok_s:.0f} output tok/s over the whole run with the timers on); one torch thread. "
            "With the fused blocks (the default) each block is one C call, its own row; \"without them\" is a "
            f"second run ({unfused_tok_s:.0f} tok/s) with `HYBRIDSERVE_FUSED_BLOCKS=0`, where the modules call "
            "kernels/ops.py's entry points (`linear`: the dense products; `grouped_experts`: the routed experts; "
            "`mamba_decode_`: conv + SSM state update of every sequence, one native call per layer; "
            "`paged_attention_`: KV write + attention), the kernels the fused blocks call from C.\n\n"
            + table(["piece", "ms per pass", "share of that run's pass"], batch_rows) + "\n")
    publish("engine-profile", body, write=not args.no_write)


if __name__ == "__main__":
    main()
