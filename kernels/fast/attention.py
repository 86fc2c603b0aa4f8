"""Paged-cache writes and attention through flat slot indices, GQA as two batched matmuls.
Reference: kernels/reference/attention.py; same signatures and cache layout:
k_cache, v_cache (num_blocks, block_size, H_kv, Dh); block_table (n_blocks,) int64; q (T, H, Dh)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

SMALL_T = 8


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
    """Queries at positions start_pos.. attend causally to the cache (which already holds their k, v).

    Up to SMALL_T queries (decode, verification): GQA as batched matmuls over the KV heads, the R query
    heads of a group stacked as rows, ~3x cheaper than torch's fused SDPA on a CPU at these sizes.
    Longer prefill chunks: the fused SDPA, which never materialises the (T, S) scores."""
    T, H, Dh = q.shape
    nb, bs, hkv, _ = k_cache.shape
    R, S = H // hkv, start_pos + T
    slots = _slots(block_table, bs, 0, S)
    k = k_cache.view(nb * bs, hkv, Dh).index_select(0, slots).float()          # (S, H_kv, Dh)
    v = v_cache.view(nb * bs, hkv, Dh).index_select(0, slots).float()
    if T > SMALL_T:
        visible = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(start_pos)
        out = F.scaled_dot_product_attention(q.float().transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
                                             attn_mask=visible, enable_gqa=True)
        return out.transpose(0, 1).to(q.dtype)
    qg = q.float().view(T, hkv, R, Dh).permute(1, 2, 0, 3).reshape(hkv, R * T, Dh)   # (H_kv, R*T, Dh)
    scores = torch.bmm(qg, k.permute(1, 2, 0)) * (1.0 / math.sqrt(Dh))      # (H_kv, R*T, S)
    if T > 1:                                                          # query t sees keys 0..start_pos+t
        future = torch.ones(T, S, dtype=torch.bool, device=q.device).triu(start_pos + 1)
        scores = scores.view(hkv, R, T, S).masked_fill(future, float("-inf")).view(hkv, R * T, S)
    out = torch.bmm(torch.softmax(scores, dim=-1), v.transpose(0, 1))     # (H_kv, R*T, Dh)
    return out.view(hkv, R, T, Dh).permute(2, 0, 1, 3).reshape(T, H, Dh).to(q.dtype)


def decode_attention(q, k, v, k_cache, v_cache, block_tables: list[torch.Tensor], positions: list[int]):
    """One new token of each of S sequences (batched decode): writes its k, v at its position, then
    attends over the sequence's positions 0..position. q (S, H, Dh); k, v (S, H_kv, Dh).

    The sequences' block tables are padded to the longest (with block 0) and whole blocks gathered, a
    row of H_kv * Dh * block_size floats each; each KV head's keys and values are then strided views
    that bmm reads in place (no permuted copies); padded and future keys are masked out. It replaced
    gathering row by row and contracting with einsum, whose permuted copies cost more than the math."""
    S, H, Dh = q.shape
    nb, bs, hkv, _ = k_cache.shape
    R, nblk = H // hkv, max(positions) // bs + 1
    tables = torch.nn.utils.rnn.pad_sequence(block_tables, batch_first=True)[:, :nblk]   # (S, nblk)
    pos = torch.tensor(positions, device=q.device)
    new = tables.gather(1, (pos // bs)[:, None])[:, 0] * bs + pos % bs         # (S,) cache rows of the new tokens
    k_cache.view(nb * bs, hkv, Dh).index_copy_(0, new, k.to(k_cache.dtype))
    v_cache.view(nb * bs, hkv, Dh).index_copy_(0, new, v.to(v_cache.dtype))
    L = nblk * bs
    keys = k_cache.index_select(0, tables.reshape(-1)).view(S, L, hkv, Dh).float()   # (S, L, H_kv, Dh)
    vals = v_cache.index_select(0, tables.reshape(-1)).view(S, L, hkv, Dh).float()
    beyond = torch.arange(L, device=q.device)[None, :] > pos[:, None]         # (S, L): padding, not yet written
    qg = q.float().view(S, hkv, R, Dh)
    out = torch.empty(S, hkv, R, Dh, dtype=torch.float32, device=q.device)
    for g in range(hkv):
        scores = torch.bmm(qg[:, g], keys[:, :, g].transpose(1, 2))          # (S, R, L)
        scores.mul_(1.0 / math.sqrt(Dh)).masked_fill_(beyond[:, None, :], float("-inf"))
        torch.bmm(torch.softmax(scores, dim=-1), vals[:, :, g], out=out[:, g])
    return out.view(S, H, Dh).to(q.dtype)


def short_chunks_attention(q, k_cache, v_cache, block_tables: torch.Tensor, start_positions: list[int],
                           lengths: list[int]):
    """Several sequences' short chunks at once (verification passes, MTP catch-ups: up to SMALL_T queries
    each), their k, v already in the cache. q (sum(lengths), H, Dh), the sequences' rows one after another;
    block_tables (S, n) padded. The queries are padded to (S, T, ...) with T the longest chunk, whole
    blocks gathered as in decode_attention, and query t of sequence s sees keys 0..start_s + t: one
    bmm pair per KV head for all sequences, where a loop over them costs ~10 ops each. Returns
    (sum(lengths), H, Dh)."""
    S, T = len(lengths), max(lengths)
    _, H, Dh = q.shape
    nb, bs, hkv, _ = k_cache.shape
    R, dev = H // hkv, q.device
    nblk = max(s + n for s, n in zip(start_positions, lengths) if n) // bs + 1
    tables = block_tables[:, :nblk]
    if tables.shape[1] < nblk:                                               # a table shorter than the longest
        tables = torch.cat([tables, tables.new_zeros(S, nblk - tables.shape[1])], 1)
    L = nblk * bs
    offsets = torch.tensor([0] + lengths[:-1], device=dev).cumsum(0)          # (S,) first row of each sequence
    lens = torch.tensor(lengths, device=dev)
    t = torch.arange(T, device=dev)
    last = torch.minimum(t[None, :], (lens - 1).clamp(min=0)[:, None])       # (S, T) padded query -> a real one
    qp = q.index_select(0, (offsets[:, None] + last).view(-1)).float()       # (S*T, H, Dh)
    qg = qp.view(S, T, hkv, R, Dh).permute(0, 2, 3, 1, 4).reshape(S, hkv, R * T, Dh)
    keys = k_cache.index_select(0, tables.reshape(-1)).view(S, L, hkv, Dh).float()
    vals = v_cache.index_select(0, tables.reshape(-1)).view(S, L, hkv, Dh).float()
    sees = torch.tensor(start_positions, device=dev)[:, None] + last          # (S, T) last key position seen
    hidden = torch.arange(L, device=dev)[None, None, :] > sees[:, :, None]    # (S, T, L)
    out = torch.empty(S, hkv, R * T, Dh, dtype=torch.float32, device=dev)
    for g in range(hkv):
        scores = torch.bmm(qg[:, g], keys[:, :, g].transpose(1, 2)).view(S, R, T, L)
        scores.mul_(1.0 / math.sqrt(Dh)).masked_fill_(hidden[:, None], float("-inf"))
        torch.bmm(torch.softmax(scores, dim=-1).view(S, R * T, L), vals[:, :, g], out=out[:, g])
    out = out.view(S, hkv, R, T, Dh).permute(0, 3, 1, 2, 4).reshape(S * T, H, Dh)   # (S*T, H, Dh)
    keep = (t[None, :] < lens[:, None]).view(-1).nonzero().squeeze(1)         # the real queries, in order
    return out.index_select(0, keep).to(q.dtype)
