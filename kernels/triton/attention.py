"""Paged GQA attention in Triton: decode over block tables (one query per sequence), the few-query
passes of verification, varlen prefill (the queries of S sequences, flat), plus the cache writes.

Contract: kernels/fast/attention.py (write_kv, paged_attention, decode_attention), same signatures and
cache layout; math: kernels/reference/attention.py. k_cache, v_cache (num_blocks, block_size, H_kv, Dh);
a sequence's block table maps position p to block table[p // block_size], offset p % block_size.
    out[t, h] = softmax_{n <= start + t}( q[t, h] . k[n, h // R] / sqrt(Dh) ) @ v[n, h // R],  R = H / H_kv

Why a kernel: the torch paths gather every key and value of the sequence into a contiguous float32
copy, then run two products and a softmax over it (decode: padded to the longest sequence). Here one
program per (sequence, KV head, block of query rows) streams the sequence's keys straight out of the
paged pool in tiles of BLOCK_N positions (any block_size: each key row is looked up through the block
table), with an online softmax; the R query heads of a KV group (and the T queries of a verification
pass) are the rows of one tile, so each key and value is read once per group, not once per head.
Rows are (t, r) pairs, row = t * R + r; query t sees keys 0..start + t.
Products run in float32 (inputs upcast in registers, input_precision="ieee"): decode is bandwidth-bound,
and the interpreter's dot is wrong for bf16 operands. Not done: split-K over long contexts
(flash-decoding); with 2 KV heads and few sequences a long-context decode uses few programs.

prefill_attention (kernels/reference/attention.py prefill_attention: the per-sequence paged_attention,
looped) is the same tiling over a flat batch: program (sequence, KV head, block of its (t, r) rows),
sequence s's queries at rows cu_seqlens[s].. and positions start_positions[s].., its keys read through
row s of a padded block table; tiles past a sequence's end read nothing and write nothing. Prefill is
compute-bound, so fp16/bf16 inputs multiply in their own dtype (tensor cores; the probabilities are
rounded to it for the second product, as flash-attention does), float32 accumulation; float32 inputs
(and bf16 under the interpreter) take the float32 "ieee" products.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._common import INTERPRET, Launcher, empty, next_pow2

_CONFIGS = [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=st)
            for bm in (16, 32, 64) for bn in (16, 32, 64) for w in (4, 8) for st in (1, 2)]


@triton.jit
def _paged_attn_kernel(
    q, k_cache, v_cache, tables, starts, o,
    T, R, bs, start_scalar, scale,
    q_s, q_t, q_h, q_d, o_s, o_t, o_h, o_d,
    k_b, k_o, k_h, k_d, v_b, v_o, v_h, v_d, tab_s, tab_b,
    PER_SEQ_START: tl.constexpr, DH: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    s = tl.program_id(0).to(tl.int64)
    g = tl.program_id(1)
    rows = tl.program_id(2) * BLOCK_M + tl.arange(0, BLOCK_M)    # (BLOCK_M,) row = t * R + r
    t = rows // R
    h = g * R + rows % R
    row_ok = rows < T * R
    d = tl.arange(0, BLOCK_D)
    md = d < DH
    if PER_SEQ_START:
        start = tl.load(starts + s).to(tl.int32)
    else:
        start = start_scalar
    limit = start + t                                           # last key each row sees
    t_hi = tl.minimum(T - 1, (tl.program_id(2) * BLOCK_M + BLOCK_M - 1) // R)
    hi = start + t_hi + 1                                       # keys 0..hi-1 serve this tile
    qv = tl.load(q + s * q_s + t[:, None] * q_t + h[:, None] * q_h + d[None, :] * q_d,
                 mask=row_ok[:, None] & md[None, :], other=0.0).to(tl.float32)   # (BLOCK_M, BLOCK_D)
    qv = qv * scale
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    for n0 in range(0, hi, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)                          # (BLOCK_N,) key positions
        mn = n < hi
        blk = tl.load(tables + s * tab_s + (n // bs) * tab_b, mask=mn, other=0).to(tl.int64)
        off = n % bs
        kt = tl.load(k_cache + blk[:, None] * k_b + off[:, None] * k_o + g * k_h + d[None, :] * k_d,
                     mask=mn[:, None] & md[None, :], other=0.0).to(tl.float32)      # (BLOCK_N, BLOCK_D)
        vt = tl.load(v_cache + blk[:, None] * v_b + off[:, None] * v_o + g * v_h + d[None, :] * v_d,
                     mask=mn[:, None] & md[None, :], other=0.0).to(tl.float32)
        sc = tl.dot(qv, tl.trans(kt), input_precision="ieee")                   # (BLOCK_M, BLOCK_N)
        sc = tl.where(n[None, :] <= limit[:, None], sc, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(sc, axis=1))            # finite: key 0 is in the first tile
        p = tl.exp(sc - m_new[:, None])
        alpha = tl.exp(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p, vt, input_precision="ieee")
        m_i = m_new
    out = acc / l_i[:, None]
    tl.store(o + s * o_s + t[:, None] * o_t + h[:, None] * o_h + d[None, :] * o_d,
             out.to(o.dtype.element_ty), mask=row_ok[:, None] & md[None, :])


_attn = Launcher(_paged_attn_kernel, _CONFIGS, key=["T", "R", "DH"])


def _attend(q4, k_cache, v_cache, tables, starts, start_scalar: int):
    """q4 (S, T, H, Dh); tables (S, n_blocks) int; starts (S,) int or None (all start_scalar)."""
    S, T, H, Dh = q4.shape
    _, bs, hkv, _ = k_cache.shape
    R = H // hkv
    out = empty(S, T, H, Dh, dtype=q4.dtype, device=q4.device)
    _attn(lambda m: (S, hkv, triton.cdiv(T * R, m["BLOCK_M"])),
          q4, k_cache, v_cache, tables, starts if starts is not None else tables, out,
          T, R, bs, int(start_scalar), 1.0 / math.sqrt(Dh),
          *q4.stride(), *out.stride(), *k_cache.stride(), *v_cache.stride(), *tables.stride(),
          cuda=q4.is_cuda, fixed={"BLOCK_M": 16, "BLOCK_N": 16, "num_warps": 4},
          PER_SEQ_START=starts is not None, DH=Dh, BLOCK_D=max(next_pow2(Dh), 16))
    return out


@triton.jit
def _write_kv_kernel(
    k, v, k_cache, v_cache, tables, starts, start_scalar, T, bs, Dh,
    k_s, k_t, k_h, k_d, v_s, v_t, v_h, v_d, kc_b, kc_o, kc_h, kc_d, vc_b, vc_o, vc_h, vc_d, tab_s, tab_b,
    PER_SEQ_START: tl.constexpr, BLOCK_D: tl.constexpr,
):
    st = tl.program_id(0)
    s = (st // T).to(tl.int64)
    t = st % T
    g = tl.program_id(1)
    if PER_SEQ_START:
        start = tl.load(starts + s).to(tl.int32)
    else:
        start = start_scalar
    pos = start + t
    blk = tl.load(tables + s * tab_s + (pos // bs) * tab_b).to(tl.int64)
    off = pos % bs
    d = tl.arange(0, BLOCK_D)
    md = d < Dh
    kv = tl.load(k + s * k_s + t * k_t + g * k_h + d * k_d, mask=md)
    vv = tl.load(v + s * v_s + t * v_t + g * v_h + d * v_d, mask=md)
    tl.store(k_cache + blk * kc_b + off * kc_o + g * kc_h + d * kc_d, kv.to(k_cache.dtype.element_ty), mask=md)
    tl.store(v_cache + blk * vc_b + off * vc_o + g * vc_h + d * vc_d, vv.to(v_cache.dtype.element_ty), mask=md)


def _write(k3, v3, k_cache, v_cache, tables, starts, start_scalar: int):
    """k3, v3 (S, T, H_kv, Dh) at positions start.. of each sequence's table."""
    S, T, hkv, Dh = k3.shape
    if S * T == 0:
        return
    _write_kv_kernel[(S * T, hkv)](
        k3, v3, k_cache, v_cache, tables, starts if starts is not None else tables, int(start_scalar),
        T, k_cache.shape[1], Dh, *k3.stride(), *v3.stride(), *k_cache.stride(), *v_cache.stride(),
        *tables.stride(), PER_SEQ_START=starts is not None, BLOCK_D=next_pow2(Dh), num_warps=1)


def write_kv(k_cache, v_cache, k, v, block_table: torch.Tensor, start_pos: int) -> None:
    """Write k, v (T, H_kv, Dh) of positions start_pos..start_pos+T-1 into the paged cache."""
    _write(k[None], v[None], k_cache, v_cache, block_table[None], None, start_pos)


def paged_attention(q, k_cache, v_cache, block_table: torch.Tensor, *, start_pos: int):
    """Queries q (T, H, Dh) at positions start_pos.. attend causally to the cache (which already holds
    their own k, v). Any T: verification's k+1 and prefill chunks alike. Returns (T, H, Dh)."""
    return _attend(q[None], k_cache, v_cache, block_table[None], None, start_pos)[0]


def decode_attention(q, k, v, k_cache, v_cache, block_tables: list[torch.Tensor], positions: list[int]):
    """One new token of each of S sequences: writes its k, v (S, H_kv, Dh) at its position, then attends
    over positions 0..position. q (S, H, Dh). Returns (S, H, Dh)."""
    tables = torch.nn.utils.rnn.pad_sequence(block_tables, batch_first=True)   # (S, n), padding never read
    pos = torch.tensor(positions, dtype=torch.int32, device=q.device)
    _write(k[:, None], v[:, None], k_cache, v_cache, tables, pos, 0)
    return _attend(q[:, None], k_cache, v_cache, tables, pos, 0)[:, 0]


# ---- varlen prefill: the queries of S sequences, flat -------------------------------------------------

_PREFILL_CONFIGS = [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=st)
                    for bm in (32, 64, 128) for bn in (32, 64) for w in (4, 8) for st in (2, 3)]


@triton.jit
def _varlen_attn_kernel(
    q, k_cache, v_cache, tables, starts, cu, o,
    R, bs, scale, t_bucket,
    q_t, q_h, q_d, o_t, o_h, o_d, k_b, k_o, k_h, k_d, v_b, v_o, v_h, v_d, tab_s, tab_b,
    LOWP: tl.constexpr, DH: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Program (s, g, m): rows m*BLOCK_M.. of sequence s's (t, r) rows of KV head g (row = t * R + r),
    t indexing its queries q[cu[s] + t] at positions starts[s] + t. t_bucket: an autotuning key only."""
    s = tl.program_id(0)
    g = tl.program_id(1)
    m0 = tl.program_id(2) * BLOCK_M
    first = tl.load(cu + s).to(tl.int32)
    T = tl.load(cu + s + 1).to(tl.int32) - first
    start = tl.load(starts + s).to(tl.int32)
    rows = m0 + tl.arange(0, BLOCK_M)
    t = rows // R
    h = g * R + rows % R
    row_ok = rows < T * R
    d = tl.arange(0, BLOCK_D)
    md = d < DH
    limit = start + t                                           # last key each row sees
    t_hi = tl.minimum(T - 1, (m0 + BLOCK_M - 1) // R)
    hi = tl.where(m0 < T * R, start + t_hi + 1, 0)              # keys 0..hi-1; a tile past the end: none
    qrow = (first + t).to(tl.int64)
    qv = tl.load(q + qrow[:, None] * q_t + h[:, None] * q_h + d[None, :] * q_d,
                 mask=row_ok[:, None] & md[None, :], other=0.0)                  # (BLOCK_M, BLOCK_D)
    if not LOWP:
        qv = qv.to(tl.float32)
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    for n0 in range(0, hi, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)                          # (BLOCK_N,) key positions
        mn = n < hi
        blk = tl.load(tables + s.to(tl.int64) * tab_s + (n // bs) * tab_b, mask=mn, other=0).to(tl.int64)
        off = n % bs
        kt = tl.load(k_cache + blk[:, None] * k_b + off[:, None] * k_o + g * k_h + d[None, :] * k_d,
                     mask=mn[:, None] & md[None, :], other=0.0)                  # (BLOCK_N, BLOCK_D)
        vt = tl.load(v_cache + blk[:, None] * v_b + off[:, None] * v_o + g * v_h + d[None, :] * v_d,
                     mask=mn[:, None] & md[None, :], other=0.0)
        if LOWP:                                                # fp16/bf16 operands, float32 accumulation
            sc = tl.dot(qv, tl.trans(kt)) * scale
        else:
            sc = tl.dot(qv, tl.trans(kt.to(tl.float32)), input_precision="ieee") * scale
        sc = tl.where(n[None, :] <= limit[:, None], sc, float("-inf"))           # (BLOCK_M, BLOCK_N)
        m_new = tl.maximum(m_i, tl.max(sc, axis=1))            # finite: key 0 is in the first tile
        p = tl.exp(sc - m_new[:, None])
        alpha = tl.exp(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if LOWP:
            acc = acc * alpha[:, None] + tl.dot(p.to(vt.dtype), vt)
        else:
            acc = acc * alpha[:, None] + tl.dot(p, vt.to(tl.float32), input_precision="ieee")
        m_i = m_new
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(o + qrow[:, None] * o_t + h[:, None] * o_h + d[None, :] * o_d,
             out.to(o.dtype.element_ty), mask=row_ok[:, None] & md[None, :])


_varlen = Launcher(_varlen_attn_kernel, _PREFILL_CONFIGS, key=["R", "DH", "t_bucket", "LOWP"])


def prefill_attention(q, k_cache, v_cache, block_tables, start_positions, cu_seqlens, *, max_seqlen=None):
    """The queries of S sequences, flat: q (T_total, H, Dh); sequence s owns rows cu_seqlens[s]..
    cu_seqlens[s+1]-1, at positions start_positions[s].., its k, v already in the cache; block_tables
    (S, n) int, padded (padding never read). start_positions (S,), cu_seqlens (S+1,) (cu_seqlens[0] = 0,
    cu_seqlens[S] = T_total): int tensors or lists. max_seqlen: the longest sequence's query count, if the
    caller knows it (else read from cu_seqlens: a device sync). Causal GQA; returns (T_total, H, Dh)."""
    T_total, H, Dh = q.shape
    _, bs, hkv, _ = k_cache.shape
    R = H // hkv
    out = empty(T_total, H, Dh, dtype=q.dtype, device=q.device)
    cu = torch.as_tensor(cu_seqlens, dtype=torch.int32, device=q.device)
    starts = torch.as_tensor(start_positions, dtype=torch.int32, device=q.device)
    S = starts.numel()
    if max_seqlen is None:
        max_seqlen = int((cu[1:] - cu[:-1]).max()) if S else 0
    if S == 0 or T_total == 0 or max_seqlen <= 0:
        return out
    lowp = (q.dtype == k_cache.dtype == v_cache.dtype and q.dtype in (torch.float16, torch.bfloat16)
            and not (INTERPRET and q.dtype == torch.bfloat16))        # the interpreter's bf16 dot is wrong
    _varlen(lambda m: (S, hkv, triton.cdiv(max_seqlen * R, m["BLOCK_M"])),
            q, k_cache, v_cache, block_tables, starts, cu, out,
            R, bs, 1.0 / math.sqrt(Dh), min(next_pow2(max_seqlen), 1024),
            *q.stride(), *out.stride(), *k_cache.stride(), *v_cache.stride(), *block_tables.stride(),
            cuda=q.is_cuda, fixed={"BLOCK_M": 16, "BLOCK_N": 16, "num_warps": 4},
            LOWP=lowp, DH=Dh, BLOCK_D=max(next_pow2(Dh), 16))
    return out
