"""Token sampling and speculative verification by rejection sampling.

Greedy: accept drafts while they equal the target's argmax. Random: accept draft d with probability
min(1, p(d)/q(d)); at the first rejection sample from norm(max(p - q, 0)); if all pass, a bonus token
from p at the last position. This keeps the output distribution exactly p (Leviathan et al., 2023).
"""
from __future__ import annotations

import torch


def probs_from_logits(logits: torch.Tensor, temperature: float, top_k: int = 0, top_p: float = 1.0,
                      min_p: float = 0.0) -> torch.Tensor:
    """logits (..., V) -> probabilities (..., V) float32 after temperature, then min-p, top-k and top-p
    filtering (vLLM's order). min_p drops tokens whose probability is below min_p * the top probability."""
    logits = logits.float() / max(temperature, 1e-6)
    if min_p > 0.0:
        p = torch.softmax(logits, dim=-1)
        logits = logits.masked_fill(p < min_p * p.amax(dim=-1, keepdim=True), float("-inf"))
    if top_k and 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, idx = torch.sort(logits, dim=-1, descending=True)
        cum = torch.softmax(sorted_logits, dim=-1).cumsum(-1)
        drop = cum - torch.softmax(sorted_logits, dim=-1) >= top_p      # keep the smallest prefix reaching top_p
        drop[..., 0] = False    # and never less than the top token: a top_p that is 0 in float32 (5e-324) drops all
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, idx, sorted_logits)
    return torch.softmax(logits, dim=-1)


def rejection_sample(target_probs: torch.Tensor, draft_tokens: torch.Tensor, draft_probs: torch.Tensor | None,
                     generator: torch.Generator | None = None) -> tuple[list[int], int]:
    """Verify k drafts of one sequence.

    target_probs (k+1, V): the target's distribution at each verified position (greedy: one-hot is fine,
    argmax is used when draft_probs is None). draft_tokens (k,). draft_probs (k, V) or None for greedy.
    Returns (the new tokens: accepted drafts then one corrected or bonus token, number of accepted drafts).
    """
    k = draft_tokens.shape[0]
    if draft_probs is None:
        target = target_probs.argmax(-1)
        n = 0
        while n < k and int(draft_tokens[n]) == int(target[n]):
            n += 1
        return [int(t) for t in draft_tokens[:n]] + [int(target[n])], n
    u = torch.rand(k, generator=generator, device=target_probs.device) if k else None
    for i in range(k):
        d = int(draft_tokens[i])
        p, q = target_probs[i, d].item(), draft_probs[i, d].item()
        if q <= 0 or u[i].item() > p / q:
            residual = (target_probs[i] - draft_probs[i]).clamp_min(0)
            if residual.sum() <= 0:
                residual = target_probs[i]
            tok = int(torch.multinomial(residual / residual.sum(), 1, generator=generator))
            return [int(t) for t in draft_tokens[:i]] + [tok], i
    bonus = int(torch.multinomial(target_probs[k], 1, generator=generator))
    return [int(t) for t in draft_tokens] + [bonus], k
