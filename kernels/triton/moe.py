"""The routed experts of the latent MoE in Triton: grouped by expert, relu², weighted combine.

Contract: kernels/fast/moe.py and kernels/reference/moe.py (grouped_experts), same signature:
    out[t] = sum_{j < k, e = ids[t, j] - first_expert in 0..E-1} w[t, j] * down_e( relu(up_e x[t])^2 )
x (T, D_in); topk_weights (T, k) float32; topk_ids (T, k) global ids (choices outside this shard's
experts add 0); up (E, I, D_in); down (E, D_in, I). Returns (T, D_in) in x's dtype. As the reference
does, each expert product is rounded to x's dtype before relu² and before weighting.

Why a kernel: the torch paths loop over experts on the host (one or two GEMMs per chosen expert, plus
gathers, argsort, bincount, index_add, and on the fast path a .tolist() sync). Here the (token, choice)
pairs are sorted by expert into blocks of BLOCK_M rows (each block holds one expert's pairs; a few torch
ops on the device, no host sync: the block count is bounded by ceil(T*k / BLOCK_M) + E), then two
launches cover every expert at once: up-projection + relu² into a (T*k, I) buffer, and down-projection
times the routing weight into (T*k, D_in), summed over the k choices. Each chosen expert's weights are
read once per block of its pairs. Not done: fusing the alignment into one kernel (vLLM's
moe_align_block_size), the final sum into the down kernel, and FP8/FP4 expert weights.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import INTERPRET, Launcher, empty

BLOCK_M = 16           # pairs per block: fixed, the alignment is built for it

_CONFIGS = [triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=st)
            for bn in (32, 64, 128) for bk in (32, 64, 128) for w in (4, 8) for st in (2, 3)]
_FIXED = {"BLOCK_N": 16, "BLOCK_K": 16, "num_warps": 4}


@triton.jit
def _moe_gemm_kernel(
    a, w, pairs, block_expert, scale, out,
    rows_per_a, Nout, Kdim,
    a_r, a_k, w_e, w_n, w_k, o_r, o_n,
    HAS_SCALE: tl.constexpr, RELU2: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """out[pair, n] = f( sum_k a[pair // rows_per_a, k] w[e, n, k] ) for the pairs of block b (expert e):
    f = relu² (up) or * scale[pair] (down); the product is rounded to a's dtype first, as F.linear does."""
    b = tl.program_id(0)
    e = tl.load(block_expert + b)
    if e >= 0:                                                   # blocks past the last expert's: idle
        rows = tl.load(pairs + b * BLOCK_M + tl.arange(0, BLOCK_M))   # pair ids, -1 for padding
        ok = rows >= 0
        rows = tl.where(ok, rows, 0).to(tl.int64)
        src = rows // rows_per_a                                 # row of a: the token (up) or the pair (down)
        n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        mn = n < Nout
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, Kdim, BLOCK_K):
            kk = k0 + tl.arange(0, BLOCK_K)
            mk = kk < Kdim
            at = tl.load(a + src[:, None] * a_r + kk[None, :] * a_k, mask=ok[:, None] & mk[None, :], other=0.0)
            wt = tl.load(w + e.to(tl.int64) * w_e + n[None, :] * w_n + kk[:, None] * w_k,
                         mask=mk[:, None] & mn[None, :], other=0.0)       # (BLOCK_K, BLOCK_N)
            if UPCAST:                                           # float32 (or the interpreter): exact products
                acc += tl.dot(at.to(tl.float32), wt.to(tl.float32), input_precision="ieee")
            else:                                                # 16-bit operands: tensor cores, float32 sums
                acc += tl.dot(at, wt)
        v = acc.to(a.dtype.element_ty).to(tl.float32)
        if RELU2:
            v = tl.maximum(v, 0.0)
            v = v * v
        if HAS_SCALE:
            v = v * tl.load(scale + rows, mask=ok, other=0.0)[:, None]
        tl.store(out + rows[:, None] * o_r + n[None, :] * o_n, v.to(out.dtype.element_ty),
                 mask=ok[:, None] & mn[None, :])


_gemm = Launcher(_moe_gemm_kernel, _CONFIGS, key=["Nout", "Kdim", "HAS_SCALE"])


def _align(topk_ids, first_expert: int, E: int):
    """Pairs (token * k + choice) sorted by local expert into blocks of BLOCK_M: pairs (nblk * BLOCK_M,)
    int32 (-1 = padding) and block_expert (nblk,) int32 (-1 = unused block), nblk an upper bound."""
    dev = topk_ids.device
    local = (topk_ids - first_expert).reshape(-1)
    npairs = local.numel()
    key = torch.where((local >= 0) & (local < E), local, E)            # other shards' experts sort last
    order = torch.argsort(key, stable=True)
    skey = key[order]
    counts = torch.bincount(key, minlength=E + 1)[:E]                  # (E,)
    nblocks = (counts + BLOCK_M - 1) // BLOCK_M
    ends = torch.cumsum(nblocks, 0)
    nblk = -(-npairs // BLOCK_M) + E
    be = torch.searchsorted(ends, torch.arange(nblk, device=dev), right=True)
    block_expert = torch.where(be < E, be, -1).to(torch.int32)
    first = torch.cumsum(counts, 0) - counts                           # sorted index of each expert's first pair
    e = skey.clamp(max=E - 1)
    slot = (ends - nblocks)[e] * BLOCK_M + torch.arange(npairs, device=dev) - first[e]
    slot = torch.where(skey < E, slot, nblk * BLOCK_M)                 # not ours: a dump slot past the end
    pairs = torch.full((nblk * BLOCK_M + 1,), -1, dtype=torch.int32, device=dev)
    pairs.scatter_(0, slot, order.to(torch.int32))
    return pairs[:-1], block_expert, nblk


def grouped_experts(x, topk_weights, topk_ids, up, down, *, first_expert: int = 0):
    T, Din = x.shape
    k = topk_ids.shape[1]
    E, inter, _ = up.shape
    pairs, block_expert, nblk = _align(topk_ids, first_expert, E)
    upcast = INTERPRET or x.dtype == torch.float32
    h = empty(T * k, inter, dtype=x.dtype, device=x.device)            # rows of pairs not ours stay unset
    _gemm(lambda m: (nblk, triton.cdiv(inter, m["BLOCK_N"])),
          x, up.to(x.dtype), pairs, block_expert, x, h, k, inter, Din,
          *x.stride(), *up.stride(), *h.stride(),
          cuda=x.is_cuda, fixed=_FIXED, HAS_SCALE=False, RELU2=True, UPCAST=upcast, BLOCK_M=BLOCK_M)
    y = torch.zeros(T * k, Din, dtype=torch.float32, device=x.device)   # pairs not ours add 0
    w = topk_weights.reshape(-1).float().contiguous()
    _gemm(lambda m: (nblk, triton.cdiv(Din, m["BLOCK_N"])),
          h, down.to(x.dtype), pairs, block_expert, w, y, 1, Din, inter,
          *h.stride(), *down.stride(), *y.stride(),
          cuda=x.is_cuda, fixed=_FIXED, HAS_SCALE=True, RELU2=False, UPCAST=upcast, BLOCK_M=BLOCK_M)
    return y.view(T, k, Din).sum(1).to(x.dtype)
