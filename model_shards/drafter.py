"""How serving drafts with the MTP block: in which dtype, and from which tokens.

Drafts are proposals: verification runs in the model's dtype over the full vocabulary and decides
every token, so greedy output is the same whatever the drafter does, and random sampling keeps the
target distribution (the draft distribution q only has to be the one the draft was sampled from; tokens
outside the draft vocabulary get q = 0). On a CPU a decode-sized drafting step is bound by reading
weights (the MTP block and lm_head, 4 MB of it in float32 for hybrid-mini):
- dtype: a checkpoint stored in bfloat16 (loaded as float32) is read through the bfloat16-weight kernel
  (kernels/fast/native/linear.c) at half the bytes and with the model's exact weights: "auto" keeps the
  model's dtype there. Otherwise float16 weights halve those reads, and with one row at a time float16
  products cost no more than float32 ones here; with many rows (a large batch drafting) the CPU's float16
  GEMM is slower than float32. So "auto" then drafts in float16 on a CPU when the model is float32, for
  MTP calls of up to AUTO_MAX_ROWS rows (one or a few sequences), and in the model's dtype otherwise (a
  GPU model is already 16-bit).
- vocabulary: the checkpoint's `draft_vocab.json` (training/draft_vocab.py: its most frequent tokens)
  makes the head of greedy drafts a fraction of lm_head (random sampling drafts from every token).
`benchmarks/engine_profile.py` times drafting per pass through the engine at one sequence, k=3
(docs/BENCHMARKS.md); float16 and the draft vocabulary lowered it there, together with running the MTP MoE
on the newest rows only (model_shards/mtp.py).
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from kernels import ops
from kernels.fast.linear import bf16_bits

NAMES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
AUTO_MAX_ROWS = 8


class Drafter:
    """How the MTP block drafts when serving: which weights (the model's, or a copy in `dtype` for MTP
    calls of at most `max_rows` rows) and which vocabulary (all of it, or `vocab`: the token ids greedy
    drafts may take, e.g. the checkpoint's frequent tokens). The model's own block and lm_head stay as
    they are.

    With a vocabulary the head is kept as a copy of lm_head with the vocabulary's rows first, so the
    draft head is a view of its first rows; rows that sample (random sampling) also get the rest, so
    their draft distribution covers every token (a restricted q misses the target's mass outside the
    vocabulary, which cost acceptance at T = 0.7 in a trial)."""

    def __init__(self, mtp: nn.Module, lm_head_weight: torch.Tensor, *, dtype: torch.dtype | None = None,
                 max_rows: int | None = None, vocab: torch.Tensor | None = None):
        V, dev = lm_head_weight.shape[0], lm_head_weight.device
        self.mtp, self.max_rows, self.vocab_size = mtp, max_rows, V
        self.vocab = None if vocab is None else vocab.to(device=dev, dtype=torch.long)
        if self.vocab is None:
            self.order, self.head = None, lm_head_weight
        else:
            rest = torch.ones(V, dtype=torch.bool, device=dev)
            rest[self.vocab] = False
            self.order = torch.cat([self.vocab, rest.nonzero()[:, 0]])             # vocabulary first
            self.head = lm_head_weight.detach()[self.order].contiguous()           # (V, d) in that order
        self._parts: dict[int, tuple[nn.Parameter, nn.Parameter]] = {}             # head -> (vocabulary, rest)
        self.small: tuple[nn.Module, torch.Tensor] | None = None
        if dtype is not None and dtype != lm_head_weight.dtype:
            self.small = (copy.deepcopy(mtp).to(dtype), self.head.detach().to(dtype))

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of calls within the row limit."""
        return self.head.dtype if self.small is None else self.small[1].dtype

    def weights_for(self, rows: int) -> tuple[nn.Module, torch.Tensor]:
        """(MTP block, head) for an MTP call over `rows` rows."""
        if self.small is not None and (self.max_rows is None or rows <= self.max_rows):
            return self.small
        return self.mtp, self.head

    def logits(self, normed: torch.Tensor, head: torch.Tensor, full_rows: list[int] | None) -> torch.Tensor:
        """normed (R, d) -> float32 logits (R, V): over the vocabulary only (-inf elsewhere), except the
        rows in `full_rows`, which get every token's."""
        if self.vocab is None:
            return ops.linear(normed, head).float()
        n = len(self.vocab)
        parts = self._parts.get(head.data_ptr())
        if parts is None:
            if head.is_cuda:    # views: a copy of a large vocabulary's head would cost GPU memory
                parts = (head[:n], head[n:])
            else:               # on a CPU, Parameters of their own, so ops.linear keeps its fast copies of them
                parts = (nn.Parameter(head[:n].clone(), requires_grad=False),
                         nn.Parameter(head[n:].clone(), requires_grad=False))
            self._parts[head.data_ptr()] = parts
        out = normed.new_full((normed.shape[0], self.vocab_size), float("-inf"), dtype=torch.float32)
        out.index_copy_(1, self.vocab, ops.linear(normed, parts[0]).float())
        if full_rows:
            rows = out[full_rows]
            rows.index_copy_(1, self.order[n:], ops.linear(normed[full_rows], parts[1]).float())
            out[full_rows] = rows
        return out


def resolve_draft_dtype(name: str, model, device) -> tuple[torch.dtype, int | None]:
    """`name`: auto, model, or a dtype name (EngineConfig.draft_dtype). Returns (dtype, max rows)."""
    model_dtype = model.lm_head.weight.dtype
    if name == "model":
        return model_dtype, None
    if name == "auto":
        on_cpu = torch.device(device).type == "cpu"
        if on_cpu and model_dtype == torch.float32 and bf16_bits(model.lm_head.weight) is not None:
            return model_dtype, None        # exact bfloat16 weights: the native kernel reads them at half the bytes
        return (torch.float16, AUTO_MAX_ROWS) if on_cpu and model_dtype == torch.float32 else (model_dtype, None)
    if name not in NAMES:
        raise ValueError(f"draft_dtype: expected auto, model or one of {', '.join(NAMES)}, got {name!r}")
    return NAMES[name], None
