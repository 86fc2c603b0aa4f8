"""Penalties and logit_bias as vLLM applies them, on the last stage's logits before temperature.

For the verified rows of one sequence (row j gives output token number num_generated + j):
  logit_bias:          logits[:, t] += bias[t]
  repetition_penalty:  for tokens seen in prompt + output so far: logit / r if logit > 0 else logit * r
  frequency_penalty:   logits -= f * count of the token in the output so far
  presence_penalty:    logits -= p * (count > 0)
"So far" for row j is the committed tokens plus drafts[:j]: exactly the context that token would have
if the drafts before it are accepted, so greedy MTP picks what MTP-off decoding picks and rejection
sampling verifies against the same penalized distribution. The committed tokens are the ones the last
stage has seen as inputs or accepted as drafts (`History`); nothing else crosses stages.
"""
from __future__ import annotations

import torch

from .sampling_params import SamplingParams

LOGIT_LIMIT = 1e30        # adjusted logits stay finite even divided by the smallest temperature (1e-6)


class History:
    """Per sequence, its settled tokens at positions 0..: what the last stage has seen as (non-draft) inputs
    (prompt, then each output as it is fed back) and the drafts it accepted. Kept only for requests with
    a penalty; a pass starting at position p (0 after a preemption's recompute) drops anything from p on."""

    def __init__(self):
        self._tokens: dict[int, list[int]] = {}

    def note(self, seq_id: int, start_pos: int, tokens: list[int]) -> list[int]:
        """This pass's committed inputs, starting at position start_pos (0 after a preemption's recompute)."""
        hist = self._tokens.setdefault(seq_id, [])
        del hist[start_pos:]
        hist.extend(tokens)
        return hist

    def accept(self, seq_id: int, drafts: list[int]) -> None:
        """Drafts verified this pass: settled right after its inputs (the next pass starts past them)."""
        self._tokens.setdefault(seq_id, []).extend(drafts)

    def tokens(self, seq_id: int) -> list[int]:
        return self._tokens.get(seq_id, [])

    def drop(self, seq_id: int) -> None:
        self._tokens.pop(seq_id, None)

    def __len__(self) -> int:
        return len(self._tokens)


def apply(logits: torch.Tensor, params: SamplingParams, history: list[int], prompt_len: int,
          drafts: list[int]) -> torch.Tensor:
    """logits (1 + len(drafts), V) float32, adjusted in place (and returned). `history`: prompt + committed
    outputs (the last of them is this pass's first input); `drafts`: the drafts under verification."""
    n, vocab = logits.shape
    dev = logits.device
    if params.logit_bias:
        pairs = [(t, b) for t, b in params.logit_bias if 0 <= t < vocab]    # ids past the vocabulary: no token
        if pairs:
            ids = torch.tensor([t for t, _ in pairs], device=dev)
            bias = torch.tensor([b for _, b in pairs], dtype=logits.dtype, device=dev)
            logits.index_add_(1, ids, bias.expand(n, -1).contiguous())
    if not params.uses_history:
        return logits
    hist = torch.tensor(history, dtype=torch.long, device=dev)
    prompt, output = (x[(x >= 0) & (x < vocab)] for x in (hist[:prompt_len], hist[prompt_len:]))
    counts = torch.bincount(output, minlength=vocab).to(logits.dtype).expand(n, -1).clone()  # (n, V)
    if n > 1:
        d = torch.tensor(drafts, dtype=torch.long, device=dev).clamp(0, vocab - 1)
        onehot = torch.zeros(n - 1, vocab, dtype=logits.dtype, device=dev)
        onehot[torch.arange(n - 1, device=dev), d] = 1.0
        counts[1:] += onehot.cumsum(0)                  # row j also counts drafts[:j]
    if params.repetition_penalty != 1.0:
        seen = counts > 0
        seen |= (torch.bincount(prompt, minlength=vocab) > 0)[None]
        r = params.repetition_penalty
        adjusted = torch.where(seen, torch.where(logits > 0, logits / r, logits * r), logits)
        # An extreme r (any r > 0 is allowed, as in vLLM) must not overflow to inf: softmax would give NaN.
        logits.copy_(adjusted.clamp_(-LOGIT_LIMIT, LOGIT_LIMIT))
    if params.frequency_penalty:
        logits -= params.frequency_penalty * counts
    if params.presence_penalty:
        logits -= params.presence_penalty * (counts > 0).to(logits.dtype)
    return logits
