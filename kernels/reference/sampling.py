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


# ---- batched verification: S sequences at once, randomness passed in ------------------------------------
#
# S sequences, each with num_drafts[s] (0..k) drafts, padded to k: draft_tokens (S, k). The target's
# distribution (or logits) at the k+1 verified positions: (S, k+1, V); for random sampling the draft
# distributions (S, k, V). Both return (num_accepted (S,) int64, next_token (S,) int64): sequence s's
# new tokens are draft_tokens[s, :num_accepted[s]] then next_token[s] (the corrected token at the first
# rejection, or the bonus token at position num_drafts[s]). These are the definition the Triton kernels
# (kernels/triton/verify.py) match exactly.

def verify_greedy(target: torch.Tensor, draft_tokens: torch.Tensor, num_drafts: torch.Tensor):
    """Greedy verification. target (S, k+1, V) logits or probabilities (their argmax, first index of
    the maximum, is the target's token), or (S, k+1) integer token ids (the argmax already taken).
    Accept drafts while they equal the target's token; next_token: the target's token after them."""
    ids = target.argmax(-1) if target.is_floating_point() else target.long()    # (S, k+1)
    S, k = draft_tokens.shape
    live = torch.arange(k, device=ids.device)[None, :] < num_drafts.to(ids.device)[:, None]
    match = (draft_tokens.long() == ids[:, :k]) & live
    n = match.long().cumprod(-1).sum(-1)                                  # leading matches
    return n, ids.gather(1, n[:, None])[:, 0]


def verify_random(target_probs: torch.Tensor, draft_probs: torch.Tensor, draft_tokens: torch.Tensor,
                  num_drafts: torch.Tensor, uniforms: torch.Tensor):
    """Rejection sampling (Leviathan et al.) with the randomness passed in: uniforms (S, k+1) in [0, 1).

    Draft j (< num_drafts[s]) with p = target_probs[s, j, d], q = draft_probs[s, j, d] is accepted iff
    uniforms[s, j] * q < p: probability min(1, p/q) for u uniform in [0, 1), never a token the target
    gives no mass (even at u = 0), and a product, not a quotient, so every implementation rounds it
    alike. At the first rejection j: next_token is drawn from the residual max(p_j - q_j, 0) (p_j itself
    where the residual is all zero); all accepted: from p at position num_drafts[s]. The draw is an inverse CDF with uniforms[s, k] (the last column, whatever the
    outcome): the first token whose cumulative mass, summed in float64, exceeds u * total (never a
    zero-mass token: past the end, the last token with mass)."""
    S, k1, V = target_probs.shape
    k = k1 - 1
    dev = target_probs.device
    p = target_probs.float()
    d = draft_tokens.long()[..., None]                                        # (S, k, 1)
    pd = p[:, :k].gather(2, d)[..., 0]
    qd = draft_probs.float().gather(2, d)[..., 0] if k else pd
    live = torch.arange(k, device=dev)[None, :] < num_drafts.to(dev)[:, None]
    ok = (uniforms[:, :k].float() * qd < pd) & live
    n = ok.long().cumprod(-1).sum(-1)                                         # (S,) accepted
    rejected = n < num_drafts.to(dev)
    row_p = p.gather(1, n[:, None, None].expand(S, 1, V))[:, 0].double()      # p at position n
    if k:
        row_q = draft_probs.float().gather(1, n.clamp_max(k - 1)[:, None, None].expand(S, 1, V))[:, 0]
        row_q = torch.where(rejected[:, None], row_q.double(), 0.0)
    else:
        row_q = torch.zeros_like(row_p)
    r = (row_p - row_q).clamp_min(0.0)
    r = torch.where((r.sum(-1) > 0)[:, None], r, row_p)                      # an all-zero residual: p
    total = r.sum(-1)
    cdf = r.cumsum(-1)
    threshold = uniforms[:, k].double() * total
    pick = (cdf <= threshold[:, None]).sum(-1)
    last = torch.where(r > 0, torch.arange(V, device=dev), -1).amax(-1)      # the last token with mass
    return n, torch.minimum(pick, last)
