"""Grouped relu² experts for a few tokens, in a fixed handful of ops. Reference: kernels/reference/moe.py.

Two schedules, chosen by how many of this shard's experts the tokens need:
  * few choices (a decode step): loop over the (token, choice) pairs, one small GEMV pair each; only the
    chosen experts' weights are read.
  * choices >= local experts (verification, small batches): every local expert on every token as two
    batched GEMMs, weighted by a dense (T, E) gate that is 0 where an expert was not chosen. Reads all
    local experts once, which those tokens would mostly read anyway, with no data-dependent op count.
Shapes: x (T, D_in); topk_weights (T, k) float32; topk_ids (T, k) global ids; up (E, I, D_in); down (E, D_in, I).
"""
from __future__ import annotations

import torch


def grouped_experts(x, topk_weights, topk_ids, up, down, *, first_expert: int = 0):
    """sum_k w_k down_e(relu(up_e x)^2) over the chosen experts this shard owns; (T, D_in) in x's dtype."""
    T, Din = x.shape
    E, I = up.shape[0], up.shape[1]
    k = topk_ids.shape[1]
    local = topk_ids - first_expert                                     # (T, k); outside 0..E-1: other shards
    if T * k < E:
        out = torch.zeros(T, Din, dtype=torch.float32, device=x.device)
        for t, (ids, ws) in enumerate(zip(local.tolist(), topk_weights.tolist())):
            for e, w in zip(ids, ws):
                if 0 <= e < E:
                    h = torch.relu(x[t] @ up[e].t()).square()          # (I,)
                    out[t] += (h @ down[e].t()).float() * w
        return out.to(x.dtype)
    owned = (local >= 0) & (local < E)
    gate = torch.zeros(T, E, dtype=torch.float32, device=x.device)
    gate.scatter_add_(1, local.clamp(0, E - 1), topk_weights.float() * owned)    # (T, E)
    h = torch.relu(x @ up.view(E * I, Din).t()).square()                # (T, E*I)
    h = h.view(T, E, I).transpose(0, 1) * gate.t()[..., None].to(h.dtype)       # (E, T, I), gate applied
    return torch.bmm(h, down.transpose(1, 2)).sum(0, dtype=torch.float32).to(x.dtype)  # (T, D_in)
