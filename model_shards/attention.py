"""Grouped-query attention without rotary embeddings (NoPE) over a paged KV cache."""
from __future__ import annotations

import torch
from torch import nn

from kernels import ops

from .batch import BatchLayout
from .cache import PagedKVCache
from .config import ModelConfig
from .linear import Linear

# Chunks of up to this many tokens (decode steps, verification, MTP catch-ups) go to the fused paged
# attention of all such sequences at once where it is available (ops.paged_attention_); longer prompt
# chunks use the prefill attention (torch's fused SDPA), which is bound by compute.
FUSED_MAX_TOKENS = 8


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.H, self.Hkv, self.Dh = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.q_proj = Linear(cfg.hidden_size, self.H * self.Dh)
        self.k_proj = Linear(cfg.hidden_size, self.Hkv * self.Dh)
        self.v_proj = Linear(cfg.hidden_size, self.Hkv * self.Dh)
        self.o_proj = Linear(self.H * self.Dh, cfg.hidden_size)

    def forward(self, h: torch.Tensor, batch: BatchLayout, cache: PagedKVCache) -> torch.Tensor:
        """h (T, d) -> (T, d). Writes each sequence's new k, v at its positions, then attends causally."""
        T = h.shape[0]
        q = self.q_proj(h).view(T, self.H, self.Dh)
        k = self.k_proj(h).view(T, self.Hkv, self.Dh)
        v = self.v_proj(h).view(T, self.Hkv, self.Dh)
        out = torch.empty_like(q)
        seqs = batch.seqs
        short = [s for s in seqs if s.num_tokens <= FUSED_MAX_TOKENS]
        if short and ops.paged_attention_(q, k, v, cache.k, cache.v, [s.offset for s in short],
                                          [s.num_tokens for s in short], [s.start_pos for s in short],
                                          [s.block_table for s in short], out):
            seqs = [s for s in seqs if s.num_tokens > FUSED_MAX_TOKENS]   # the short ones: one fused call
        steps = [s for s in seqs if s.num_tokens == 1]
        if len(steps) > 1:                                 # decode steps of all sequences at once
            rows = torch.tensor([s.offset for s in steps], device=h.device)
            out.index_copy_(0, rows, ops.decode_attention(
                q.index_select(0, rows), k.index_select(0, rows), v.index_select(0, rows), cache.k, cache.v,
                [s.block_table for s in steps], [s.start_pos for s in steps]))
        if len(steps) == 1:                                # a lone decode step: as one sequence
            s = steps[0]
            rows = slice(s.offset, s.end)
            ops.write_kv(cache.k, cache.v, k[rows], v[rows], s.block_table, s.start_pos)
            out[rows] = ops.paged_attention(q[rows], cache.k, cache.v, s.block_table, start_pos=s.start_pos)
        multi = [s for s in seqs if s.num_tokens > 1]
        if multi:                                          # prefill chunks, verification passes: one call
            for s in multi:
                ops.write_kv(cache.k, cache.v, k[s.offset:s.end], v[s.offset:s.end], s.block_table, s.start_pos)
            cu = [0]
            for s in multi:
                cu.append(cu[-1] + s.num_tokens)
            first = multi[0].offset
            packed = all(s.offset == first + c for s, c in zip(multi, cu))      # rows first..first+cu[-1]-1
            if packed:
                rows = slice(first, first + cu[-1])
            else:
                rows = torch.cat([torch.arange(s.offset, s.end, device=h.device) for s in multi])
            tables = (multi[0].block_table[None] if len(multi) == 1 else
                      torch.nn.utils.rnn.pad_sequence([s.block_table for s in multi], batch_first=True))
            o = ops.prefill_attention(q[rows], cache.k, cache.v, tables, [s.start_pos for s in multi], cu,
                                      max_seqlen=max(s.num_tokens for s in multi))
            if packed:
                out[rows] = o
            else:
                out.index_copy_(0, rows, o)
        return self.o_proj(out.reshape(T, self.H * self.Dh))
