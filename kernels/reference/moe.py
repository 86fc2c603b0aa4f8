"""MoE routing (sigmoid router with selection-only correction bias) and grouped relu² expert compute.

Shapes: x (T, D) tokens; gate logits (T, E); topk_ids, topk_weights (T, k);
expert weights stacked: up (E_local, I, D_in), down (E_local, D_in, I).
"""
from __future__ import annotations

import torch


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
                    up: torch.Tensor, down: torch.Tensor, *, first_expert: int = 0) -> torch.Tensor:
    """sum_k w_k * down_e(relu(up_e(x))^2) over the chosen experts this shard owns.

    Experts first_expert .. first_expert+E_local-1 live here; choices outside that range are skipped,
    so the sum over all shards' outputs is the full MoE output. Returns (T, D_in) in x's dtype.
    """
    T, Din = x.shape
    out = torch.zeros(T, Din, dtype=torch.float32, device=x.device)
    local = topk_ids - first_expert
    n_local = up.shape[0]
    for e in torch.unique(local).tolist():
        if e < 0 or e >= n_local:
            continue
        tok, slot = torch.nonzero(local == e, as_tuple=True)
        h = torch.relu(x[tok] @ up[e].t()).square()
        y = h @ down[e].t()
        out.index_add_(0, tok, y.float() * topk_weights[tok, slot, None].float())
    return out.to(x.dtype)
