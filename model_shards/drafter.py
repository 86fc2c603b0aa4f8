"""The dtype the MTP drafter computes in, apart from the model's.

Drafts are proposals: verification runs in the model's dtype and decides every token, so greedy output
is the same whatever the drafter computes in, and random sampling keeps the target distribution (the
draft distribution q only has to be the one the draft was sampled from). On a CPU a decode-sized
drafting step is bound by reading weights (the MTP block and lm_head, 4 MB of it in float32 for
hybrid-mini): float16 weights halve those reads, and with one row at a time float16 products cost no
more than float32 ones here; with many rows (a large batch drafting) the CPU's float16 GEMM is slower
than float32. So "auto" drafts in float16 on a CPU when the model is float32, for MTP calls of up to
AUTO_MAX_ROWS rows (one or a few sequences), and in the model's dtype otherwise (a GPU model is
already 16-bit). Measured through the engine at one sequence, k=3: drafting ~3.4 -> ~3.0 ms a pass.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

NAMES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
AUTO_MAX_ROWS = 8


class Drafter:
    """A copy of the MTP block and of lm_head's weight in `dtype`, used for MTP calls of at most
    `max_rows` rows (None: all). The model's own block and head stay as they are."""

    def __init__(self, mtp: nn.Module, lm_head_weight: torch.Tensor, dtype: torch.dtype, max_rows: int | None):
        self.block: nn.Module = copy.deepcopy(mtp).to(dtype)
        self.head: torch.Tensor = lm_head_weight.detach().to(dtype)
        self.max_rows = max_rows


def resolve_draft_dtype(name: str, model, device) -> tuple[torch.dtype, int | None]:
    """`name`: auto, model, or a dtype name (EngineConfig.draft_dtype). Returns (dtype, max rows)."""
    model_dtype = model.lm_head.weight.dtype
    if name == "model":
        return model_dtype, None
    if name == "auto":
        on_cpu = torch.device(device).type == "cpu"
        return (torch.float16, AUTO_MAX_ROWS) if on_cpu and model_dtype == torch.float32 else (model_dtype, None)
    if name not in NAMES:
        raise ValueError(f"draft_dtype: expected auto, model or one of {', '.join(NAMES)}, got {name!r}")
    return NAMES[name], None
