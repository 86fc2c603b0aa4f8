"""Speculative verification of S sequences in Triton, on the device: greedy and rejection sampling.

Contract and math: kernels/reference/sampling.py (verify_greedy, verify_random), same signatures, same
results exactly (counts and tokens) for the same inputs. S sequences with num_drafts[s] (0..k) drafts,
padded to k: draft_tokens (S, k); the target at the k+1 verified positions (S, k+1, V); for random, the
draft distributions (S, k, V) and uniforms (S, k+1) (column j < k: draft j's accept test; column k: the
corrected / bonus token's inverse-CDF draw). Returns (num_accepted (S,) int64, next_token (S,) int64).

Why a kernel: the per-sequence path (rejection_sample) runs on the host, one sequence and one draft at a
time, with .item() syncs and torch.multinomial. Here one program per sequence walks its drafts (a while
loop that stops at the first rejection) and streams the vocabulary in blocks of BLOCK_V: greedy takes
each position's argmax (first index of the maximum, as torch) until a draft differs; random tests each
draft with three scalar loads (accept iff u * q < p), then makes two passes over the row at
the stopping position: the residual's (and p's) mass and last nonzero token, then the inverse CDF (a
running float64 prefix sum: the first token whose cumulative mass exceeds u * total). float64 keeps
the pick independent of the summation order (the reference's cumsum vs. the kernel's block sums) but
for ties at the ~1e-16 level. Not done: splitting a long vocabulary over several programs per sequence
(with few sequences, few programs run).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _common
from ._common import next_pow2


def _int_out(S: int, device) -> torch.Tensor:
    """An int64 output; poisoned (a value no token or count takes) when tests ask for it."""
    if _common.POISON:
        return torch.full((S,), -(2 ** 40), dtype=torch.int64, device=device)
    return torch.empty(S, dtype=torch.int64, device=device)


def _block_v(V: int, block_v: int | None) -> int:
    return next_pow2(block_v) if block_v else min(next_pow2(V), 2048)


@triton.jit
def _row_argmax(row, stride_v, V, BLOCK_V: tl.constexpr):
    """First index of the maximum of row[0..V-1] (float32 comparison; all -inf: 0)."""
    best = tl.full((), float("-inf"), tl.float32)
    idx = tl.full((), 0, tl.int32)
    for v0 in range(0, V, BLOCK_V):
        v = v0 + tl.arange(0, BLOCK_V)
        x = tl.load(row + v.to(tl.int64) * stride_v, mask=v < V, other=float("-inf")).to(tl.float32)
        bm = tl.max(x, axis=0)
        bi = tl.min(tl.where((x == bm) & (v < V), v, V), axis=0)      # first index of the block's max
        up = bm > best                                               # strict: an earlier block wins ties
        best = tl.where(up, bm, best)
        idx = tl.where(up, bi, idx)
    return idx


@triton.jit
def _target_token(target, base, i, t_k, t_v, V, IDS: tl.constexpr, BLOCK_V: tl.constexpr):
    if IDS:
        tok = tl.load(target + base + i * t_k).to(tl.int32)
    else:
        tok = _row_argmax(target + base + i * t_k, t_v, V, BLOCK_V)
    return tok


@triton.jit
def _verify_greedy_kernel(
    target, drafts, num, count_out, token_out, V,
    t_s, t_k, t_v, d_s, d_k, n_s,
    IDS: tl.constexpr, BLOCK_V: tl.constexpr,
):
    s = tl.program_id(0).to(tl.int64)
    n = tl.load(num + s * n_s).to(tl.int32)
    base = s * t_s
    i = tl.full((), 0, tl.int32)
    tok = _target_token(target, base, i, t_k, t_v, V, IDS, BLOCK_V)
    d = tl.load(drafts + s * d_s, mask=n > 0, other=-1).to(tl.int32)
    go = (n > 0) & (d == tok)
    while go:
        i += 1
        tok = _target_token(target, base, i, t_k, t_v, V, IDS, BLOCK_V)
        d = tl.load(drafts + s * d_s + i * d_k, mask=i < n, other=-1).to(tl.int32)
        go = (i < n) & (d == tok)
    tl.store(count_out + s, i.to(tl.int64))
    tl.store(token_out + s, tok.to(tl.int64))


def verify_greedy(target, draft_tokens, num_drafts, *, block_v: int | None = None):
    """See kernels/reference/sampling.py. target (S, k+1, V) logits/probabilities or (S, k+1) token ids;
    draft_tokens (S, k) int; num_drafts (S,) int tensor. block_v: the vocabulary tile (tests)."""
    S = target.shape[0]
    k = draft_tokens.shape[1]
    count, token = _int_out(S, target.device), _int_out(S, target.device)
    if S == 0:
        return count, token
    ids = not target.is_floating_point()
    V = 1 if ids else target.shape[2]
    num = torch.as_tensor(num_drafts, device=target.device)
    t_v = 0 if ids else target.stride(2)
    drafts = draft_tokens if k else draft_tokens.new_zeros(S, 1)           # never read past num_drafts
    _verify_greedy_kernel[(S,)](
        target, drafts, num, count, token, V, target.stride(0), target.stride(1), t_v,
        drafts.stride(0), drafts.stride(1), num.stride(0),
        IDS=ids, BLOCK_V=_block_v(V, block_v), num_warps=4)
    return count, token


@triton.jit
def _verify_random_kernel(
    target, draft_probs, drafts, num, uniforms, count_out, token_out, V, K,
    t_s, t_k, t_v, q_s, q_k, q_v, d_s, d_k, n_s, u_s, u_k,
    BLOCK_V: tl.constexpr,
):
    s = tl.program_id(0).to(tl.int64)
    n = tl.load(num + s * n_s).to(tl.int32)
    # 1. Accept tests, draft by draft, up to the first rejection: i = the number accepted.
    i = tl.full((), 0, tl.int32)
    go = n > 0
    while go:
        d = tl.load(drafts + s * d_s + i * d_k).to(tl.int64)
        p = tl.load(target + s * t_s + i * t_k + d * t_v).to(tl.float32)
        q = tl.load(draft_probs + s * q_s + i * q_k + d * q_v).to(tl.float32)
        u = tl.load(uniforms + s * u_s + i * u_k).to(tl.float32)
        ok = u * q < p
        i = tl.where(ok, i + 1, i)
        go = ok & (i < n)
    rejected = i < n                                  # else: the bonus token from p at position n (q = 0)
    q_end = tl.where(rejected, V, 0)                  # q is read below q_end (the interpreter makes a
                                                      # scalar & block mask int32, not a mask)
    prow = target + s * t_s + i * t_k
    qrow = draft_probs + s * q_s + i * q_k
    # 2. The residual's mass (and p's, the fallback), and the last token with mass of each.
    mass_r = tl.full((), 0.0, tl.float64)
    mass_p = tl.full((), 0.0, tl.float64)
    last_r = tl.full((), -1, tl.int32)
    last_p = tl.full((), -1, tl.int32)
    for v0 in range(0, V, BLOCK_V):
        v = v0 + tl.arange(0, BLOCK_V)
        mv = v < V
        pv = tl.load(prow + v.to(tl.int64) * t_v, mask=mv, other=0.0).to(tl.float32).to(tl.float64)
        qv = tl.load(qrow + v.to(tl.int64) * q_v, mask=v < q_end, other=0.0).to(tl.float32).to(tl.float64)
        r = tl.maximum(pv - qv, 0.0)
        mass_r += tl.sum(r, axis=0)
        mass_p += tl.sum(pv, axis=0)
        last_r = tl.maximum(last_r, tl.max(tl.where((r > 0) & mv, v, -1), axis=0))
        last_p = tl.maximum(last_p, tl.max(tl.where((pv > 0) & mv, v, -1), axis=0))
    use_p = mass_r <= 0
    total = tl.where(use_p, mass_p, mass_r)
    last = tl.where(use_p, last_p, last_r)
    q_end = tl.where(use_p, 0, q_end)
    # 3. Inverse CDF: the number of tokens whose cumulative mass is <= u * total is the pick.
    threshold = tl.load(uniforms + s * u_s + K * u_k).to(tl.float32).to(tl.float64) * total
    prefix = tl.full((), 0.0, tl.float64)
    pick = tl.full((), 0, tl.int32)
    for v0 in range(0, V, BLOCK_V):
        v = v0 + tl.arange(0, BLOCK_V)
        mv = v < V
        pv = tl.load(prow + v.to(tl.int64) * t_v, mask=mv, other=0.0).to(tl.float32).to(tl.float64)
        qv = tl.load(qrow + v.to(tl.int64) * q_v, mask=v < q_end, other=0.0)
        r = tl.maximum(pv - qv.to(tl.float32).to(tl.float64), 0.0)
        cdf = prefix + tl.cumsum(r, axis=0)
        pick += tl.sum(((cdf <= threshold) & mv).to(tl.int32), axis=0)
        prefix += tl.sum(r, axis=0)
    tl.store(count_out + s, i.to(tl.int64))
    tl.store(token_out + s, tl.minimum(pick, last).to(tl.int64))


def verify_random(target_probs, draft_probs, draft_tokens, num_drafts, uniforms, *, block_v: int | None = None):
    """See kernels/reference/sampling.py. target_probs (S, k+1, V), draft_probs (S, k, V) (any float
    dtype, read as float32); draft_tokens (S, k) int; num_drafts (S,) int; uniforms (S, k+1) float in
    [0, 1). block_v: the vocabulary tile (tests)."""
    S, k1, V = target_probs.shape
    k = k1 - 1
    count, token = _int_out(S, target_probs.device), _int_out(S, target_probs.device)
    if S == 0:
        return count, token
    num = torch.as_tensor(num_drafts, device=target_probs.device)
    if k == 0:                                        # nothing to test: placeholders, never read
        draft_probs = target_probs[:, :1]
        draft_tokens = draft_tokens.new_zeros(S, 1)
    _verify_random_kernel[(S,)](
        target_probs, draft_probs, draft_tokens, num, uniforms, count, token, V, k,
        *target_probs.stride(), *draft_probs.stride(), *draft_tokens.stride(), num.stride(0),
        *uniforms.stride(), BLOCK_V=_block_v(V, block_v), num_warps=4)
    return count, token
