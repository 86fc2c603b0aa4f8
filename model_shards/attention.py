"""Grouped-query attention without rotary embeddings (NoPE) over a paged KV cache."""
from __future__ import annotations

import torch
from torch import nn

from kernels import ops

from .batch import BatchLayout
from .cache import PagedKVCache
from .config import ModelConfig
from .linear import Linear


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
        steps = [s for s in batch.seqs if s.num_tokens == 1]
        if len(steps) > 1:                                 # decode steps of all sequences at once
            rows = torch.tensor([s.offset for s in steps], device=h.device)
            out.index_copy_(0, rows, ops.decode_attention(
                q.index_select(0, rows), k.index_select(0, rows), v.index_select(0, rows), cache.k, cache.v,
                [s.block_table for s in steps], [s.start_pos for s in steps]))
        for s in batch.seqs:
            if len(steps) > 1 and s.num_tokens == 1:
                continue
            rows = slice(s.offset, s.end)
            ops.write_kv(cache.k, cache.v, k[rows], v[rows], s.block_table, s.start_pos)
            out[rows] = ops.paged_attention(q[rows], cache.k, cache.v, s.block_table, start_pos=s.start_pos)
        return self.o_proj(out.reshape(T, self.H * self.Dh))
