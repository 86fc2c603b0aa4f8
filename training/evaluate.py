"""Evaluate the shipped checkpoint: held-out loss vs. a unigram baseline, greedy samples, MTP acceptance.

`python -m training.evaluate [--checkpoint checkpoints/hybrid-mini]` prints every figure of
docs/MODEL_CARD.md. The checkpoint is loaded with hybridserve's own loader (`load_checkpoint`) and run in
float32; acceptance comes from the oracle generator with k = 1..4 drafts, greedy and at temperature 0.7.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import time
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer

from model_shards.weights import load_checkpoint
from model_shards.generate import generate
from model_shards.sampling_params import SamplingParams

from . import data
from .acceptance import code_prompts, measure
from .forward import losses

# Prompts end mid-line: the byte-level BPE merges a newline with the next line's indentation, so a prompt
# ending in a bare "\n" asks for a token that, in training, is always followed by a dedented line.
SAMPLE_PROMPTS = [
    'def fibonacci(n):\n    """Return the n-th Fibonacci number."""\n    if n < 2:\n        return',
    "import os\nimport sys\n\n\ndef main():\n    args = sys.argv[1:]\n    for",
    "class Stack:\n    def __init__(self):\n        self.items = []\n\n    def push(self, item):\n        self",
    "    def __repr__(self):\n        return",
    "try:\n    import json\nexcept ImportError:\n    json =",
]


def unigram_ce(train: np.ndarray, targets: np.ndarray, vocab: int) -> float:
    """Cross-entropy (nats/token) of `targets` under add-one-smoothed unigram frequencies of `train`."""
    counts = np.bincount(train, minlength=vocab).astype(np.float64) + 1.0
    logp = np.log(counts / counts.sum())
    return float(-logp[targets].mean())


@torch.no_grad()
def heldout_losses(model, held: np.ndarray, windows: int, seq_len: int) -> tuple[dict[str, float], np.ndarray]:
    """Main and MTP (depth 1, 2) cross-entropy over fixed held-out windows; returns them and the targets."""
    w = torch.from_numpy(data.eval_windows(held, windows, seq_len + 3))
    name = "postnorm" if model.cfg.mtp_use_final_norm_hidden else "prenorm"
    sums: dict[str, float] = {}
    for i in range(0, windows, 4):
        for k, v in losses(model, {name: model.mtp}, w[i:i + 4]).items():
            key = k.replace(name + "_", "mtp_")
            sums[key] = sums.get(key, 0.0) + float(v) * w[i:i + 4].shape[0]
    return {k: v / windows for k, v in sums.items()}, w[:, 1:seq_len + 1].reshape(-1).numpy()


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", default="checkpoints/hybrid-mini")
    ap.add_argument("--windows", type=int, default=64, help="held-out windows of 256 tokens for the loss")
    ap.add_argument("--prompts", type=int, default=16, help="held-out prompts for acceptance")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--skip-acceptance", action="store_true")
    ap.add_argument("--json", default=None, help="also write the figures to this file")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)
    t0 = time.time()
    model = load_checkpoint(args.checkpoint, dtype=torch.float32)
    tok = Tokenizer.from_file(str(Path(args.checkpoint) / "tokenizer.json"))
    cfg = model.cfg
    _, train, held, meta = data.prepare(cfg.vocab_size)
    report: dict = {"checkpoint": args.checkpoint, "mtp_use_final_norm_hidden": cfg.mtp_use_final_norm_hidden}

    ev, targets = heldout_losses(model, held, args.windows, 256)
    uni_windows = unigram_ce(train, targets, cfg.vocab_size)
    uni_all = unigram_ce(train, held[held != 1], cfg.vocab_size)      # every held-out token except <s>
    bytes_per_token = meta["heldout_bytes"] / meta["heldout_tokens"]
    report["heldout"] = {"windows": args.windows, "tokens": int(targets.size), **{k: round(v, 4) for k, v in ev.items()},
                         "unigram_same_tokens": round(uni_windows, 4), "unigram_whole_split": round(uni_all, 4),
                         "bits_per_byte_main": round(ev["main"] / math.log(2) / bytes_per_token, 4)}
    print(f"held-out loss over {args.windows} windows x 256 tokens ({targets.size} targets), nats/token:")
    print(f"  model next-token CE      {ev['main']:.4f}  (perplexity {math.exp(ev['main']):.1f}, "
          f"{report['heldout']['bits_per_byte_main']:.3f} bits/byte)")
    print(f"  unigram baseline         {uni_windows:.4f}  (same targets; whole held-out split: {uni_all:.4f})")
    print(f"  MTP depth 1 (token t+2)  {ev['mtp_d1']:.4f}")
    print(f"  MTP depth 2 (token t+3)  {ev['mtp_d2']:.4f}")

    print("\ngreedy samples (48 new tokens each):")
    report["samples"] = []
    for p in SAMPLE_PROMPTS:
        ids = [1] + tok.encode(p).ids
        g = generate(model, ids, SamplingParams(temperature=0.0, max_tokens=48, ignore_eos=True), num_drafts=3)
        text = tok.decode(g.tokens, skip_special_tokens=False)
        report["samples"].append({"prompt": p, "completion": text})
        print(f"--- prompt {p!r}\n{p}{text}")

    if not args.skip_acceptance:
        prompts = code_prompts(held, args.prompts, 64)
        print(f"\nMTP mean acceptance length (1 + accepted drafts per pass), {len(prompts)} held-out prompts "
              f"x {args.max_tokens} tokens, mtp_use_final_norm_hidden={cfg.mtp_use_final_norm_hidden}:")
        print("  k   greedy   (draft acc.)   temp 0.7   (draft acc.)")
        report["acceptance"] = []
        for k in range(1, 5):
            g = measure(model, prompts, k, args.max_tokens, 0.0)
            s = measure(model, prompts, k, args.max_tokens, 0.7, seed=1000)
            report["acceptance"].append({"k": k, "greedy": round(g.mean_acceptance_length, 3),
                                         "greedy_draft_acceptance": round(g.draft_acceptance_rate, 3),
                                         "temp0.7": round(s.mean_acceptance_length, 3),
                                         "temp0.7_draft_acceptance": round(s.draft_acceptance_rate, 3)})
            print(f"  {k}   {g.mean_acceptance_length:.3f}    ({g.draft_acceptance_rate:.3f})        "
                  f"{s.mean_acceptance_length:.3f}      ({s.draft_acceptance_rate:.3f})", flush=True)
    print(f"\n(evaluation took {time.time() - t0:.0f} s)")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
