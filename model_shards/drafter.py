"""The dtype the MTP drafter computes in, apart from the model's.

Drafts are proposals: verification runs in the model's dtype and decides every token, so greedy output
is the same whatever the drafter computes in, and random sampling keeps the target distribution (the
draft distribution q only has to be the one the draft was sampled from). On a CPU a decode-sized
drafting step is bound by reading weights (the MTP block and lm_head, 4 MB of it in float32 for
hybrid-mini): float16 weights halve those reads, and with one row at a time float16 products cost no
more than float32 ones here. So "auto" drafts in float16 on a CPU when the model is float32, and in the
model's dtype elsewhere (a GPU model is already 16-bit).
"""
from __future__ import annotations

import torch

NAMES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_draft_dtype(name: str, model, device) -> torch.dtype:
    """`name`: auto, model, or a dtype name (EngineConfig.draft_dtype)."""
    model_dtype = model.lm_head.weight.dtype
    if name == "model":
        return model_dtype
    if name == "auto":
        on_cpu = torch.device(device).type == "cpu"
        return torch.float16 if on_cpu and model_dtype == torch.float32 else model_dtype
    if name not in NAMES:
        raise ValueError(f"draft_dtype: expected auto, model or one of {', '.join(NAMES)}, got {name!r}")
    return NAMES[name]
