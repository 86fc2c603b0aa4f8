"""MoE routing (sigmoid router with selection-only correction bias) and grouped relu² expert compute.

Shapes: x (T, D) tokens; gate logits (T, E); topk_ids, topk_weights (T, k);
expert weights stacked: up (E_local, I, D_in), down (E_local, D_in, I).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def route(router_logits: torch.Tensor, correction_bias: torch.Tensor | None, *, top_k: int,
          normalize: bool, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (topk_weights float32 (T, k), topk_ids int64 (T, k)). The bias chooses, never weighs."""
    scores = torch.sigmoid(router_logits.float())
    choice = scores if correction_bias is None else scores + correction_bias.float()[None]
    topk_ids = torch.topk(choice, top_k, dim=-1, sorted=True).indices
    weights = scores.gather(1, topk_ids)
    if normalize:
        weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
    return weights * scaling, topk_ids


def grouped_experts(x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
                    up: torch.Tensor, down: torch.Tensor, *, first_expert: int = 0,
                    expert_linear=None) -> torch.Tensor:
    """sum_k w_k * down_e(relu(up_e(x))^2) over the chosen experts this shard owns.

    Experts first_expert .. first_expert+E_local-1 live here; choices outside that range are skipped,
    so the sum over all shards' outputs is the full MoE output. Returns (T, D_in) in x's dtype.
    The (token, choice) pairs are sorted by expert once, so each expert works on a contiguous slice.
    `expert_linear(x, W, e)` = x @ W[e]^T is the product used per expert (a fast path may pass its own).
    """
    if expert_linear is None:
        def expert_linear(x, W, e):
            return F.linear(x, W[e])
    T, Din = x.shape
    k = topk_ids.shape[1]
    local = (topk_ids - first_expert).reshape(-1)                      # (T*k,) expert of each choice
    n_local = up.shape[0]
    order = torch.argsort(local, stable=True)                          # choices grouped by expert
    counts = torch.bincount(local.clamp(-1, n_local).add(1), minlength=n_local + 2).tolist()
    tok = order // k                                                   # token of each sorted choice
    xs = x[tok]                                                        # (T*k, D_in) sorted by expert
    ys = torch.zeros(T * k, Din, dtype=torch.float32, device=x.device)
    start = counts[0]                                                  # choices below first_expert
    for e in range(n_local):
        n = counts[e + 1]
        if n:
            h = torch.relu(expert_linear(xs[start:start + n], up, e)).square()
            ys[start:start + n] = expert_linear(h, down, e).float()
        start += n
    w = topk_weights.reshape(-1)[order].float()[:, None]
    out = torch.zeros(T, Din, dtype=torch.float32, device=x.device)
    out.index_add_(0, tok, ys * w)                                     # choices of other shards add 0
    return out.to(x.dtype)
