"""Grouped relu² experts for a few tokens, in a fixed handful of ops. Reference: kernels/reference/moe.py.

Three schedules, chosen by how many (token, choice) pairs there are per local expert:
  * few choices (a decode step): loop over the (token, choice) pairs, one small GEMV pair each; only the
    chosen experts' weights are read.
  * choices >= local experts (verification, small batches): every local expert on every token as two
    batched GEMMs, weighted by a dense (T, E) gate that is 0 where an expert was not chosen. Reads all
    local experts once, which those tokens would mostly read anyway, with no data-dependent op count.
  * many tokens (prefill, large batches): the reference's sort-by-expert loop, which computes only the
    chosen pairs; there the FLOPs, not the op count, are what matter.
Shapes: x (T, D_in); topk_weights (T, k) float32; topk_ids (T, k) global ids; up (E, I, D_in); down (E, D_in, I).
"""
from __future__ import annotations

import torch

from ..reference.moe import grouped_experts as _sorted_by_expert

DENSE_MAX_PAIRS_PER_EXPERT = 4


def grouped_experts(x, topk_weights, topk_ids, up, down, *, first_expert: int = 0):
    """sum_k w_k down_e(relu(up_e x)^2) over the chosen experts this shard owns; (T, D_in) in x's dtype."""
    T, Din = x.shape
    E = up.shape[0]
    k = topk_ids.shape[1]
    local = topk_ids - first_expert                                     # (T, k); outside 0..E-1: other shards
    if T * k < E:
        out = torch.zeros(T, Din, dtype=torch.float32, device=x.device)
        for t, (ids, ws) in enumerate(zip(local.tolist(), topk_weights.tolist())):
            for e, w in zip(ids, ws):
                if 0 <= e < E:
                    h = torch.relu(up[e] @ x[t]).square()              # (I,) matrix-vector
                    out[t] += (down[e] @ h).float() * w
        return out.to(x.dtype)
    if T * k > DENSE_MAX_PAIRS_PER_EXPERT * E:
        return _sorted_by_expert(x, topk_weights, topk_ids, up, down, first_expert=first_expert)
    owned = (local >= 0) & (local < E)
    gate = torch.zeros(T, E, dtype=torch.float32, device=x.device)
    gate.scatter_add_(1, local.clamp(0, E - 1), topk_weights.float() * owned)    # (T, E)
    xe = x.expand(E, T, Din)                                            # every local expert sees every token
    h = torch.relu(torch.bmm(xe, up.transpose(1, 2))).square()          # (E, T, I)
    h = h * gate.t()[..., None].to(h.dtype)                             # gate applied before the down proj
    return torch.bmm(h, down.transpose(1, 2)).sum(0, dtype=torch.float32).to(x.dtype)  # (T, D_in)
