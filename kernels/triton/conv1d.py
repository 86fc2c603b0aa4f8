"""Causal depthwise conv1d for decoding in Triton: one new position per sequence (conv_step_, conv_step)
and T new positions with the window after each (causal_conv1d_update, verification).

Contract: kernels/fast/conv1d.py, same signatures; math: kernels/reference/conv1d.py. Per channel c,
with the window w_c holding the K-1 previous inputs, oldest first:
    y[c] = silu(bias[c] + sum_{j<K-1} weight[c, j] w_c[j] + weight[c, K-1] x[c]);  w_c <- [w_c[1:], x[c]]
Shapes: x (S, C) or (S, T, C); states (S, C, K-1) float32 (cache slots); weight (C, K); bias (C,) or None.
As in the references, weight, bias and the window are rounded to x's dtype before use (the model's
conv runs in its activation dtype); products are accumulated in float32 and y rounded once.

Why a kernel: the torch path issues K multiply-adds over (S, C) rows plus a shift of the window (read,
copy, write): ~2K+3 passes over memory. Here one program per (row, block of channels) reads the window
and x once, computes the K taps, SiLU, and writes y and the shifted window once. The shift is done in
registers (each new window element depends on the whole old row), so in-place updates have no
read-after-write hazard between threads.
"""
from __future__ import annotations

import triton
import triton.language as tl

from ._common import Launcher, empty, next_pow2

_CONFIGS = [triton.Config({"BLOCK_C": bc}, num_warps=w) for bc in (64, 128, 256, 512) for w in (2, 4)]


def _fixed(Cdim: int) -> dict:
    return {"BLOCK_C": min(next_pow2(Cdim), 32), "num_warps": 4}


@triton.jit
def _shift_in(win, xv, kk, KM1: tl.constexpr):
    """(BLOCK_C, KP) window, oldest first -> [win[:, 1:], x]: win[:, k+1] selected into column k (a
    reduction over the row, so every new element depends on the whole old row) and x into column K-2."""
    sel = kk[None, :, None] + 1 == kk[None, None, :]                      # (1, KP, KP): column k <- k+1
    shifted = tl.sum(tl.where(sel, win[:, None, :], 0.0), axis=2)
    return tl.where(kk[None, :] == KM1 - 1, xv[:, None], shifted)


@triton.jit
def _conv_step_kernel(
    s_in, s_out, slots, x, w, bias, y,
    Cdim, si_s, si_c, si_k, so_s, so_c, so_k, x_s, x_c, w_c, w_k, y_s, y_c,
    K: tl.constexpr, KP: tl.constexpr, HAS_INIT: tl.constexpr, HAS_SLOTS: tl.constexpr,
    HAS_BIAS: tl.constexpr, SILU: tl.constexpr, BLOCK_C: tl.constexpr,
):
    s = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)      # (BLOCK_C,)
    kk = tl.arange(0, KP)                                       # (KP,) window positions, KP >= K-1
    mc = c < Cdim
    mk = kk < K - 1
    m2 = mc[:, None] & mk[None, :]
    row = s
    if HAS_SLOTS:
        row = tl.load(slots + s).to(tl.int64)
    xq = tl.load(x + s * x_s + c * x_c, mask=mc, other=0.0)
    xt = xq.dtype
    xv = xq.to(tl.float32)
    if HAS_INIT:
        win = tl.load(s_in + row * si_s + c[:, None] * si_c + kk[None, :] * si_k, mask=m2, other=0.0)
    else:
        win = tl.zeros((BLOCK_C, KP), dtype=tl.float32)
    taps = tl.load(w + c[:, None] * w_c + kk[None, :] * w_k, mask=m2, other=0.0).to(xt).to(tl.float32)
    w_last = tl.load(w + c * w_c + (K - 1) * w_k, mask=mc, other=0.0).to(xt).to(tl.float32)
    acc = tl.sum(win.to(xt).to(tl.float32) * taps, axis=1) + w_last * xv
    if HAS_BIAS:
        acc += tl.load(bias + c, mask=mc, other=0.0).to(xt).to(tl.float32)
    if SILU:
        acc = acc * tl.sigmoid(acc)
    tl.store(y + s * y_s + c * y_c, acc.to(y.dtype.element_ty), mask=mc)
    new = _shift_in(win.to(tl.float32), xv, kk, K - 1)
    tl.store(s_out + row * so_s + c[:, None] * so_c + kk[None, :] * so_k, new.to(s_out.dtype.element_ty), mask=m2)


_step = Launcher(_conv_step_kernel, _CONFIGS, key=["Cdim", "K"], restore=("s_out",))


def _launch_step(state_in, state_out, x, weight, bias, activation, slots):
    S, Cdim = x.shape
    K = weight.shape[1]
    y = empty(S, Cdim, dtype=x.dtype, device=x.device)
    si = state_in.stride() if state_in is not None else (0, 0, 0)
    _step(lambda m: (S, triton.cdiv(Cdim, m["BLOCK_C"])),
          state_in if state_in is not None else state_out, state_out, slots.contiguous() if slots is not None else y,
          x, weight, bias.contiguous() if bias is not None else weight, y,
          Cdim, *si, *state_out.stride(), *x.stride(), *weight.stride(), *y.stride(),
          cuda=x.is_cuda, fixed=_fixed(Cdim), K=K, KP=next_pow2(K - 1), HAS_INIT=state_in is not None,
          HAS_SLOTS=slots is not None, HAS_BIAS=bias is not None, SILU=activation)
    return y


def conv_step_(states, x, weight, bias, *, activation: bool = True, slots=None):
    """In place: states (S, C, K-1) float32 take the new position x (S, C); or, with slots (S,) int
    (distinct), states is the slot cache (num_slots, C, K-1) and row s updates states[slots[s]].
    Returns y (S, C) in x's dtype."""
    return _launch_step(states, states, x, weight, bias, activation, slots)


def conv_step(x, states, weight, bias, *, activation: bool = True):
    """One new position of each of S sequences: x (S, C), states (S, C, K-1) not modified.
    Returns y (S, C) and the new states (S, C, K-1) in states' dtype."""
    new = empty(*states.shape, dtype=states.dtype, device=x.device)
    return _launch_step(states, new, x, weight, bias, activation, None), new


@triton.jit
def _conv_update_kernel(
    s_in, x, w, bias, y, states,
    T, Cdim, si_s, si_c, si_k, x_s, x_t, x_c, w_c, w_k, y_s, y_t, y_c, o_s, o_t, o_c, o_k,
    K: tl.constexpr, KP: tl.constexpr, HAS_INIT: tl.constexpr, HAS_BIAS: tl.constexpr,
    SILU: tl.constexpr, BLOCK_C: tl.constexpr,
):
    s = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    kk = tl.arange(0, KP)
    mc = c < Cdim
    mk = kk < K - 1
    m2 = mc[:, None] & mk[None, :]
    xt = x.dtype.element_ty
    if HAS_INIT:
        win = tl.load(s_in + s * si_s + c[:, None] * si_c + kk[None, :] * si_k, mask=m2, other=0.0)
        win = win.to(xt).to(tl.float32)
    else:
        win = tl.zeros((BLOCK_C, KP), dtype=tl.float32)
    taps = tl.load(w + c[:, None] * w_c + kk[None, :] * w_k, mask=m2, other=0.0).to(xt).to(tl.float32)
    w_last = tl.load(w + c * w_c + (K - 1) * w_k, mask=mc, other=0.0).to(xt).to(tl.float32)
    if HAS_BIAS:
        b = tl.load(bias + c, mask=mc, other=0.0).to(xt).to(tl.float32)
    else:
        b = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for t in range(T):
        xv = tl.load(x + s * x_s + t * x_t + c * x_c, mask=mc, other=0.0).to(tl.float32)
        acc = tl.sum(win * taps, axis=1) + w_last * xv + b
        if SILU:
            acc = acc * tl.sigmoid(acc)
        tl.store(y + s * y_s + t * y_t + c * y_c, acc.to(y.dtype.element_ty), mask=mc)
        win = _shift_in(win, xv, kk, K - 1)
        tl.store(states + s * o_s + t * o_t + c[:, None] * o_c + kk[None, :] * o_k,
                 win.to(states.dtype.element_ty), mask=m2)


_update = Launcher(_conv_update_kernel, _CONFIGS, key=["T", "Cdim", "K"])


def causal_conv1d_update(x, state, weight, bias, *, activation: bool = True):
    """T new positions of each of S sequences: x (S, T, C); state (S, C, K-1) or None (fresh), not
    modified. Returns y (S, T, C) and states (S, T, C, K-1) in x's dtype: the window after each position."""
    S, T, Cdim = x.shape
    K = weight.shape[1]
    y = empty(S, T, Cdim, dtype=x.dtype, device=x.device)
    states = empty(S, T, Cdim, K - 1, dtype=x.dtype, device=x.device)
    si = state.stride() if state is not None else (0, 0, 0)
    _update(lambda m: (S, triton.cdiv(Cdim, m["BLOCK_C"])),
            state if state is not None else y, x, weight, bias.contiguous() if bias is not None else weight, y, states,
            T, Cdim, *si, *x.stride(), *weight.stride(), *y.stride(), *states.stride(),
            cuda=x.is_cuda, fixed=_fixed(Cdim), K=K, KP=next_pow2(K - 1), HAS_INIT=state is not None,
            HAS_BIAS=bias is not None, SILU=activation)
    return y, states
