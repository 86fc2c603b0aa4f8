"""Optional second stage: train both MTP variants further with the backbone frozen, on equal budgets.

Why: on a CPU the main run can afford the MTP losses on only a quarter of the positions; with the
backbone frozen a step costs one no-grad backbone pass plus the MTP blocks, so the heads (which decide
acceptance) get more signal cheaply. Both variants see the same batches and steps, so the prenorm /
postnorm comparison stays fair. `python -m training.finetune_mtp --steps N` reads runs/hybrid-mini/state.pt
and writes runs/hybrid-mini/state_mtp.pt (same format; choose_mtp / export accept it via --state).
"""
from __future__ import annotations

import argparse
import logging
import math
import time
from pathlib import Path

import torch

from model_shards.mtp import MTPBlock

from . import data
from .balance import ExpertBalancer
from .choose_mtp import load_variant
from .forward import backbone_hidden, mtp_depth_logits
from .recipe import MODEL, TrainConfig

log = logging.getLogger("training.finetune_mtp")


def mtp_only_losses(model, mtps: dict[str, MTPBlock], window: torch.Tensor) -> dict[str, torch.Tensor]:
    B, Lp = window.shape
    L = Lp - 3
    with torch.no_grad():
        h, layout, nblocks = backbone_hidden(model, window[:, :L])
        hn = model.backbone.norm_f(h)
    out = {}
    for name, mtp in mtps.items():
        h_prev = hn if name == "postnorm" else h
        for d in (1, 2):
            h_prev, logits = mtp_depth_logits(model, mtp, h_prev, window[:, d:L + d], layout, nblocks)
            out[f"{name}_d{d}"] = torch.nn.functional.cross_entropy(logits, window[:, d + 1:L + d + 1].reshape(-1))
    return out


def run(state_path: Path, steps: int, lr: float = 1e-3, seed: int = 4321, max_minutes: float | None = None) -> Path:
    tc = TrainConfig()
    torch.set_num_threads(tc.threads)
    state = torch.load(state_path, weights_only=False)
    _, train_stream, held_stream, _ = data.prepare(MODEL.vocab_size)
    model = load_variant(state, "prenorm")
    post = load_variant(state, "postnorm").mtp
    mtps = {"prenorm": model.mtp, "postnorm": post}
    for p in model.parameters():
        p.requires_grad_(False)
    params = [p for m in mtps.values() for p in m.parameters()]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    for m in mtps.values():
        m.train()
    balancer = ExpertBalancer(list(mtps.values()), tc.bias_update_rate)
    t0, avg = time.time(), {}
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / steps))
        window = torch.from_numpy(data.sample_windows(train_stream, tc.batch_size, tc.seq_len + 3, seed, step))
        parts = mtp_only_losses(model, mtps, window)
        opt.zero_grad(set_to_none=True)
        torch.stack(list(parts.values())).sum().backward()
        torch.nn.utils.clip_grad_norm_(params, tc.grad_clip)
        opt.step()
        balancer.step()
        for k, v in parts.items():
            avg[k] = 0.9 * avg.get(k, v.item()) + 0.1 * v.item()
        if (step + 1) % 10 == 0 or step + 1 == steps:
            el = time.time() - t0
            log.info("mtp step %4d/%d  pre d1/d2 %.3f/%.3f  post d1/d2 %.3f/%.3f  elapsed %.0fs  ETA %.0fs",
                     step + 1, steps, avg["prenorm_d1"], avg["prenorm_d2"], avg["postnorm_d1"], avg["postnorm_d2"],
                     el, el / (step + 1) * (steps - step - 1))
        if max_minutes is not None and time.time() - t0 > max_minutes * 60:
            log.warning("stopping at step %d: --max-minutes reached", step + 1)
            break
    out_state = dict(state)
    out_state["model"] = {k: v for k, v in model.state_dict().items()}
    out_state["postnorm_mtp"] = post.state_dict()
    out_state["mtp_finetune"] = {"steps": step + 1, "lr": lr, "seed": seed, "wall_s": time.time() - t0,
                                 "from": str(state_path)}
    out = state_path.parent / "state_mtp.pt"
    torch.save(out_state, out)
    log.info("wrote %s", out)
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--state", default="runs/hybrid-mini/state.pt")
    ap.add_argument("--steps", type=int, default=TrainConfig.mtp_finetune_steps)
    ap.add_argument("--lr", type=float, default=TrainConfig.mtp_finetune_lr)
    ap.add_argument("--max-minutes", type=float, default=None)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", datefmt="%H:%M:%S")
    run(Path(args.state), args.steps, args.lr, max_minutes=args.max_minutes)


if __name__ == "__main__":
    main()
