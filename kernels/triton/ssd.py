"""Mamba-2 SSM decode and verification in Triton: the selective state update and its T-position variant.

Contract: kernels/fast/ssd.py (ssd_step, ssd_update_, ssd_verify, ssd_state_at, ssd_advance_), same
signatures and shapes; the math is kernels/reference/ssd.py (ssd_state_update):
    dt_t = softplus(dt_t + dt_bias) (clamped to dt_limit);  state = exp(dt_t A) state + dt_t x_t B_t^T
    y_t  = state C_t + D x_t
Shapes (a leading S, sequences or cache slots): state (S, H, P, N) float32; x (S, H, P); dt (S, H);
A, D, dt_bias (H,) float32; B, C (S, G, N) shared by the R = H / G consecutive heads of a group.

Why a kernel: a decode step is bandwidth-bound on the state (H*P*N floats per sequence, 4 MiB per layer
and sequence for Super). The torch path reads and writes it three times (decay, + dt x B^T, state C);
_ssd_update_kernel reads each (P-block, N) tile once, applies softplus/clamp/live mask, decay, the
rank-1 update and the output contraction in registers, and writes it once (dead rows: not at all).
The verification kernel keeps the state in registers across the T = k+1 positions and writes only y
and the (cum, dt x) scratch that ssd_state_at needs, never T states. One program per
(row, head, P-block); the whole N (<= 128 for Super) is one tile.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import Launcher, empty, next_pow2, softplus

_CONFIGS = [triton.Config({"BLOCK_P": bp}, num_warps=w) for bp in (8, 16, 32, 64) for w in (2, 4, 8)]


def _fixed(P: int) -> dict:
    """Interpreter (and any non-tuned launch): P in blocks of 16, so that tests see several P-blocks."""
    return {"BLOCK_P": min(next_pow2(P), 16), "num_warps": 4}


@triton.jit
def _ssd_update_kernel(
    s_in, s_out, slots, live, x, dt, A, B, C, D, dt_bias, y,
    R, P, N,
    si_s, si_h, si_p, si_n, so_s, so_h, so_p, so_n,
    x_s, x_h, x_p, dt_s, dt_h, b_s, b_g, b_n, c_s, c_g, c_n, y_s, y_h, y_p,
    dt_min, dt_max,
    HAS_INIT: tl.constexpr, HAS_SLOTS: tl.constexpr, HAS_LIVE: tl.constexpr, HAS_LIMIT: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
):
    s = tl.program_id(0).to(tl.int64)                     # row of x/dt/B/C/y
    h = tl.program_id(1)
    g = h // R
    p = tl.program_id(2) * BLOCK_P + tl.arange(0, BLOCK_P)   # (BLOCK_P,)
    n = tl.arange(0, BLOCK_N)                                 # (BLOCK_N,)
    mp = p < P
    mn = n < N
    m2 = mp[:, None] & mn[None, :]                            # (BLOCK_P, BLOCK_N)
    row = s                                                   # row of the state
    if HAS_SLOTS:
        row = tl.load(slots + s).to(tl.int64)
    d = softplus(tl.load(dt + s * dt_s + h * dt_h).to(tl.float32) + tl.load(dt_bias + h).to(tl.float32))
    if HAS_LIMIT:
        d = tl.minimum(tl.maximum(d, dt_min), dt_max)
    m_store = m2
    if HAS_LIVE:                                              # dead rows: dt 0 for y, state not written
        lv = tl.load(live + s)
        d = tl.where(lv != 0, d, 0.0)
        m_store = m2 & ((p[:, None] * 0 + lv) != 0)           # a block: the interpreter mis-broadcasts bool scalars
    xv = tl.load(x + s * x_s + h * x_h + p * x_p, mask=mp, other=0.0).to(tl.float32)      # (BLOCK_P,)
    bv = tl.load(B + s * b_s + g * b_g + n * b_n, mask=mn, other=0.0).to(tl.float32)      # (BLOCK_N,)
    cv = tl.load(C + s * c_s + g * c_g + n * c_n, mask=mn, other=0.0).to(tl.float32)
    if HAS_INIT:
        st = tl.load(s_in + row * si_s + h * si_h + p[:, None] * si_p + n[None, :] * si_n,
                     mask=m2, other=0.0).to(tl.float32)
    else:
        st = tl.zeros((BLOCK_P, BLOCK_N), dtype=tl.float32)
    st = st * tl.exp(d * tl.load(A + h).to(tl.float32)) + (d * xv)[:, None] * bv[None, :]
    tl.store(s_out + row * so_s + h * so_h + p[:, None] * so_p + n[None, :] * so_n, st, mask=m_store)
    yv = tl.sum(st * cv[None, :], axis=1) + tl.load(D + h).to(tl.float32) * xv
    tl.store(y + s * y_s + h * y_h + p * y_p, yv.to(y.dtype.element_ty), mask=mp)


_update = Launcher(_ssd_update_kernel, _CONFIGS, key=["R", "P", "N"], restore=("s_out",))


def _limit(dt_limit):
    lo, hi = dt_limit
    return (lo > 0.0 or hi != float("inf")), float(lo), float(hi)


def _launch_update(state_in, state_out, x, dt, A, B, C, D, dt_bias, dt_limit, live, slots):
    S, H, P = x.shape
    G, N = B.shape[1], B.shape[2]
    y = empty(S, H, P, dtype=x.dtype, device=x.device)
    has_limit, lo, hi = _limit(dt_limit)
    si = state_in.stride() if state_in is not None else (0, 0, 0, 0)
    live_t = live.to(torch.int8).contiguous() if live is not None else y
    A, D, dt_bias = A.contiguous(), D.contiguous(), dt_bias.contiguous()     # (H,): unit stride assumed
    _update(lambda m: (S, H, triton.cdiv(P, m["BLOCK_P"])),
            state_in if state_in is not None else state_out, state_out,
            slots.contiguous() if slots is not None else y, live_t, x, dt, A, B, C, D, dt_bias, y,
            H // G, P, N, *si, *state_out.stride(),
            *x.stride(), *dt.stride(), *B.stride(), *C.stride(), *y.stride(), lo, hi,
            cuda=x.is_cuda, fixed=_fixed(P),
            HAS_INIT=state_in is not None, HAS_SLOTS=slots is not None, HAS_LIVE=live is not None,
            HAS_LIMIT=has_limit, BLOCK_N=next_pow2(N))
    return y


def ssd_update_(state, x, dt, A, B, C, D, dt_bias, *, dt_limit=(0.0, float("inf")), live=None, slots=None):
    """In place, one position per row. state (S, H, P, N) float32, any strides; or, with slots (S,) int
    (distinct), the whole slot cache (num_slots, H, P, N) and row s updates state[slots[s]]: no gather or
    scatter. live (S,) bool: rows where it is False keep their state bit for bit (not even written; their
    y is computed with dt = 0). Returns y (S, H, P) in x's dtype."""
    return _launch_update(state, state, x, dt, A, B, C, D, dt_bias, dt_limit, live, slots)


def ssd_step(state, x, dt, A, B, C, D, dt_bias, *, dt_limit=(0.0, float("inf"))):
    """One position of each of S sequences: state (S, H, P, N) or None (fresh), not modified.
    Returns y (S, H, P) and the new states (S, H, P, N) float32 (read once, written once: no clone)."""
    S, H, P = x.shape
    new = empty(S, H, P, B.shape[2], dtype=torch.float32, device=x.device)
    y = _launch_update(state, new, x, dt, A, B, C, D, dt_bias, dt_limit, None, None)
    return y, new


@triton.jit
def _ssd_verify_kernel(
    s_in, x, dt, A, B, C, D, dt_bias, y, cum, dtx,
    T, R, P, N,
    si_s, si_h, si_p, si_n,
    x_s, x_t, x_h, x_p, dt_s, dt_t, dt_h, b_s, b_t, b_g, b_n, c_s, c_t, c_g, c_n,
    y_s, y_t, y_h, y_p, cu_s, cu_h, cu_t, dx_s, dx_h, dx_t, dx_p,
    dt_min, dt_max,
    HAS_INIT: tl.constexpr, HAS_LIMIT: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
):
    s = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    pb = tl.program_id(2)
    g = h // R
    p = pb * BLOCK_P + tl.arange(0, BLOCK_P)
    n = tl.arange(0, BLOCK_N)
    mp = p < P
    mn = n < N
    m2 = mp[:, None] & mn[None, :]
    a = tl.load(A + h).to(tl.float32)
    dd = tl.load(D + h).to(tl.float32)
    bias = tl.load(dt_bias + h).to(tl.float32)
    if HAS_INIT:
        st = tl.load(s_in + s * si_s + h * si_h + p[:, None] * si_p + n[None, :] * si_n,
                     mask=m2, other=0.0).to(tl.float32)
    else:
        st = tl.zeros((BLOCK_P, BLOCK_N), dtype=tl.float32)
    c = a * 0.0                                               # cum log-decay since the pass began
    for t in range(T):
        d = softplus(tl.load(dt + s * dt_s + t * dt_t + h * dt_h).to(tl.float32) + bias)
        if HAS_LIMIT:
            d = tl.minimum(tl.maximum(d, dt_min), dt_max)
        da = d * a
        c += da
        xv = tl.load(x + s * x_s + t * x_t + h * x_h + p * x_p, mask=mp, other=0.0).to(tl.float32)
        bv = tl.load(B + s * b_s + t * b_t + g * b_g + n * b_n, mask=mn, other=0.0).to(tl.float32)
        cv = tl.load(C + s * c_s + t * c_t + g * c_g + n * c_n, mask=mn, other=0.0).to(tl.float32)
        dxv = d * xv
        st = st * tl.exp(da) + dxv[:, None] * bv[None, :]
        yv = tl.sum(st * cv[None, :], axis=1) + dd * xv
        tl.store(y + s * y_s + t * y_t + h * y_h + p * y_p, yv.to(y.dtype.element_ty), mask=mp)
        tl.store(dtx + s * dx_s + h * dx_h + t * dx_t + p * dx_p, dxv, mask=mp)
        tl.store(cum + s * cu_s + h * cu_h + t * cu_t, c, mask=pb == 0)


_verify = Launcher(_ssd_verify_kernel, _CONFIGS, key=["T", "R", "P", "N"])


def ssd_verify(state, x, dt, A, B, C, D, dt_bias, *, dt_limit=(0.0, float("inf"))):
    """T positions of each of S sequences from `state` (S, H, P, N) or None (fresh), not modified.
    x (S, T, H, P); dt (S, T, H); B, C (S, T, G, N). Returns y (S, T, H, P) in x's dtype and, float32,
    cum (S, H, T) and dtx = dt x (S, H, T, P): what ssd_state_at / ssd_advance_ build any position's state from."""
    S, T, H, P = x.shape
    G, N = B.shape[2], B.shape[3]
    y = empty(S, T, H, P, dtype=x.dtype, device=x.device)
    cum = empty(S, H, T, dtype=torch.float32, device=x.device)
    dtx = empty(S, H, T, P, dtype=torch.float32, device=x.device)
    has_limit, lo, hi = _limit(dt_limit)
    si = state.stride() if state is not None else (0, 0, 0, 0)
    A, D, dt_bias = A.contiguous(), D.contiguous(), dt_bias.contiguous()
    _verify(lambda m: (S, H, triton.cdiv(P, m["BLOCK_P"])),
            state if state is not None else y, x, dt, A, B, C, D, dt_bias, y, cum, dtx,
            T, H // G, P, N, *si, *x.stride(), *dt.stride(), *B.stride(), *C.stride(),
            *y.stride(), *cum.stride(), *dtx.stride(), lo, hi,
            cuda=x.is_cuda, fixed=_fixed(P), HAS_INIT=state is not None, HAS_LIMIT=has_limit,
            BLOCK_N=next_pow2(N))
    return y, cum, dtx


@triton.jit
def _ssd_state_at_kernel(
    s_in, s_out, index, cum, dtx, B,
    R, P, N, idx_scalar,
    si_s, si_h, si_p, si_n, so_s, so_h, so_p, so_n,
    cu_s, cu_h, cu_t, dx_s, dx_h, dx_t, dx_p, b_s, b_t, b_g, b_n,
    HAS_INIT: tl.constexpr, PER_ROW_INDEX: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
):
    s = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    g = h // R
    p = tl.program_id(2) * BLOCK_P + tl.arange(0, BLOCK_P)
    n = tl.arange(0, BLOCK_N)
    mp = p < P
    mn = n < N
    m2 = mp[:, None] & mn[None, :]
    if PER_ROW_INDEX:
        i = tl.load(index + s).to(tl.int32)
    else:
        i = idx_scalar
    last = tl.load(cum + s * cu_s + h * cu_h + i * cu_t)
    if HAS_INIT:
        acc = tl.exp(last) * tl.load(s_in + s * si_s + h * si_h + p[:, None] * si_p + n[None, :] * si_n,
                                     mask=m2, other=0.0).to(tl.float32)
    else:
        acc = tl.zeros((BLOCK_P, BLOCK_N), dtype=tl.float32)
    for j in range(0, i + 1):                                 # positions 0..index of the pass
        w = tl.exp(last - tl.load(cum + s * cu_s + h * cu_h + j * cu_t))
        u = w * tl.load(dtx + s * dx_s + h * dx_h + j * dx_t + p * dx_p, mask=mp, other=0.0)
        bv = tl.load(B + s * b_s + j * b_t + g * b_g + n * b_n, mask=mn, other=0.0).to(tl.float32)
        acc += u[:, None] * bv[None, :]
    tl.store(s_out + s * so_s + h * so_h + p[:, None] * so_p + n[None, :] * so_n, acc, mask=m2)


_state_at = Launcher(_ssd_state_at_kernel, _CONFIGS, key=["R", "P", "N"], restore=("s_out",))


def _launch_state_at(state_in, state_out, cum, dtx, B, index, idx_scalar):
    S, H, T, P = dtx.shape
    G, N = B.shape[2], B.shape[3]
    si = state_in.stride() if state_in is not None else (0, 0, 0, 0)
    _state_at(lambda m: (S, H, triton.cdiv(P, m["BLOCK_P"])),
              state_in if state_in is not None else state_out, state_out,
              index.contiguous() if index is not None else cum, cum, dtx, B, H // G, P, N, idx_scalar,
              *si, *state_out.stride(), *cum.stride(), *dtx.stride(), *B.stride(),
              cuda=dtx.is_cuda, fixed=_fixed(P), HAS_INIT=state_in is not None,
              PER_ROW_INDEX=index is not None, BLOCK_N=next_pow2(N))


def ssd_state_at(state, cum, dtx, B, index: torch.Tensor):
    """The state after position index[s] of each sequence's verified pass. state (S, H, P, N) or None;
    cum (S, H, T), dtx (S, H, T, P) from ssd_verify; B (S, T, G, N); index (S,) int. Returns (S, H, P, N) float32."""
    S, H, T, P = dtx.shape
    new = empty(S, H, P, B.shape[3], dtype=torch.float32, device=dtx.device)
    _launch_state_at(state, new, cum, dtx, B, index, 0)
    return new


def ssd_advance_(state, cum, dtx, B, index: int) -> None:
    """In place: state (L, H, P, N) float32 (any strides) becomes the state after position `index` of the
    verified pass; cum (L, H, T), dtx (L, H, T, P), B (L, T, G, N). One launch for every layer of a stage."""
    _launch_state_at(state, state, cum, dtx, B, None, int(index))
