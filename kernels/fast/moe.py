"""Grouped relu² experts for a decode step. Reference: kernels/reference/moe.py.

A decode step (fewer (token, choice) pairs than local experts) loops over the pairs with one
matrix-vector pair each, reading only the chosen experts' weights: at one token that beats the
reference's sort-by-expert bookkeeping. With more pairs the reference's schedule is used, with the
few-rows product of fast/linear.py: it reads each touched expert once, and on a CPU these layers are
bound by reading expert weights (a dense every-expert schedule, tried, reads experts no token chose and
was slower in place).
Shapes: x (T, D_in); topk_weights (T, k) float32; topk_ids (T, k) global ids; up (E, I, D_in); down (E, D_in, I).
"""
from __future__ import annotations

import torch

from ..reference.moe import grouped_experts as _sorted_by_expert
from .linear import linear


def grouped_experts(x, topk_weights, topk_ids, up, down, *, first_expert: int = 0):
    """sum_k w_k down_e(relu(up_e x)^2) over the chosen experts this shard owns; (T, D_in) in x's dtype."""
    T, Din = x.shape
    E, k = up.shape[0], topk_ids.shape[1]
    if T * k >= E:
        return _sorted_by_expert(x, topk_weights, topk_ids, up, down, first_expert=first_expert, linear=linear)
    out = torch.zeros(T, Din, dtype=torch.float32, device=x.device)
    local = (topk_ids - first_expert).tolist()                          # outside 0..E-1: other shards
    for t, (ids, ws) in enumerate(zip(local, topk_weights.tolist())):
        for e, w in zip(ids, ws):
            if 0 <= e < E:
                h = torch.relu(up[e] @ x[t]).square()                  # (I,) matrix-vector
                out[t] += (down[e] @ h).float() * w
    return out.to(x.dtype)
