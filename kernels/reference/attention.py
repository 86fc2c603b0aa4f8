"""Attention without rotary (NoPE), GQA, over a paged KV cache.

Cache layout per layer: k_cache, v_cache (num_blocks, block_size, H_kv, Dh). A sequence's block table
(list of block ids) maps position p to block table[p // block_size], offset p % block_size.
"""
from __future__ import annotations

import math

import torch


def write_kv(k_cache, v_cache, k, v, block_table: torch.Tensor, start_pos: int) -> None:
    """Write k, v (T, H_kv, Dh) of positions start_pos..start_pos+T-1 into the paged cache."""
    bs = k_cache.shape[1]
    pos = torch.arange(start_pos, start_pos + k.shape[0], device=k.device)
    blocks = block_table[pos // bs]
    k_cache[blocks, pos % bs] = k.to(k_cache.dtype)
    v_cache[blocks, pos % bs] = v.to(v_cache.dtype)


def gather_kv(k_cache, v_cache, block_table: torch.Tensor, length: int):
    """The first `length` positions of a sequence as contiguous (length, H_kv, Dh) tensors."""
    bs = k_cache.shape[1]
    pos = torch.arange(length, device=k_cache.device)
    blocks = block_table[pos // bs]
    return k_cache[blocks, pos % bs], v_cache[blocks, pos % bs]


def attention_prefill(q, k, v, *, start_pos: int = 0):
    """Causal GQA. q (T, H, Dh) holds positions start_pos..start_pos+T-1; k, v (S, H_kv, Dh) hold
    positions 0..S-1 with S = start_pos + T. Returns (T, H, Dh)."""
    T, H, Dh = q.shape
    S, Hkv = k.shape[0], k.shape[1]
    rep = H // Hkv
    kf = k.float().repeat_interleave(rep, dim=1)                      # (S, H, Dh)
    vf = v.float().repeat_interleave(rep, dim=1)
    scores = torch.einsum("thd,shd->hts", q.float(), kf) / math.sqrt(Dh)
    qpos = torch.arange(start_pos, start_pos + T, device=q.device)[:, None]
    kpos = torch.arange(S, device=q.device)[None, :]
    scores = scores.masked_fill((kpos > qpos)[None], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    return torch.einsum("hts,shd->thd", probs, vf).to(q.dtype)


def paged_attention(q, k_cache, v_cache, block_table: torch.Tensor, *, start_pos: int):
    """Queries at positions start_pos.. attend to the cache (which already holds their own k, v)."""
    k, v = gather_kv(k_cache, v_cache, block_table, start_pos + q.shape[0])
    return attention_prefill(q, k, v, start_pos=start_pos)


def _ints(x) -> list[int]:
    return x.tolist() if isinstance(x, torch.Tensor) else [int(v) for v in x]


def varlen_loop(attend, q, k_cache, v_cache, block_tables, start_positions, cu_seqlens):
    """prefill_attention as a loop of a per-sequence paged_attention `attend` (this module's or the fast
    path's) over the sequences' rows."""
    out = torch.empty_like(q)
    cu, starts = _ints(cu_seqlens), _ints(start_positions)
    for s, start in enumerate(starts):
        a, b = cu[s], cu[s + 1]
        if b > a:
            out[a:b] = attend(q[a:b], k_cache, v_cache, block_tables[s], start_pos=start)
    return out


def prefill_attention(q, k_cache, v_cache, block_tables, start_positions, cu_seqlens, *, max_seqlen=None):
    """The queries of S sequences, flat: q (T_total, H, Dh); sequence s owns rows cu_seqlens[s]..
    cu_seqlens[s+1]-1 (cu_seqlens[0] = 0, cu_seqlens[S] = T_total), at positions start_positions[s]..,
    its k, v already in the cache; block_tables (S, n) int, padded. start_positions (S,), cu_seqlens
    (S+1,): int tensors or lists. max_seqlen: a hint for the kernels, unused here. Returns (T_total, H, Dh)."""
    return varlen_loop(paged_attention, q, k_cache, v_cache, block_tables, start_positions, cu_seqlens)
