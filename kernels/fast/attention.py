"""Paged-cache writes and attention through flat slot indices and torch's fused SDPA (GQA built in).
Reference: kernels/reference/attention.py; same signatures and cache layout:
k_cache, v_cache (num_blocks, block_size, H_kv, Dh); block_table (n_blocks,) int64; q (T, H, Dh)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _slots(block_table: torch.Tensor, block_size: int, start: int, stop: int) -> torch.Tensor:
    """Flat cache rows (block * block_size + offset) of positions start..stop-1."""
    rows = block_table[:, None] * block_size + torch.arange(block_size, device=block_table.device)
    return rows.view(-1)[start:stop]


def write_kv(k_cache, v_cache, k, v, block_table: torch.Tensor, start_pos: int) -> None:
    """Write k, v (T, H_kv, Dh) of positions start_pos..start_pos+T-1 into the paged cache."""
    nb, bs, hkv, dh = k_cache.shape
    slots = _slots(block_table, bs, start_pos, start_pos + k.shape[0])
    k_cache.view(nb * bs, hkv, dh).index_copy_(0, slots, k.to(k_cache.dtype))
    v_cache.view(nb * bs, hkv, dh).index_copy_(0, slots, v.to(v_cache.dtype))


def paged_attention(q, k_cache, v_cache, block_table: torch.Tensor, *, start_pos: int):
    """Queries at positions start_pos.. attend causally to the cache (which already holds their k, v)."""
    T = q.shape[0]
    nb, bs, hkv, dh = k_cache.shape
    S = start_pos + T
    slots = _slots(block_table, bs, 0, S)
    k = k_cache.view(nb * bs, hkv, dh).index_select(0, slots).transpose(0, 1).float()   # (H_kv, S, Dh)
    v = v_cache.view(nb * bs, hkv, dh).index_select(0, slots).transpose(0, 1).float()
    mask = None
    if T > 1:                                                          # query t sees keys 0..start_pos+t
        mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(start_pos)
    out = F.scaled_dot_product_attention(q.transpose(0, 1).float(), k, v, attn_mask=mask, enable_gqa=True)
    return out.transpose(0, 1).to(q.dtype)                             # (T, H, Dh)
