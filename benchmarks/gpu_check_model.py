"""The model half of `python -m benchmarks.gpu_check`: a Super-shaped slice of the model, forward with
the dispatched kernels (Triton on a GPU) against the reference path, and the single-process engine's
decode tokens/s on that slice.

The slice has Nemotron-3-Super's real widths (hidden 4096, 128 Mamba heads of 64 with state 128 in 8
groups, 32 query / 2 KV heads of 128, latent MoE 1024 wide with experts of 2688 and 22 per token, the
131072-token vocabulary, the MTP block) and a few layers of each kind. It keeps 64 of the 512 experts
so its checkpoint (written once for the engine) stays a few GiB; the per-token work of a MoE layer does
not depend on the expert count. Without a GPU the same steps run on the `tiny` preset (a check that
the script runs, not a measurement).
"""
from __future__ import annotations

import asyncio
import dataclasses
import os
import tempfile
import time
from pathlib import Path

import torch

from kernels import ops
from model_shards.batch import BatchLayout, SeqSlice
from model_shards.config import ModelConfig
from model_shards.model import HybridModel
from model_shards.presets import get_preset

SLICE_PATTERN = "MEM*EM*E"      # 3 Mamba, 3 latent MoE, 2 attention layers (+ the MTP block's "*E")


def slice_config(tiny: bool) -> ModelConfig:
    base = get_preset("tiny" if tiny else "nemotron-3-super-120b-a12b")
    return dataclasses.replace(base, name="super-slice" if not tiny else "tiny-slice",
                               hybrid_override_pattern=SLICE_PATTERN,
                               n_routed_experts=8 if tiny else 64, max_position_embeddings=8192)


def build_slice(cfg: ModelConfig, device: str, dtype: torch.dtype, seed: int = 0) -> HybridModel:
    """Random weights made on the device itself (no host copy of a GPU-sized model)."""
    with torch.device("meta"):
        model = HybridModel(cfg)
    model = model.to(dtype=dtype).to_empty(device=device)
    for mod in model.modules():                     # as load_checkpoint keeps it
        if hasattr(mod, "e_score_correction_bias"):
            mod.e_score_correction_bias = mod.e_score_correction_bias.float()
    return model.init_random(seed).eval()


def _passes(prompt_lens: list[int], vocab: int, device: str, block_size: int):
    """Three passes over len(prompt_lens) sequences: the prompts (one flat varlen batch), one decode
    token each, then a 4-token verification pass each (keep_states). Yields (token ids (T,), layout)."""
    g = torch.Generator().manual_seed(1)
    S = len(prompt_lens)
    per_seq = -(-(max(prompt_lens) + 8) // block_size)
    tables = [torch.arange(s * per_seq, (s + 1) * per_seq, device=device) for s in range(S)]
    pos = [0] * S

    def layout(counts, keep=False):
        seqs, off = [], 0
        for s, n in enumerate(counts):
            seqs.append(SeqSlice(off, n, pos[s], s, tables[s], keep_states=keep))
            off += n
        return BatchLayout(seqs)

    for counts, keep in ((prompt_lens, False), ([1] * S, False), ([4] * S, True)):
        ids = torch.randint(3, vocab, (sum(counts),), generator=g).to(device)
        yield ids, layout(counts, keep)
        pos = [p + n for p, n in zip(pos, counts)]


@torch.no_grad()
def forward_check(model: HybridModel, device: str, prompt_lens: list[int], block_size: int = 16) -> dict:
    """Logits of every pass with the Triton kernels (on a GPU; the interpreter on a CPU) vs
    HYBRIDSERVE_KERNELS=reference, each from fresh caches: the largest error relative to the reference's
    largest logit, and the share of rows whose argmax agrees."""
    per_seq = -(-(max(prompt_lens) + 8) // block_size)
    runs = {}
    for choice in ("reference", "triton"):
        os.environ[ops.ENV] = choice
        try:
            cache = model.make_cache(num_blocks=len(prompt_lens) * per_seq, block_size=block_size,
                                     num_slots=len(prompt_lens), max_verify_positions=4, device=device)
            outs = []
            for ids, lay in _passes(prompt_lens, model.cfg.vocab_size, device, block_size):
                outs.append(model.logits(model(ids, lay, cache)).float())     # (T, V)
            if device == "cuda":
                torch.cuda.synchronize()
            runs[choice] = torch.cat(outs)
        finally:
            os.environ.pop(ops.ENV, None)
    ref, got = runs["reference"], runs["triton"]
    rel = float((got - ref).abs().max() / ref.abs().max())
    agree = float((got.argmax(-1) == ref.argmax(-1)).float().mean())
    return dict(rows=ref.shape[0], max_rel_err=rel, argmax_agree=agree)


def engine_decode(folder: Path, device: str, counts: list[int], max_tokens: int) -> list[dict]:
    """The single-process engine (what `hybridserve serve -pp 1 -ep 1 --device cuda` runs) on the
    slice's checkpoint: output tokens/s at each concurrency, MTP off and adaptive MTP (k=3)."""
    from router.engine_config import EngineConfig

    from .engine import measure

    rows = []
    for k in (0, 3):
        cfg = EngineConfig(model=str(folder), device=device, num_speculative_tokens=k, max_num_seqs=max(counts),
                           max_model_len=256, max_num_batched_tokens=max(2048, 32 * max(counts)),
                           draft_vocab=False)
        got = asyncio.run(measure(cfg, counts, max_tokens, prompt_len=32))
        for n in counts:
            rows.append(dict(mtp_k=k, seqs=n, tok_s=got[n]["tok_s"], pass_ms=got[n]["pass_ms"],
                             accept_len=got[n]["accept"]))
    return rows


def model_part(cuda: bool) -> dict:
    from model_shards.weights import save_checkpoint

    device = "cuda" if cuda else "cpu"
    dtype = torch.bfloat16 if cuda else torch.float32
    cfg = slice_config(tiny=not cuda)
    t0 = time.perf_counter()
    model = build_slice(cfg, device, dtype)
    out = dict(model=cfg.name, pattern=SLICE_PATTERN, params=sum(p.numel() for p in model.parameters()),
               dtype=str(dtype), build_s=time.perf_counter() - t0)
    out["forward"] = forward_check(model, device, [300, 128, 17] if cuda else [9, 5, 3])
    with tempfile.TemporaryDirectory(prefix="hybridserve-gpu-check-") as tmp:
        save_checkpoint(model.cpu(), tmp)
        del model
        if cuda:
            torch.cuda.empty_cache()
        out["engine"] = engine_decode(Path(tmp), device, [1, 32, 128] if cuda else [1, 4],
                                      max_tokens=64 if cuda else 6)
    return out


def model_table(result: dict) -> str:
    f = result["forward"]
    lines = [f"model: {result['model']} ({result['pattern']}, {result['params'] / 1e6:,.0f}M parameters, "
             f"{result['dtype']}); forward, dispatched kernels vs reference over {f['rows']} rows: "
             f"max error {f['max_rel_err']:.2e} of the largest logit, argmax agrees on {f['argmax_agree']:.1%}",
             "", "MTP k | sequences | output tok/s | pass ms | accepted per pass",
             "--- | --- | --- | --- | ---"]
    for r in result["engine"]:
        lines.append(f"{r['mtp_k']} | {r['seqs']} | {r['tok_s']:.0f} | {r['pass_ms']:.2f} | {r['accept_len']:.2f}")
    return "\n".join(lines)
