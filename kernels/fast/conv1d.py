"""Causal depthwise conv1d for decoding: T new positions of one sequence with the state after each one,
or one new position of each of S sequences, in a few ops.
Reference: kernels/reference/conv1d.py (causal_conv1d_update). Shapes: x (T, C); state (C, K-1) or None
(a fresh sequence: zeros); weight (C, K); bias (C,) or None."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def causal_conv1d_update(x, state, weight, bias, *, activation: bool = True):
    """Returns y (T, C) = SiLU(conv) and states (T, C, K-1): the last K-1 inputs after each position."""
    T, Cdim = x.shape
    K = weight.shape[1]
    if state is None:
        state = x.new_zeros(Cdim, K - 1)
    xs = torch.cat([state.to(x.dtype), x.t()], dim=1)                  # (C, K-1+T), oldest first
    # Each output is a K-wide window of xs: a multiply-add, not a conv call (oneDNN's depthwise conv
    # costs ~100 us at these sizes).
    y = (xs.unfold(1, K, 1) * weight[:, None, :].to(x.dtype)).sum(-1)  # (C, T)
    if bias is not None:
        y = y + bias.to(x.dtype)[:, None]
    if activation:
        y = F.silu(y)
    return y.t(), xs.unfold(1, K - 1, 1)[:, 1:].transpose(0, 1)        # states: (T, C, K-1) view


def conv_step(x, states, weight, bias, *, activation: bool = True):
    """One new position of each of S sequences (batched decode): x (S, C), states (S, C, K-1).
    Returns y (S, C) and the new states (S, C, K-1)."""
    xs = torch.cat([states.to(x.dtype), x[..., None]], dim=-1)         # (S, C, K), oldest first
    y = (xs * weight.to(x.dtype)).sum(-1)
    if bias is not None:
        y = y + bias.to(x.dtype)
    if activation:
        y = F.silu(y)
    return y, xs[..., 1:]
