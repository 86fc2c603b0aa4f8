"""Mamba-2 chunked SSD scan for prefill in Triton: variable-length sequences packed in one flat batch.

Contract: kernels/reference/ssd.py ssd_chunk_scan_varlen (one ssd_chunk_scan per sequence), same
signature and shapes:
    x (T, H, P); dt (T, H); B, C (T, G, N) shared by the R = H / G consecutive heads of a group;
    A, D, dt_bias (H,); cu_seqlens (S+1,) int (cu[0] = 0, cu[S] = T); initial_states (S, H, P, N)
    float32 or None. Returns y (T, H, P) in x's dtype and the final states (S, H, P, N) float32.

Design: one program per (sequence, head, P-block) walks its sequence's chunks of chunk_size positions
(the first chunk starts at the sequence's own first row; the last may be partial, masked) with the
state (P-block, N) in registers. Per chunk, in float32 whatever the inputs' dtype (the interpreter's
tl.dot is wrong for 16-bit operands, and the reference computes in float32 too):
    dt   = softplus(dt + dt_bias) (clamped to dt_limit), 0 past the chunk's end
    cum  = cumsum(dt * A)                                       within-chunk log-decay
    y    = ((C B^T) * exp(cum_i - cum_j) [j <= i]) @ (dt x)     within the chunk
         + exp(cum) * (C @ state^T)                              the carried-in state
         + D x
    state = exp(cum_last) state + (dt x exp(cum_last - cum))^T @ B
Three tl.dot per chunk plus the state's; the (chunk, chunk) matrices are recomputed by each P-block.
The tiles are at least 16 wide along every tl.dot axis (the smallest a compiled tl.dot takes); the
chunk's own length is a runtime argument, so any chunk_size works (BLOCK_T = its next power of two).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import Launcher, empty, next_pow2, softplus

_CONFIGS = [triton.Config({"BLOCK_P": bp}, num_warps=w) for bp in (16, 32, 64) for w in (4, 8)]


# Interpreter (and any non-tuned launch): P in blocks of 16, so that tests see several P-blocks.
_FIXED = {"BLOCK_P": 16, "num_warps": 4}


@triton.jit
def _ssd_prefill_kernel(
    x, dt, A, B, C, D, dt_bias, cu, s_in, y, s_out,
    R, P, N, CS,
    x_t, x_h, x_p, dt_t, dt_h, b_t, b_g, b_n, c_t, c_g, c_n, y_t, y_h, y_p,
    si_s, si_h, si_p, si_n, so_s, so_h, so_p, so_n,
    dt_min, dt_max,
    HAS_INIT: tl.constexpr, HAS_LIMIT: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
):
    s = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    g = h // R
    p = tl.program_id(2) * BLOCK_P + tl.arange(0, BLOCK_P)     # (BLOCK_P,)
    n = tl.arange(0, BLOCK_N)                                   # (BLOCK_N,)
    i = tl.arange(0, BLOCK_T)                                   # (BLOCK_T,) position within the chunk
    mp = p < P
    mn = n < N
    m2 = mp[:, None] & mn[None, :]
    start = tl.load(cu + s).to(tl.int64)
    L = tl.load(cu + s + 1).to(tl.int64) - start                # the sequence's length
    a = tl.load(A + h).to(tl.float32)
    dd = tl.load(D + h).to(tl.float32)
    bias = tl.load(dt_bias + h).to(tl.float32)
    causal = i[:, None] >= i[None, :]                           # (BLOCK_T, BLOCK_T) j <= i
    if HAS_INIT:
        st = tl.load(s_in + s * si_s + h * si_h + p[:, None] * si_p + n[None, :] * si_n,
                     mask=m2, other=0.0).to(tl.float32)        # (BLOCK_P, BLOCK_N)
    else:
        st = tl.zeros((BLOCK_P, BLOCK_N), dtype=tl.float32)
    for c0 in range(0, L, CS):
        t = start + c0 + i                                      # (BLOCK_T,) rows of the flat batch
        mt = (i < CS) & (c0 + i < L)
        d = softplus(tl.load(dt + t * dt_t + h * dt_h, mask=mt, other=0.0).to(tl.float32) + bias)
        if HAS_LIMIT:
            d = tl.minimum(tl.maximum(d, dt_min), dt_max)
        d = tl.where(mt, d, 0.0)                                # past the end: no decay, no input
        cum = tl.cumsum(d * a, axis=0)                          # (BLOCK_T,)
        last = tl.sum(d * a, axis=0)                            # cum at the chunk's last position
        xv = tl.load(x + t[:, None] * x_t + h * x_h + p[None, :] * x_p,
                     mask=mt[:, None] & mp[None, :], other=0.0).to(tl.float32)     # (BLOCK_T, BLOCK_P)
        bv = tl.load(B + t[:, None] * b_t + g * b_g + n[None, :] * b_n,
                     mask=mt[:, None] & mn[None, :], other=0.0).to(tl.float32)     # (BLOCK_T, BLOCK_N)
        cv = tl.load(C + t[:, None] * c_t + g * c_g + n[None, :] * c_n,
                     mask=mt[:, None] & mn[None, :], other=0.0).to(tl.float32)
        xd = xv * d[:, None]                                    # dt x, 0 past the end
        cb = tl.dot(cv, tl.trans(bv), input_precision="ieee")  # (BLOCK_T, BLOCK_T) C_i . B_j
        seg = tl.where(causal, cum[:, None] - cum[None, :], float("-inf"))
        out = tl.dot(cb * tl.exp(seg), xd, input_precision="ieee")                  # (BLOCK_T, BLOCK_P)
        out += tl.exp(cum)[:, None] * tl.dot(cv, tl.trans(st), input_precision="ieee")
        out += dd * xv
        tl.store(y + t[:, None] * y_t + h * y_h + p[None, :] * y_p, out.to(y.dtype.element_ty),
                 mask=mt[:, None] & mp[None, :])
        w = xd * tl.exp(last - cum)[:, None]                    # (BLOCK_T, BLOCK_P) decayed to the chunk's end
        st = st * tl.exp(last) + tl.dot(tl.trans(w), bv, input_precision="ieee")
    tl.store(s_out + s * so_s + h * so_h + p[:, None] * so_p + n[None, :] * so_n, st, mask=m2)


_scan = Launcher(_ssd_prefill_kernel, _CONFIGS, key=["R", "P", "N", "CS"])


def ssd_chunk_scan_varlen(x, dt, A, B, C, D, dt_bias, *, cu_seqlens, chunk_size: int, initial_states=None,
                          dt_limit=(0.0, float("inf"))):
    """S sequences packed in rows cu_seqlens[s]:cu_seqlens[s+1] of x (T, H, P), dt (T, H), B, C (T, G, N)
    (any strides); initial_states (S, H, P, N) float32 (any strides) or None (zeros), not modified.
    Returns y (T, H, P) in x's dtype and the final states (S, H, P, N) float32. No host sync: the
    lengths are read on the device (cu_seqlens[0] must be 0 and cu_seqlens[S] = T, or rows go unwritten)."""
    T, H, P = x.shape
    G, N = B.shape[1], B.shape[2]
    S = cu_seqlens.shape[0] - 1
    y = empty(T, H, P, dtype=x.dtype, device=x.device)
    finals = empty(S, H, P, N, dtype=torch.float32, device=x.device)
    if S == 0:
        return y, finals
    lo, hi = dt_limit
    has_limit = lo > 0.0 or hi != float("inf")
    si = initial_states.stride() if initial_states is not None else (0, 0, 0, 0)
    A, D, dt_bias = A.contiguous(), D.contiguous(), dt_bias.contiguous()    # (H,): unit stride assumed
    cu = cu_seqlens.contiguous()
    _scan(lambda m: (S, H, triton.cdiv(P, m["BLOCK_P"])),
          x, dt, A, B, C, D, dt_bias, cu, initial_states if initial_states is not None else finals, y, finals,
          H // G, P, N, int(chunk_size),
          *x.stride(), *dt.stride(), *B.stride(), *C.stride(), *y.stride(), *si, *finals.stride(),
          float(lo), float(hi),
          cuda=x.is_cuda, fixed=_FIXED, HAS_INIT=initial_states is not None, HAS_LIMIT=has_limit,
          BLOCK_T=max(next_pow2(chunk_size), 16), BLOCK_N=max(next_pow2(N), 16))
    return y, finals
