"""Grouped relu² experts for decode-sized passes. Reference: kernels/reference/moe.py.

With few rows (a decode step, a k+1-token verification, an MTP catch-up) the pass loops over the
experts some row chose and runs each on every row, its output weighted by each row's routing weight
(0 for rows that did not choose it). That reads only the chosen experts' weights, as the reference does,
without its sort-by-expert bookkeeping (argsort, bincount, gathers, index_add), which at a handful of
rows costs more than the ~5 products (fewer ops; `benchmarks/engine_profile.py` times the MoE layers).
Exact bfloat16 weights (a checkpoint stored in bfloat16), up to NATIVE_MAX_ROWS rows: one C call that runs
each chosen expert over the rows that chose it (kernels/fast/native/moe.c), reading its weights once.
Otherwise, more rows: where every expert is busy anyway (few experts per choice, T * k >= 2E; not
training), every row goes through every expert in two GEMMs with a dense (T, E) gate (`_every_expert`);
otherwise the reference's schedule sorted by expert, with the products of fast/linear.py.
Shapes: x (T, D_in); topk_weights (T, k) float32; topk_ids (T, k) global ids; up (E, I, D_in); down (E, D_in, I).
"""
from __future__ import annotations

import torch

from ..reference.moe import grouped_experts as _sorted_by_expert
from . import native
from .linear import FEW_ROWS, bf16_bits, derived_weight, expert_linear, linear

# Every expert on every row costs E / k times the chosen experts' products, in two GEMMs and a few ops;
# the schedule sorted by expert costs ~6 ops per expert. With few experts per choice and enough rows
# that every expert is busy anyway (hybrid-mini at 32 rows: 8 experts, top 2), dense wins.
DENSE_MAX_EXPERTS_PER_CHOICE = 4
# The native kernel computes only the chosen experts' products (the dense schedule E / k times as many),
# so it is the cheaper one at a 32-row decode pass too (`benchmarks/engine_profile.py` times the pass).
# Its scratch (T * I floats) lives on the stack: rows are capped.
NATIVE_MAX_ROWS = 64


def grouped_experts(x, topk_weights, topk_ids, up, down, *, first_expert: int = 0):
    """sum_k w_k down_e(relu(up_e x)^2) over the chosen experts this shard owns; (T, D_in) in x's dtype."""
    T, Din = x.shape
    E = up.shape[0]
    k = topk_ids.shape[1]
    training = torch.is_grad_enabled() and (up.requires_grad or down.requires_grad)
    bits = _exact_bf16(x, up, down, training) if T <= NATIVE_MAX_ROWS else None
    if bits is not None:                                # one C call over the chosen experts' bfloat16 bits
        return native.moe_experts(x, topk_weights, topk_ids, *bits, first_expert).to(x.dtype)
    if T > FEW_ROWS and E <= DENSE_MAX_EXPERTS_PER_CHOICE * k and T * k >= 2 * E and not training:
        return _every_expert(x, topk_weights, topk_ids, up, down, first_expert)
    if T > FEW_ROWS:
        return _sorted_by_expert(x, topk_weights, topk_ids, up, down, first_expert=first_expert,
                                  expert_linear=expert_linear)
    weight: dict[int, list[float]] = {}                 # local expert -> routing weight of each row
    for t, (ids, ws) in enumerate(zip((topk_ids - first_expert).tolist(), topk_weights.tolist())):
        for e, w in zip(ids, ws):
            if 0 <= e < E:                              # outside 0..E-1: another shard's expert
                weight.setdefault(e, [0.0] * T)[t] = w
    out = torch.zeros(T, Din, dtype=torch.float32, device=x.device)
    if T > 1 and weight:
        columns = torch.tensor(list(weight.values()), dtype=x.dtype, device=x.device)   # (experts used, T)
    for n, e in enumerate(weight):
        h = expert_linear(x, up, e).relu_().square_()                   # (T, I)
        h.mul_(weight[e][0] if T == 1 else columns[n][:, None])
        if T == 1 and x.dtype == torch.float32:
            out.addmm_(h, down[e].t())                                  # out += h @ down_e^T
        else:
            out += expert_linear(h, down, e).float()
    return out.to(x.dtype)


def _exact_bf16(x, up, down, training: bool):
    """(up, down) as exact bfloat16 bits when the native experts kernel takes these rows; else None."""
    if training or not (x.dtype is torch.float32 and x.is_cpu and x.stride(-1) == 1):
        return None
    up_bits = bf16_bits(up)
    down_bits = bf16_bits(down) if up_bits is not None else None
    return None if down_bits is None else (up_bits, down_bits)


def _every_expert(x, topk_weights, topk_ids, up, down, first_expert: int):
    """Each row through every local expert, the outputs weighted by the row's routing weight (0 where it did
    not choose the expert): up as one (T, E*I) product, down as one (T, E*I) @ (E*I, D_in) product."""
    T, Din = x.shape
    E, I = up.shape[0], up.shape[1]
    local = topk_ids - first_expert
    mine = (local >= 0) & (local < E)                                   # choices of this shard's experts
    gate = torch.zeros(T, E, dtype=torch.float32, device=x.device).scatter_add_(
        1, local.clamp(0, E - 1), topk_weights.float() * mine)         # (T, E) routing weight per expert
    up_all = derived_weight(up, "every_expert_up", lambda w: w.reshape(E * I, Din))            # (E*I, D_in)
    down_all = derived_weight(down, "every_expert_down",
                              lambda w: w.permute(1, 0, 2).reshape(Din, E * I).contiguous())   # (D_in, E*I)
    h = linear(x, up_all).relu_().square_().view(T, E, I)              # (T, E, I)
    h.mul_(gate.to(h.dtype)[:, :, None])
    return linear(h.view(T, E * I), down_all).to(x.dtype)              # (T, D_in)
