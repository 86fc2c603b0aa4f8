"""MTP speculative decoding through the engine, on held-out code prompts: `python -m benchmarks.mtp`.

Side by side in one run (CPU, single-process engine, the shipped default model):
  1. mean acceptance length (tokens per verification pass = 1 + accepted drafts) at k = 1..4,
     greedy and at temperature 0.7;
  2. output tokens/s with MTP off vs k = 1, 2, 3 at 1 and 16 concurrent sequences, and whether the
     greedy text is identical.
Held-out prompts: the stdlib files the training recipe held out (training/corpus.py), tokenized with
the checkpoint's own tokenizer. Prints a table and writes docs/BENCHMARKS.md. Not a test.
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


async def run(args):
    folder = resolve_checkpoint(args.model)
    prompts = heldout_prompts(folder, args.prompts, args.prompt_len)
    engine = AsyncEngine(EngineConfig(model=str(folder), num_speculative_tokens=4, max_model_len=1024,
                                      max_num_seqs=max(16, args.prompts), max_num_batched_tokens=2048,
                                      torch_threads=args.torch_threads, draft_dtype=args.draft_dtype,
                                      draft_vocab=args.draft_vocab))
    await engine.start()
    try:
        acc_rows = []
        for k in (1, 2, 3, 4):
            g = await acceptance(engine, prompts, k, 0.0, args.max_tokens)
            t = await acceptance(engine, prompts, k, 0.7, args.max_tokens)
            acc_rows.append([k, g, t])
        greedy = SamplingParams(max_tokens=args.max_tokens, ignore_eos=True)
        speed_rows, identical = [], True
        for n in (1, 16):
            await run_batch(engine, prompts[:1], greedy, 0, f"warm{n}-")
            tokens, seconds = {k: 0 for k in (0, 1, 2, 3)}, {k: 0.0 for k in (0, 1, 2, 3)}
            passes = accepted = 0                               # of the k=3 runs, for their acceptance
            for r in range(args.rounds if n == 1 else max(1, args.rounds // 4)):
                # Each round a different batch of n prompts; the four modes run back to back on it, in
                # reverse order every other round, so slow drift on a shared machine hits all alike.
                batch = [prompts[(r * n + i) % len(prompts)] for i in range(n)]
                outs = {}
                for k in ((0, 1, 2, 3) if r % 2 == 0 else (3, 2, 1, 0)):
                    before = engine.stats()
                    toks, secs, outs[k] = await run_batch(engine, batch, greedy, k, f"n{n}-r{r}-k{k}-")
                    if k == 3:
                        after = engine.stats()
                        passes += after.drafted_per_position[0] - before.drafted_per_position[0]
                        accepted += sum(after.accepted_per_position) - sum(before.accepted_per_position)
                    tokens[k] += toks
                    seconds[k] += secs
                identical &= all(outs[k] == outs[0] for k in (1, 2, 3))
            rate = {k: tokens[k] / seconds[k] for k in tokens}
            speed_rows.append([n, rate[0]] + [rate[k] / rate[0] for k in (1, 2, 3)]
                              + [1.0 + accepted / max(passes, 1)])
    finally:
        await engine.shutdown()
    from model_shards.drafter import resolve_draft_dtype
    from model_shards.weights import load_checkpoint
    model = load_checkpoint(folder)
    dtype, max_rows = resolve_draft_dtype("auto", model, "cpu")      # drafting as the engine serves it
    model.configure_drafting(dtype=dtype, max_rows=max_rows, vocab=model.checkpoint_draft_vocab)
    anatomy = pass_anatomy.measure(model, prompts[0], 3)
    experts = pass_anatomy.experts_touched(model, prompts, 3)
    return folder, acc_rows, speed_rows, identical, (anatomy, experts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=16,
                    help="speed rounds at one sequence, each on another prompt (a quarter of them at 16)")
    ap.add_argument("--torch-threads", type=int, default=1, help="torch threads of the engine's worker")
    ap.add_argument("--draft-dtype", default="auto", help="the engine's drafter dtype (EngineConfig.draft_dtype)")
    ap.add_argument("--no-draft-vocab", dest="draft_vocab", action="store_false",
                    help="greedy drafts from the whole vocabulary, not the checkpoint's draft_vocab.json")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    folder, acc_rows, speed_rows, identical, (anatomy, experts) = asyncio.run(run(args))
    body = (f"## MTP speculative decoding (`python -m benchmarks.mtp --model {args.model}`)\n\n"
            f"Machine: {machine()}, {args.torch_threads} torch thread(s); model {folder.name}; {args.prompts} held-out code prompts of "
            f"{args.prompt_len} tokens, {args.max_tokens} new tokens each; single-process engine with its "
            "defaults: drafts in float16 (up to 8 rows a call), greedy ones from the checkpoint's draft vocabulary "
            "(model_shards/drafter.py).\n\n"
            + table(["k (drafts)", "mean acceptance length, greedy", "mean acceptance length, T=0.7"], acc_rows)
            + f"\n\nThe acceptance table runs the {args.prompts} prompts at once (so drafting computes in float32 "
            "there: more than 8 rows a call); the last column below is the acceptance of the one-sequence "
            "float16 drafts.\n"
            + "\n\n" + table(["concurrent sequences", "tok/s MTP off", "speedup k=1", "speedup k=2", "speedup k=3",
                              "acceptance length in the k=3 runs"], speed_rows)
            + f"\n\nGreedy text identical with MTP off and with k=1, 2, 3: {identical}. Speedup = tok/s with "
            f"MTP over tok/s without, measured back to back in the same engine: {args.rounds} rounds at one "
            f"sequence and {max(1, args.rounds // 4)} at 16, each on a different batch of prompts, the four modes "
            "in turn on each (reversed every other round).\n\n"
            "Why the speedup is what it is: the pieces of one pass, timed alone at one sequence "
            "(`benchmarks/pass_anatomy.py`; speedup = tokens per pass / pass cost in decode steps):\n\n"
            + table(["piece", "ms", "in decode steps"], anatomy)
            + f"\n\nThe 4 tokens of a k=3 verification route to {experts:.2f} distinct experts per MoE layer on "
            f"average over the {args.prompts} prompts (`pass_anatomy.experts_touched`); one token reads "
            "num_experts_per_tok of them.\n")
    publish("mtp", body, write=not args.no_write)


if __name__ == "__main__":
    main()
