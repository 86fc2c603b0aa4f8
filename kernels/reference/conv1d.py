"""Causal depthwise conv1d for Mamba's xBC, with an explicit state of the last K-1 inputs.

Shapes: x (L, C) channels last; weight (C, K); bias (C,); state (C, K-1), oldest input first.
The output is SiLU(conv(x)), as the Mamba-2 mixer applies it.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def causal_conv1d(x, weight, bias, initial_state=None, *, activation: bool = True):
    """Whole sequence. Returns y (L, C) and the new state (C, K-1) (the last K-1 inputs)."""
    L, Cdim = x.shape
    K = weight.shape[1]
    if initial_state is None:
        initial_state = x.new_zeros(Cdim, K - 1)
    xs = torch.cat([initial_state.to(x.dtype), x.t()], dim=1)            # (C, K-1+L)
    y = F.conv1d(xs[None], weight[:, None, :].to(x.dtype), bias.to(x.dtype) if bias is not None else None,
                 groups=Cdim)[0]                                         # (C, L)
    if activation:
        y = F.silu(y)
    return y.t(), xs[:, -(K - 1):].clone()


def causal_conv1d_varlen(x, weight, bias, cu_seqlens, initial_states=None, *, activation: bool = True,
                         max_seqlen=None):
    """S sequences flat in x (L, C), sequence s at rows cu_seqlens[s]:cu_seqlens[s+1]; initial_states
    (S, C, K-1) or None (all fresh). causal_conv1d per sequence: y (L, C) and final states (S, C, K-1) in
    x's dtype. max_seqlen is the Triton kernel's hint (kernels/triton/conv1d.py), unused here."""
    cu = cu_seqlens.tolist() if torch.is_tensor(cu_seqlens) else list(cu_seqlens)
    outs = [causal_conv1d(x[a:b], weight, bias, None if initial_states is None else initial_states[s],
                          activation=activation) for s, (a, b) in enumerate(zip(cu, cu[1:]))]
    return torch.cat([y for y, _ in outs]), torch.stack([st for _, st in outs])


def causal_conv1d_update(x, state, weight, bias, *, activation: bool = True):
    """T new positions (decode or verification). state (C, K-1) is not modified.

    Returns y (T, C) and the state after each position, states (T, C, K-1).
    """
    T = x.shape[0]
    K = weight.shape[1]
    xs = torch.cat([state.to(x.dtype), x.t()], dim=1)                    # (C, K-1+T)
    y, _ = causal_conv1d(x, weight, bias, state, activation=activation)
    states = torch.stack([xs[:, t + 1:t + K] for t in range(T)])         # (T, C, K-1)
    return y, states
