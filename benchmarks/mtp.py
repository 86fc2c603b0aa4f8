"""MTP speculative decoding through the engine, on held-out code prompts: `python -m benchmarks.mtp`.

Side by side in one run (CPU, the shipped default model):
  1. mean acceptance length (tokens per verification pass = 1 + accepted drafts) at k = 1..4,
     greedy and at temperature 0.7 (fixed k);
  2. output tokens/s with MTP off, fixed k = 1..4 and the adaptive policy (router/spec_policy.py, at most
     3 drafts: what `hybridserve serve` runs by default) at 1, 4, 16 and 32 concurrent sequences, in the
     single-process engine and on `-pp 2 -ep 2` (Ray: two stage actors with two expert shards each), and
     whether the greedy text is identical in every mode.
Held-out prompts: the stdlib files the training recipe held out (training/corpus.py), tokenized with
the checkpoint's own tokenizer. Prints the tables and writes docs/BENCHMARKS.md. Not a test.
"""
from __future__ import annotations

import argparse
import asyncio
import logging

import numpy as np
from tokenizers import Tokenizer

from model_shards.sampling_params import SamplingParams
from router.engine import AsyncEngine
from router.engine_config import EngineConfig, resolve_checkpoint
from training import corpus
from training.acceptance import code_prompts
from training.tokenizer import BOS_ID, EOS_ID

from . import pass_anatomy
from .common import machine, publish, run_batch, table


def heldout_prompts(folder, count: int, length: int) -> list[list[int]]:
    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    _, held = corpus.split(corpus.read_texts(corpus.list_files()))
    stream = corpus.encode_stream(tok, held, BOS_ID, EOS_ID)
    return code_prompts(np.asarray(stream), count, length)


async def acceptance(engine, prompts, k, temperature, max_tokens) -> float:
    s = engine.stats()
    d0, a0 = s.drafted_per_position[0], sum(s.accepted_per_position)
    params = [SamplingParams(max_tokens=max_tokens, temperature=temperature, seed=i, ignore_eos=True)
              for i in range(len(prompts))]

    async def one(i, p):
        async for _ in engine.generate(f"acc-k{k}-t{temperature}-{i}", p, params[i], k):
            pass
    await asyncio.gather(*[one(i, p) for i, p in enumerate(prompts)])
    s = engine.stats()
    passes = s.drafted_per_position[0] - d0
    return 1.0 + (sum(s.accepted_per_position) - a0) / max(passes, 1)


MODES = ("off", "k=1", "k=2", "k=3", "k=4", "adaptive")
CONCURRENCY = (1, 4, 16, 32)


def _mode(engine, mode: str) -> int | None:
    """Put the engine in `mode`; returns the requests' k."""
    engine.set_speculative_policy("adaptive" if mode == "adaptive" else "fixed")
    return {"off": 0, "adaptive": 3}[mode] if mode in ("off", "adaptive") else int(mode[2:])


async def speed(engine, prompts, max_tokens: int, rounds: dict[int, int]):
    """Rows [n, tok/s off, ratio per MTP mode..., adaptive's drafts per step and acceptance length], and
    whether every mode gave the greedy text of MTP off."""
    greedy = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    rows, identical = [], True
    for n in CONCURRENCY:
        # Untimed: every mode once on n prompts (a server's state when it has been serving that load).
        for mode in MODES:
            await run_batch(engine, prompts[:n], SamplingParams(max_tokens=16, ignore_eos=True), _mode(engine, mode),
                            f"warm{n}-{mode}-")
        tokens, seconds = dict.fromkeys(MODES, 0), dict.fromkeys(MODES, 0.0)
        per_round: dict[str, list[float]] = {m: [] for m in MODES}
        a_steps = a_drafts = a_passes = a_accepted = 0
        for r in range(rounds[n]):
            # Each round another batch of n prompts; the modes run back to back on it, in reverse order
            # every other round, so slow drift on a shared machine hits all alike.
            batch = [prompts[(r * n + i) % len(prompts)] for i in range(n)]
            outs = {}
            for mode in (MODES if r % 2 == 0 else MODES[::-1]):
                k = _mode(engine, mode)
                before = engine.stats()
                toks, secs, outs[mode] = await run_batch(engine, batch, greedy, k, f"n{n}-r{r}-{mode}-")
                tokens[mode] += toks
                seconds[mode] += secs
                per_round[mode].append(toks / secs)
                if mode == "adaptive":
                    after = engine.stats()
                    hist = [b - a for a, b in zip(before.drafts_per_seq, after.drafts_per_seq)]
                    a_steps += sum(hist)
                    a_drafts += sum(i * c for i, c in enumerate(hist))
                    a_passes += after.drafted_per_position[0] - before.drafted_per_position[0]
                    a_accepted += sum(after.accepted_per_position) - sum(before.accepted_per_position)
            identical &= all(outs[m] == outs["off"] for m in MODES)
        rate = {m: tokens[m] / seconds[m] for m in MODES}
        ratios = [a / o for a, o in zip(per_round["adaptive"], per_round["off"])]
        rows.append([n, rate["off"]] + [rate[m] / rate["off"] for m in MODES[1:]]
                    + [f"{min(ratios):.3f}-{max(ratios):.3f}", noise(per_round["off"]),
                       a_drafts / max(a_steps, 1), 1.0 + a_accepted / max(a_passes, 1)])
    return rows, identical


def noise(rates: list[float]) -> str:
    """The run's own noise: MTP off's per-round tok/s spread, (max - min) / mean, as a +-half-width."""
    if len(rates) < 2:
        return "n/a (1 round)"
    return f"+-{(max(rates) - min(rates)) / 2 / (sum(rates) / len(rates)):.1%}"


def rounds_at(r: int) -> dict[int, int]:
    """Timed rounds per concurrency: `r` at one sequence (its rate varies most from prompt to prompt),
    half as many at 4, 16 and 32 (more than one, where r allows, so the noise column has a spread)."""
    return {1: r, 4: max(1, r // 2), 16: max(1, r // 2), 32: max(1, r // 2)}


async def run(args):
    folder = resolve_checkpoint(args.model)
    prompts = heldout_prompts(folder, max(32, args.prompts), args.prompt_len)
    base = dict(model=str(folder), num_speculative_tokens=4, max_model_len=1024, max_num_seqs=32,
                max_num_batched_tokens=2048, torch_threads=args.torch_threads, draft_dtype=args.draft_dtype,
                draft_vocab=args.draft_vocab)
    engine = AsyncEngine(EngineConfig(**base))
    await engine.start()
    try:
        engine.set_speculative_policy("fixed")
        acc_rows = []
        for k in (1, 2, 3, 4):
            g = await acceptance(engine, prompts[:args.prompts], k, 0.0, args.max_tokens)
            t = await acceptance(engine, prompts[:args.prompts], k, 0.7, args.max_tokens)
            acc_rows.append([k, g, t])
        r = args.rounds
        local = await speed(engine, prompts, args.max_tokens, rounds_at(r))
    finally:
        await engine.shutdown()
    ray_rows = None
    if args.ray_rounds:
        import ray

        ray.init(num_cpus=16, include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1")
        engine = AsyncEngine(EngineConfig(**base, use_ray=True, pipeline_parallel_size=2, expert_parallel_size=2))
        await engine.start()
        try:
            r = args.ray_rounds
            ray_rows = await speed(engine, prompts, args.max_tokens, rounds_at(r))
        finally:
            await engine.shutdown()
            ray.shutdown()
    from model_shards.drafter import resolve_draft_dtype
    from model_shards.weights import load_checkpoint
    model = load_checkpoint(folder)
    dtype, max_rows = resolve_draft_dtype("auto", model, "cpu")      # drafting as the engine serves it
    model.configure_drafting(dtype=dtype, max_rows=max_rows, vocab=model.checkpoint_draft_vocab)
    anatomy = pass_anatomy.measure(model, prompts[0], 3)
    experts = pass_anatomy.experts_touched(model, prompts[:args.prompts], 3)
    return folder, acc_rows, local, ray_rows, (anatomy, experts)


SPEED_HEADERS = ["concurrent sequences", "tok/s MTP off", "k=1", "k=2", "k=3", "k=4", "adaptive",
                 "adaptive / off, per round (min-max)", "noise: MTP off per round", "adaptive: drafts per seq per step",
                 "adaptive: acceptance length"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--prompts", type=int, default=16, help="prompts of the acceptance table (the speed runs take 32)")
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=8,
                    help="single-process speed rounds at one sequence, each on other prompts "
                         "(half as many at 4, a quarter at 16 and 32)")
    ap.add_argument("--ray-rounds", type=int, default=4, help="the same on -pp 2 -ep 2 (0: skip the Ray runs)")
    ap.add_argument("--torch-threads", type=int, default=1, help="torch threads of the engine's worker")
    ap.add_argument("--draft-dtype", default="auto", help="the engine's drafter dtype (EngineConfig.draft_dtype)")
    ap.add_argument("--no-draft-vocab", dest="draft_vocab", action="store_false",
                    help="greedy drafts from the whole vocabulary, not the checkpoint's draft_vocab.json")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    folder, acc_rows, (local_rows, local_same), ray_out, (anatomy, experts) = asyncio.run(run(args))
    r = args.rounds

    def rounds_text(r):
        return f"{r} rounds at one sequence, {max(1, r // 2)} at 4, 16 and 32"
    body = (f"## MTP speculative decoding (`python -m benchmarks.mtp --model {args.model}`)\n\n"
            f"Machine: {machine()}, {args.torch_threads} torch thread(s); model {folder.name}; held-out code "
            f"prompts of {args.prompt_len} tokens, {args.max_tokens} new tokens each; the engine's defaults: drafts in "
            "float16 (up to 8 rows a call), greedy ones from the checkpoint's draft vocabulary "
            "(model_shards/drafter.py).\n\n"
            + table(["k (drafts)", "mean acceptance length, greedy", "mean acceptance length, T=0.7"], acc_rows)
            + f"\n\nThe acceptance table runs {args.prompts} prompts at once with k drafts every step (so drafting "
            "computes in float32 there: more than 8 rows a call).\n\n"
            "### Tokens/s: MTP off, fixed k, adaptive\n\n"
            "Greedy, output tokens/s with MTP off and, for every other column, tokens/s over that: fixed k drafts "
            "every step (`--speculative-policy fixed`), and the adaptive policy with at most 3 drafts (the default "
            "`--num-speculative-tokens auto --speculative-policy adaptive`; router/spec_policy.py), with the drafts it "
            "chose per sequence per step and its acceptance length (1 + accepted / passes that verified drafts). "
            "The noise columns: adaptive over MTP off in each round (the two run back to back on the same prompts), "
            "and MTP off's own round-to-round spread (half the range, over the mean). "
            "All modes in one engine, back to back on the same batch of prompts each round (reversed every other "
            "round); before the timed rounds at each concurrency every mode runs once, untimed, on 16 tokens.\n\n"
            f"Single process ({rounds_text(r)}):\n\n" + table(SPEED_HEADERS, local_rows)
            + f"\n\nGreedy text identical in every mode: {local_same}.\n")
    if ray_out is not None:
        ray_rows, ray_same = ray_out
        body += (f"\n`-pp 2 -ep 2` (Ray, two micro-batches in flight; {rounds_text(args.ray_rounds)}):\n\n"
                 + table(SPEED_HEADERS, ray_rows) + f"\n\nGreedy text identical in every mode: {ray_same}.\n")
    body += ("\nWhy the speedup at one sequence is what it is: the pieces of one pass, timed alone at one sequence "
             "(`benchmarks/pass_anatomy.py`; speedup = tokens per pass / pass cost in decode steps):\n\n"
             + table(["piece", "ms", "in decode steps"], anatomy)
             + f"\n\nThe 4 tokens of a k=3 verification route to {experts:.2f} distinct experts per MoE layer on "
             f"average over the {args.prompts} prompts (`pass_anatomy.experts_touched`); one token reads "
             "num_experts_per_tok of them.\n")
    publish("mtp", body, write=not args.no_write)


if __name__ == "__main__":
    main()
