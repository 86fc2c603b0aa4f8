"""Grouped relu² experts for decode-sized passes. Reference: kernels/reference/moe.py.

With few rows (a decode step, a k+1-token verification, an MTP catch-up) the pass loops over the
experts some row chose and runs each on every row, its output weighted by each row's routing weight
(0 for rows that did not choose it). That reads only the chosen experts' weights, as the reference does,
without its sort-by-expert bookkeeping (argsort, bincount, gathers, index_add), which at a handful of
rows costs more than the ~5 products. (In `benchmarks/engine_profile.py` the MoE layers of a k=3 pass
measured 3.9 ms before and 3.8 ms after: within noise; the gain is in ops, not weight reads.)
More rows use the reference's schedule with the few-rows product of fast/linear.py. A dense every-expert schedule (tried) reads experts no row chose
and was slower in place.
Shapes: x (T, D_in); topk_weights (T, k) float32; topk_ids (T, k) global ids; up (E, I, D_in); down (E, D_in, I).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..reference.moe import grouped_experts as _sorted_by_expert
from .linear import FEW_ROWS, linear


def grouped_experts(x, topk_weights, topk_ids, up, down, *, first_expert: int = 0):
    """sum_k w_k down_e(relu(up_e x)^2) over the chosen experts this shard owns; (T, D_in) in x's dtype."""
    T, Din = x.shape
    E = up.shape[0]
    if T > FEW_ROWS:
        return _sorted_by_expert(x, topk_weights, topk_ids, up, down, first_expert=first_expert, linear=linear)
    weight: dict[int, list[float]] = {}                 # local expert -> routing weight of each row
    for t, (ids, ws) in enumerate(zip((topk_ids - first_expert).tolist(), topk_weights.tolist())):
        for e, w in zip(ids, ws):
            if 0 <= e < E:                              # outside 0..E-1: another shard's expert
                weight.setdefault(e, [0.0] * T)[t] = w
    out = torch.zeros(T, Din, dtype=torch.float32, device=x.device)
    if T > 1 and weight:
        columns = torch.tensor(list(weight.values()), dtype=x.dtype, device=x.device)   # (experts used, T)
    for n, e in enumerate(weight):
        h = F.linear(x, up[e]).relu_().square_()                        # (T, I)
        h.mul_(weight[e][0] if T == 1 else columns[n][:, None])
        if x.dtype == torch.float32:
            out.addmm_(h, down[e].t())                                  # out += h @ down_e^T
        else:
            out += F.linear(h, down[e]).float()
    return out.to(x.dtype)
