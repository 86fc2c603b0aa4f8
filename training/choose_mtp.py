"""Decide whether the MTP block reads h_t before or after norm_f, by measured acceptance.

Both variants were trained side by side on the same batches from the same initial weights (see
training/forward.py), on detached backbone states, so the backbone is identical for both. Here each variant
drafts k=3 tokens greedily on the same held-out code prompts; the higher mean acceptance length ships.
`python -m training.choose_mtp [--state S]` prints the numbers and writes S.mtp_choice.json beside the state.
"""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import torch

from model_shards.model import HybridModel

from . import data
from .acceptance import code_prompts, measure
from .recipe import MODEL

log = logging.getLogger("training.choose_mtp")
VARIANTS = {"prenorm": False, "postnorm": True}      # name -> mtp_use_final_norm_hidden


def choice_path(state_path: Path) -> Path:
    """Where the choice made from a given training state is written (beside it)."""
    return state_path.with_name(state_path.stem + ".mtp_choice.json")


def load_variant(state: dict, variant: str) -> HybridModel:
    """The trained model from a training state, with the given MTP variant in place."""
    model = HybridModel(MODEL.replace(mtp_use_final_norm_hidden=VARIANTS[variant]))
    model.load_state_dict(state["model"])
    if variant == "postnorm":
        model.mtp.load_state_dict(state["postnorm_mtp"])
    return model.eval()


def run(state_path: Path, prompts: int = 24, prompt_len: int = 64, max_tokens: int = 64,
        num_drafts: int = 3) -> dict:
    torch.set_num_threads(1)
    state = torch.load(state_path, weights_only=False)
    _, _, held, _ = data.prepare(MODEL.vocab_size)
    ps = code_prompts(held, prompts, prompt_len)
    results = {}
    for name in VARIANTS:
        a = measure(load_variant(state, name), ps, num_drafts, max_tokens)
        results[name] = {"mean_acceptance_length": round(a.mean_acceptance_length, 3),
                         "draft_acceptance_rate": round(a.draft_acceptance_rate, 3),
                         "passes": a.passes, "accepted": a.accepted, "drafted": a.drafted}
        log.info("%-8s (mtp_use_final_norm_hidden=%s): k=%d greedy, %d prompts x %d tokens: mean acceptance "
                 "length %.3f, draft acceptance %.3f", name, VARIANTS[name], num_drafts, len(ps), max_tokens,
                 a.mean_acceptance_length, a.draft_acceptance_rate)
    best = max(results, key=lambda n: results[n]["mean_acceptance_length"])
    hist = state.get("history") or [{}]
    choice = {"chosen": best, "use_final_norm_hidden": VARIANTS[best], "num_drafts": num_drafts,
              "prompts": len(ps), "prompt_len": prompt_len, "max_tokens": max_tokens, "step": state["step"],
              "heldout_losses_at_last_eval": {k: round(v, 4) for k, v in hist[-1].items() if k.startswith("heldout")},
              "results": results}
    out = choice_path(state_path)
    out.write_text(json.dumps(choice, indent=1))
    log.info("chosen: %s (mtp_use_final_norm_hidden=%s); written to %s", best, VARIANTS[best], out)
    return choice


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--state", default="runs/hybrid-mini/state.pt")
    ap.add_argument("--prompts", type=int, default=24)
    ap.add_argument("--max-tokens", type=int, default=64)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", datefmt="%H:%M:%S")
    run(Path(args.state), prompts=args.prompts, max_tokens=args.max_tokens)


if __name__ == "__main__":
    main()
