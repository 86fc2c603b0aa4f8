"""Train the shipped default model: `python -m training.train_default`.

Steps: prepare data (tokenizer + streams), train backbone + two MTP variants side by side, save a state
every few minutes (runs/hybrid-mini/state.pt, resumable with --resume); then train both MTP heads further
with the backbone frozen (training/finetune_mtp.py), pick the variant by measured acceptance
(training/choose_mtp.py) and export checkpoints/hybrid-mini (training/export.py).
Fixed seeds: the same command on the same Python stdlib gives the same run (up to float summation order).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import time
from pathlib import Path

import torch

from model_shards.model import HybridModel
from model_shards.mtp import MTPBlock

from . import data
from .balance import ExpertBalancer
from .forward import losses
from .init import init_weights
from .recipe import MODEL, TrainConfig

log = logging.getLogger("training")
RUN_DIR = Path("runs/hybrid-mini")


def build(cfg=MODEL, seed: int = 1234) -> tuple[HybridModel, dict[str, MTPBlock]]:
    torch.manual_seed(seed)
    model = HybridModel(cfg)
    alt = MTPBlock(cfg)
    init_weights(model, cfg.num_hidden_layers, seed)
    init_weights(alt, cfg.num_hidden_layers, seed + 1)
    alt.load_state_dict(model.mtp.state_dict())            # both variants start from identical weights
    return model, {"prenorm": model.mtp, "postnorm": alt}


def mtp_rows(tc: TrainConfig, step: int) -> torch.Tensor | None:
    """The flat positions whose MTP losses count this step (a fixed fraction, drawn from (seed, step))."""
    n = tc.batch_size * tc.seq_len
    if tc.mtp_loss_fraction >= 1.0:
        return None
    g = torch.Generator().manual_seed(tc.seed * 100_003 + step)
    return torch.randperm(n, generator=g)[:int(n * tc.mtp_loss_fraction)].sort().values


def lr_at(step: int, tc: TrainConfig) -> float:
    if step < tc.warmup_steps:
        return tc.lr * (step + 1) / tc.warmup_steps
    frac = (step - tc.warmup_steps) / max(1, tc.steps - tc.warmup_steps)
    return tc.lr * (tc.min_lr_ratio + (1 - tc.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0))))


def make_optimizer(params: list[tuple[str, torch.nn.Parameter]], tc: TrainConfig) -> torch.optim.Optimizer:
    decay = [p for n, p in params if p.ndim >= 2 and "embeddings" not in n]
    rest = [p for n, p in params if not (p.ndim >= 2 and "embeddings" not in n)]
    return torch.optim.AdamW([{"params": decay, "weight_decay": tc.weight_decay},
                              {"params": rest, "weight_decay": 0.0}], lr=tc.lr, betas=(0.9, 0.95), eps=1e-8)


@torch.no_grad()
def evaluate(model, mtps, windows: torch.Tensor) -> dict[str, float]:
    model.eval(); [m.eval() for m in mtps.values()]
    sums: dict[str, float] = {}
    for i in range(0, windows.shape[0], 4):
        for k, v in losses(model, mtps, windows[i:i + 4]).items():
            sums[k] = sums.get(k, 0.0) + float(v) * windows[i:i + 4].shape[0]
    model.train(); [m.train() for m in mtps.values()]
    return {k: v / windows.shape[0] for k, v in sums.items()}


def save_state(path: Path, model, mtps, opt, step: int, tc: TrainConfig, history: list) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save({"step": step, "model": model.state_dict(), "postnorm_mtp": mtps["postnorm"].state_dict(),
                "opt": opt.state_dict(), "train_config": dataclasses.asdict(tc), "history": history}, tmp)
    tmp.replace(path)


def train(tc: TrainConfig, resume: bool, max_minutes: float | None, run_dir: Path = RUN_DIR) -> Path:
    torch.set_num_threads(tc.threads)
    run_dir.mkdir(parents=True, exist_ok=True)
    tok, train_stream, held_stream, meta = data.prepare(MODEL.vocab_size)
    model, mtps = build(MODEL, tc.seed)
    n_backbone = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("mtp."))
    n_mtp = sum(p.numel() for p in model.mtp.parameters())
    log.info("model %s: %.2fM params (backbone+head %.2fM, MTP %.2fM), pattern %s, MTP %s",
             MODEL.name, (n_backbone + n_mtp) / 1e6, n_backbone / 1e6, n_mtp / 1e6,
             MODEL.hybrid_override_pattern, MODEL.mtp_hybrid_override_pattern)
    log.info("train config: %s", json.dumps(dataclasses.asdict(tc)))
    params = list(model.named_parameters()) + [("alt." + n, p) for n, p in mtps["postnorm"].named_parameters()]
    opt = make_optimizer(params, tc)
    balancer = ExpertBalancer([model, mtps["postnorm"]], tc.bias_update_rate)
    state_path = run_dir / "state.pt"
    step, history = 0, []
    if resume and state_path.exists():
        st = torch.load(state_path, weights_only=False)
        model.load_state_dict(st["model"]); mtps["postnorm"].load_state_dict(st["postnorm_mtp"])
        opt.load_state_dict(st["opt"]); step, history = st["step"], st["history"]
        log.info("resumed at step %d", step)
    held = torch.from_numpy(data.eval_windows(held_stream, tc.eval_windows, tc.seq_len + 3))
    model.train(); [m.train() for m in mtps.values()]
    t0 = last_ckpt = time.time()
    tokens_done, t_log, tok_log = 0, time.time(), 0
    run_avg: dict[str, float] = {}
    start_step = step
    while step < tc.steps:
        for g in opt.param_groups:
            g["lr"] = lr_at(step, tc)
        window = torch.from_numpy(data.sample_windows(train_stream, tc.batch_size, tc.seq_len + 3, tc.seed, step))
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=tc.bf16):
            parts = losses(model, mtps, window, mtp_rows=mtp_rows(tc, step))
        mtp_parts = [v for k, v in parts.items() if k != "main"]
        loss = parts["main"] + tc.mtp_weight * 2 * torch.stack(mtp_parts).mean()  # 2 variants: each gets 0.3
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_([p for _, p in params], tc.grad_clip)
        opt.step()
        imbalance = balancer.step()
        step += 1
        tokens_done += tc.batch_size * tc.seq_len
        tok_log += tc.batch_size * tc.seq_len
        for k, v in parts.items():
            run_avg[k] = 0.9 * run_avg.get(k, v.item()) + 0.1 * v.item()
        if step % tc.log_every == 0 or step == tc.steps:
            now = time.time()
            tps = tok_log / (now - t_log)
            rate = (now - t0) / (step - start_step)
            log.info("step %5d/%d  loss %.3f  main %.3f  mtp pre d1/d2 %.3f/%.3f  post d1/d2 %.3f/%.3f  "
                     "lr %.2e  gnorm %.2f  load max/mean %.2f (worst %.2f)  %.0f tok/s  elapsed %s  ETA %s",
                     step, tc.steps, loss.item(), run_avg["main"], run_avg["prenorm_d1"], run_avg["prenorm_d2"],
                     run_avg["postnorm_d1"], run_avg["postnorm_d2"], lr_at(step - 1, tc), float(gnorm),
                     *imbalance, tps, _hms(now - t0), _hms(rate * (tc.steps - step)))
            t_log, tok_log = now, 0
        out_of_time = max_minutes is not None and time.time() - t0 > max_minutes * 60
        if time.time() - last_ckpt > tc.ckpt_every_s or step == tc.steps or out_of_time:
            ev = evaluate(model, mtps, held)
            history.append({"step": step, "elapsed_s": time.time() - t0, **{f"heldout_{k}": v for k, v in ev.items()}})
            log.info("eval step %d: held-out main %.3f  prenorm d1/d2 %.3f/%.3f  postnorm d1/d2 %.3f/%.3f",
                     step, ev["main"], ev["prenorm_d1"], ev["prenorm_d2"], ev["postnorm_d1"], ev["postnorm_d2"])
            save_state(state_path, model, mtps, opt, step, tc, history)
            last_ckpt = time.time()
        if out_of_time:
            log.warning("stopping at step %d: --max-minutes %.0f reached", step, max_minutes)
            break
    log.info("training done: %d steps, %d tokens in %s (%.0f tok/s)", step - start_step, tokens_done,
             _hms(time.time() - t0), tokens_done / (time.time() - t0))
    (run_dir / "train_summary.json").write_text(json.dumps(
        {"steps": step, "tokens": step * tc.batch_size * tc.seq_len, "wall_s": time.time() - t0,
         "resumed_from": start_step, "history": history, "train_config": dataclasses.asdict(tc)}, indent=1))
    return state_path


def _hms(s: float) -> str:
    s = int(s)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=TrainConfig.steps)
    ap.add_argument("--batch-size", type=int, default=TrainConfig.batch_size)
    ap.add_argument("--seq-len", type=int, default=TrainConfig.seq_len)
    ap.add_argument("--bf16", action="store_true")
    ap.add_argument("--threads", type=int, default=TrainConfig.threads)
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--max-minutes", type=float, default=None, help="stop (and save) after this much wall time")
    ap.add_argument("--run-dir", default=str(RUN_DIR))
    ap.add_argument("--no-export", action="store_true", help="train only; skip MTP stage, choice and export")
    ap.add_argument("--mtp-finetune-steps", type=int, default=TrainConfig.mtp_finetune_steps)
    ap.add_argument("--out", default="checkpoints/hybrid-mini", help="where the checkpoint folder is written")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", datefmt="%H:%M:%S")
    tc = dataclasses.replace(TrainConfig(), steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len,
                             bf16=args.bf16, threads=args.threads, mtp_finetune_steps=args.mtp_finetune_steps)
    state = train(tc, args.resume, args.max_minutes, Path(args.run_dir))
    if not args.no_export:
        from . import choose_mtp, export, finetune_mtp
        choose_mtp.run(state)                                   # the heads as the main run left them
        state = finetune_mtp.run(state, tc.mtp_finetune_steps, tc.mtp_finetune_lr)
        choice = choose_mtp.run(state)                          # after equal extra training: this decides
        export.run(state, choice["use_final_norm_hidden"], Path(args.out))


if __name__ == "__main__":
    main()
