"""Per-layer caches: paged KV for attention, one recurrent-state slot per sequence for Mamba.

A stage allocates caches only for the layers it owns. Block ids and slot ids come from the engine's
allocator (router/block_manager.py); these classes only hold the tensors.
"""
from __future__ import annotations

import torch

from .config import ModelConfig


class PagedKVCache:
    """k, v: (num_blocks, block_size, H_kv, Dh)."""

    def __init__(self, cfg: ModelConfig, num_blocks: int, block_size: int, dtype=torch.float32, device="cpu"):
        shape = (num_blocks, block_size, cfg.num_key_value_heads, cfg.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.block_size = block_size

    @staticmethod
    def bytes_per_block(cfg: ModelConfig, block_size: int, dtype_bytes: int = 4) -> int:
        return 2 * block_size * cfg.num_key_value_heads * cfg.head_dim * dtype_bytes


class MambaStateCache:
    """conv (S, conv_dim, K-1) and ssm (S, H, P, N), float32, one row per sequence slot.

    For verification of up to `max_positions` tokens, the state after each position is kept in
    scratch (S, max_positions, ...) until the accepted count arrives and one of them is committed.
    """

    def __init__(self, cfg: ModelConfig, num_slots: int, max_positions: int = 1, device="cpu"):
        f32 = torch.float32
        conv = (cfg.conv_dim, cfg.conv_kernel - 1)
        ssm = (cfg.mamba_num_heads, cfg.mamba_head_dim, cfg.ssm_state_size)
        self.conv = torch.zeros((num_slots, *conv), dtype=f32, device=device)
        self.ssm = torch.zeros((num_slots, *ssm), dtype=f32, device=device)
        self.scratch_conv = torch.zeros((num_slots, max_positions, *conv), dtype=f32, device=device)
        self.scratch_ssm = torch.zeros((num_slots, max_positions, *ssm), dtype=f32, device=device)

    def commit(self, slot: int, index: int) -> None:
        """The state after verified position `index` becomes the sequence's state."""
        self.conv[slot] = self.scratch_conv[slot, index]
        self.ssm[slot] = self.scratch_ssm[slot, index]

    def reset(self, slot: int) -> None:
        self.conv[slot].zero_()
        self.ssm[slot].zero_()

    @staticmethod
    def bytes_per_slot(cfg: ModelConfig, max_positions: int = 1) -> int:
        per = cfg.conv_dim * (cfg.conv_kernel - 1) + cfg.mamba_num_heads * cfg.mamba_head_dim * cfg.ssm_state_size
        return 4 * per * (1 + max_positions)


class HybridCache:
    """The caches of the layers one process owns, keyed by layer index ("mtp" for the MTP attention)."""

    def __init__(self, cfg: ModelConfig, layer_ids: list[int], *, num_blocks: int, block_size: int,
                 num_slots: int, max_verify_positions: int = 1, with_mtp: bool = False,
                 kv_dtype=torch.float32, device="cpu"):
        self.block_size = block_size
        self.kv: dict = {}
        self.mamba: dict = {}
        for i in layer_ids:
            kind = cfg.layer_kind(i)
            if kind == "*":
                self.kv[i] = PagedKVCache(cfg, num_blocks, block_size, kv_dtype, device)
            elif kind == "M":
                self.mamba[i] = MambaStateCache(cfg, num_slots, max_verify_positions, device)
        if with_mtp:
            self.kv["mtp"] = PagedKVCache(cfg, num_blocks, block_size, kv_dtype, device)

    def commit(self, slot: int, index: int) -> None:
        for c in self.mamba.values():
            c.commit(slot, index)
