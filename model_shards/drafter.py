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
    """How the MTP block drafts when serving: which weights (the model's, or a copy in `dtype` for MTP
    calls of at most `max_rows` rows) and which vocabulary (all of it, or `vocab`: the token ids drafts
    may take, e.g. the checkpoint's frequent tokens). The model's own block and lm_head stay as they are."""

    def __init__(self, mtp: nn.Module, lm_head_weight: torch.Tensor, *, dtype: torch.dtype | None = None,
                 max_rows: int | None = None, vocab: torch.Tensor | None = None):
        self.mtp, self.max_rows, self.vocab_size = mtp, max_rows, lm_head_weight.shape[0]
        self.vocab = None if vocab is None else vocab.to(device=lm_head_weight.device, dtype=torch.long)
        self.head = lm_head_weight if self.vocab is None else lm_head_weight.detach()[self.vocab].contiguous()
        self.small: tuple[nn.Module, torch.Tensor] | None = None
        if dtype is not None and dtype != lm_head_weight.dtype:
            self.small = (copy.deepcopy(mtp).to(dtype), self.head.detach().to(dtype))

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of calls within the row limit."""
        return self.head.dtype if self.small is None else self.small[1].dtype

    def weights_for(self, rows: int) -> tuple[nn.Module, torch.Tensor]:
        """(MTP block, head rows (V', d)) for an MTP call over `rows` rows."""
        if self.small is not None and (self.max_rows is None or rows <= self.max_rows):
            return self.small
        return self.mtp, self.head

    def full_vocab(self, logits: torch.Tensor) -> torch.Tensor:
        """(R, V') logits over the draft vocabulary -> (R, V), -inf for tokens drafts may not take."""
        if self.vocab is None:
            return logits
        out = logits.new_full((logits.shape[0], self.vocab_size), float("-inf"))
        return out.index_copy_(1, self.vocab, logits)


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
