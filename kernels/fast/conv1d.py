"""Causal depthwise conv1d for decoding, batched over sequences: T new positions of S sequences with the
state after each one, or one new position of S sequences, in a few ops.
Reference: kernels/reference/conv1d.py (causal_conv1d_update), per sequence: x (T, C); state (C, K-1);
weight (C, K); bias (C,) or None."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def causal_conv1d_update(x, state, weight, bias, *, activation: bool = True):
    """T new positions of each of S sequences: x (S, T, C); state (S, C, K-1) or None (fresh: zeros).
    Returns y (S, T, C) = SiLU(conv) and states (S, T, C, K-1): the last K-1 inputs after each position."""
    S, T, Cdim = x.shape
    K = weight.shape[1]
    past = x.new_zeros(S, K - 1, Cdim) if state is None else state.to(x.dtype).transpose(1, 2)
    xs = torch.cat([past, x], dim=1)                                   # (S, K-1+T, C), oldest first
    # Time-major, so each tap is a multiply-add over contiguous (T, C) rows: K fused ops, not a conv call
    # (oneDNN's depthwise conv costs ~100 us at these sizes) nor a product over unfolded windows (~1.5x).
    taps = weight.to(x.dtype).t()                                      # (K, C)
    y = xs[:, :T] * taps[0] if bias is None else torch.addcmul(bias.to(x.dtype), xs[:, :T], taps[0])
    for k in range(1, K):
        y.addcmul_(xs[:, k:k + T], taps[k])
    if activation:
        y = F.silu(y)
    return y, xs.unfold(1, K - 1, 1)[:, 1:]                            # states: (S, T, C, K-1)


def conv_step(x, states, weight, bias, *, activation: bool = True):
    """One new position of each of S sequences (batched decode): x (S, C), states (S, C, K-1).
    Returns y (S, C) and the new states (S, C, K-1)."""
    new = states.clone()
    return conv_step_(new, x, weight, bias, activation=activation), new


def conv_step_(states, x, weight, bias, *, activation: bool = True):
    """conv_step in place: states (S, C, K-1) float32 (a range of cache slots, or a gathered copy) take
    the new position; returns y (S, C). The window is laid out tap-major once, (K, S, C) contiguous, so
    the taps are one multiply and one sum over the leading axis and the new state one strided copy: fewer
    and contiguous ops than tap by tap over the strided state (whose shift needed a clone), and cheaper
    than a product summed over a trailing axis of K (timed at S=1 and S=32; the engine's effect shows in
    benchmarks/engine.py's decode rows)."""
    w = weight.to(x.dtype)
    window = torch.cat([states.to(x.dtype).permute(2, 0, 1), x[None]])    # (K, S, C), oldest first
    y = (window * w.t()[:, None, :]).sum(0)                                # (S, C)
    if bias is not None:
        y.add_(bias.to(x.dtype))
    states.copy_(window[1:].permute(1, 2, 0))
    return F.silu(y) if activation else y
