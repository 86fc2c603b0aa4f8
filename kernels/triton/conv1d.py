"""Causal depthwise conv1d in Triton: one new position per sequence (conv_step_, conv_step), T new
positions with the window after each (causal_conv1d_update, verification), and whole prompt chunks of
variable length in one flat batch (causal_conv1d_varlen, prefill; causal_conv1d, one sequence).

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

import torch
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


# ---- prefill: whole sequences, variable lengths in one flat batch ------------------------------------------
# Reference: kernels/reference/conv1d.py (causal_conv1d_varlen: causal_conv1d per sequence). With xs_s the
# sequence's inputs after its initial window (K-1 values, zeros when fresh), for position t of sequence s:
#     y[t, c] = silu(bias[c] + sum_{j<K} weight[c, j] xs_s[c, t + j]);   final window = the last K-1 of xs_s
# Why a kernel: the torch path makes a cat, a conv1d call and a transpose per sequence (plus a slice and a
# clone for the window): a loop on the host over the prompts of a pass. Here one launch covers them all:
# a program per (sequence, block of positions, block of channels) reads its K shifted tiles of x (the ones
# before the sequence's first position from the initial window), and the first block of each sequence
# writes the final window.

_VARLEN_CONFIGS = [triton.Config({"BLOCK_T": bt, "BLOCK_C": bc}, num_warps=w)
                   for bt in (16, 32, 64) for bc in (64, 128, 256) for w in (4, 8)]


@triton.jit
def _conv_varlen_kernel(
    x, w, bias, cu, s_in, y, s_out,
    Cdim, x_t, x_c, w_c, w_k, si_s, si_c, si_k, y_t, y_c, so_s, so_c, so_k,
    K: tl.constexpr, KP: tl.constexpr, HAS_INIT: tl.constexpr, HAS_BIAS: tl.constexpr,
    SILU: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
):
    s = tl.program_id(0).to(tl.int64)
    tb = tl.program_id(1)
    start = tl.load(cu + s).to(tl.int64)
    L = tl.load(cu + s + 1).to(tl.int64) - start
    t = tb * BLOCK_T + tl.arange(0, BLOCK_T)                    # (BLOCK_T,) positions in the sequence
    c = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)      # (BLOCK_C,)
    mc = c < Cdim
    mt = t < L
    xt = x.dtype.element_ty
    acc = tl.zeros((BLOCK_T, BLOCK_C), dtype=tl.float32)
    for j in tl.static_range(K):                                # tap j reads position t + j - (K-1)
        p = t + j - (K - 1)                                     # (BLOCK_T,) < 0: the initial window
        wj = tl.load(w + c * w_c + j * w_k, mask=mc, other=0.0).to(xt).to(tl.float32)
        v = tl.load(x + (start + p)[:, None] * x_t + c[None, :] * x_c,
                    mask=((p >= 0) & mt)[:, None] & mc[None, :], other=0.0).to(tl.float32)
        if HAS_INIT:
            vi = tl.load(s_in + s * si_s + c[None, :] * si_c + (K - 1 + p)[:, None] * si_k,
                         mask=((p < 0) & mt)[:, None] & mc[None, :], other=0.0)
            v = tl.where((p < 0)[:, None], vi.to(xt).to(tl.float32), v)
        acc += v * wj[None, :]
    if HAS_BIAS:
        acc += tl.load(bias + c, mask=mc, other=0.0).to(xt).to(tl.float32)[None, :]
    if SILU:
        acc = acc * tl.sigmoid(acc)
    tl.store(y + (start + t)[:, None] * y_t + c[None, :] * y_c, acc.to(y.dtype.element_ty),
             mask=mt[:, None] & mc[None, :])
    if tb == 0:                                                 # the final window: xs_s[L:L+K-1]
        kk = tl.arange(0, KP)                                   # (KP,) window element, oldest first
        pw = L - (K - 1) + kk                                   # its position; < 0: still the initial window
        mk = kk < K - 1
        win = tl.load(x + (start + pw)[None, :] * x_t + c[:, None] * x_c,
                      mask=mc[:, None] & (mk & (pw >= 0))[None, :], other=0.0)     # (BLOCK_C, KP)
        if HAS_INIT:
            wi = tl.load(s_in + s * si_s + c[:, None] * si_c + (K - 1 + pw)[None, :] * si_k,
                         mask=mc[:, None] & (mk & (pw < 0))[None, :], other=0.0)
            win = tl.where((pw < 0)[None, :], wi.to(xt), win)
        tl.store(s_out + s * so_s + c[:, None] * so_c + kk[None, :] * so_k, win.to(s_out.dtype.element_ty),
                 mask=mc[:, None] & mk[None, :])


_varlen = Launcher(_conv_varlen_kernel, _VARLEN_CONFIGS, key=["Cdim", "K"])


def causal_conv1d_varlen(x, weight, bias, cu_seqlens, initial_states=None, *, activation: bool = True,
                         max_seqlen: int | None = None):
    """S sequences flat in x (L, C): sequence s is rows cu_seqlens[s]:cu_seqlens[s+1] (cu_seqlens (S+1,)
    int); initial_states (S, C, K-1) (any float dtype) or None (all fresh: zeros), not modified.
    max_seqlen: the longest sequence (read from cu_seqlens, a host sync on a GPU, when None).
    Returns y (L, C) and the final windows (S, C, K-1), both in x's dtype."""
    L, Cdim = x.shape
    K = weight.shape[1]
    S = cu_seqlens.shape[0] - 1
    if max_seqlen is None:
        max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max()) if S > 0 else 0
    y = empty(L, Cdim, dtype=x.dtype, device=x.device)
    final = empty(S, Cdim, K - 1, dtype=x.dtype, device=x.device)
    if S == 0:
        return y, final
    si = initial_states.stride() if initial_states is not None else (0, 0, 0)
    _varlen(lambda m: (S, triton.cdiv(max(max_seqlen, 1), m["BLOCK_T"]), triton.cdiv(Cdim, m["BLOCK_C"])),
            x, weight, bias.contiguous() if bias is not None else weight, cu_seqlens.contiguous(),
            initial_states if initial_states is not None else x, y, final,
            Cdim, *x.stride(), *weight.stride(), *si, *y.stride(), *final.stride(),
            cuda=x.is_cuda, fixed={"BLOCK_T": 16, **_fixed(Cdim)}, K=K, KP=next_pow2(K - 1),
            HAS_INIT=initial_states is not None, HAS_BIAS=bias is not None, SILU=activation)
    return y, final


def causal_conv1d(x, weight, bias, initial_state=None, *, activation: bool = True):
    """One whole sequence, the reference's signature: x (L, C); initial_state (C, K-1) or None.
    Returns y (L, C) and the final window (C, K-1) in x's dtype."""
    cu = torch.tensor([0, x.shape[0]], dtype=torch.int32, device=x.device)
    y, final = causal_conv1d_varlen(x, weight, bias, cu, None if initial_state is None else initial_state[None],
                                    activation=activation, max_seqlen=x.shape[0])
    return y, final[0]
