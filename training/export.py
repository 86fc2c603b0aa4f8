"""Write the shipped checkpoint folder (checkpoints/hybrid-mini) from a training state.

Why bf16: the weights of an ~11M-parameter model take ~22 MB in bf16 (the repo budget is ~30 MB); the
router's correction bias stays float32 as in the real checkpoints. `time_step_min` is written as 0: the
model was trained (and hybridserve / vLLM run it) without a floor on dt, which transformers otherwise
applies at 0.001; some trained heads go below it. Files: config.json (nemotron_h, MTP
fields, `mtp_use_final_norm_hidden` as measured), model.safetensors (HF names incl. mtp.*), tokenizer.json,
tokenizer_config.json (with a chat template), generation_config.json, draft_vocab.json (training/draft_vocab.py).
`python -m training.export [--state S] [--variant prenorm|postnorm]` (default: the choice saved beside S).
"""
from __future__ import annotations

import argparse
import json
import logging
import shutil
from pathlib import Path

import torch

from model_shards.weights import save_checkpoint

from . import data, draft_vocab
from .choose_mtp import VARIANTS, choice_path, load_variant
from .recipe import MODEL
from .tokenizer import BOS_ID, EOS_ID, PAD_ID, tokenizer_config

log = logging.getLogger("training.export")
OUT_DIR = Path("checkpoints/hybrid-mini")


def run(state_path: Path, use_final_norm_hidden: bool, out_dir: Path = OUT_DIR) -> Path:
    state = torch.load(state_path, weights_only=False)
    variant = "postnorm" if use_final_norm_hidden else "prenorm"
    model = load_variant(state, variant).to(torch.bfloat16)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    save_checkpoint(model, out_dir)
    cfg = json.loads((out_dir / "config.json").read_text())
    cfg["time_step_min"] = 0.0        # trained without transformers' dt floor of 0.001 (as vLLM runs it)
    cfg["torch_dtype"] = "bfloat16"
    cfg["dtype"] = "bfloat16"
    (out_dir / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    tok, train_stream, _, _ = data.prepare(MODEL.vocab_size)
    tok.save(str(out_dir / "tokenizer.json"))
    draft_vocab.write(out_dir, train_stream, MODEL.vocab_size)
    (out_dir / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(), indent=2) + "\n")
    (out_dir / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}, indent=2) + "\n")
    (out_dir / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": BOS_ID, "eos_token_id": EOS_ID, "pad_token_id": PAD_ID, "do_sample": False,
         "max_new_tokens": 256}, indent=2) + "\n")
    size = sum(p.stat().st_size for p in out_dir.iterdir())
    log.info("exported step %d (%s MTP, mtp_use_final_norm_hidden=%s) to %s: %.1f MB",
             state["step"], variant, use_final_norm_hidden, out_dir, size / 1e6)
    return out_dir


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--state", default="runs/hybrid-mini/state_mtp.pt")
    ap.add_argument("--variant", choices=sorted(VARIANTS), default=None)
    ap.add_argument("--out", default=str(OUT_DIR))
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", datefmt="%H:%M:%S")
    if args.variant is None:
        choice = json.loads(choice_path(Path(args.state)).read_text())
        use_final = choice["use_final_norm_hidden"]
    else:
        use_final = VARIANTS[args.variant]
    run(Path(args.state), use_final, Path(args.out))


if __name__ == "__main__":
    main()
