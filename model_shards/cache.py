"""Per-layer caches: paged KV for attention, one recurrent-state slot per sequence for Mamba.

A stage allocates caches only for the layers it owns. Block ids and slot ids come from the engine's
allocator (router/block_manager.py); these classes only hold the tensors.
"""
from __future__ import annotations

import torch

from kernels import ops

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

    A verification pass over up to `max_positions` tokens leaves the slot's state untouched and keeps
    in scratch what any of its positions' states needs: the conv window after each position, and the
    SSM inputs (cum log-decay, dt*x, B). When the accepted count arrives, `commit` builds the one
    state that is kept (kernels ssd_state_at), so a pass never materialises T full SSM states.
    """

    def __init__(self, cfg: ModelConfig, num_slots: int, max_positions: int = 1, device="cpu"):
        f32 = torch.float32
        H, P, N, G = cfg.mamba_num_heads, cfg.mamba_head_dim, cfg.ssm_state_size, cfg.n_groups
        conv = (cfg.conv_dim, cfg.conv_kernel - 1)
        self.conv = torch.zeros((num_slots, *conv), dtype=f32, device=device)
        self.ssm = torch.zeros((num_slots, H, P, N), dtype=f32, device=device)
        self.scratch_conv = torch.zeros((num_slots, max_positions, *conv), dtype=f32, device=device)
        self.scratch_cum = torch.zeros((num_slots, max_positions, H), dtype=f32, device=device)
        self.scratch_dtx = torch.zeros((num_slots, max_positions, H, P), dtype=f32, device=device)
        self.scratch_B = torch.zeros((num_slots, max_positions, G, N), dtype=f32, device=device)
        self.kept = [0] * num_slots                       # positions in scratch, per slot

    def keep(self, slots: torch.Tensor, conv_states, cum, dtx, B) -> None:
        """Scratch of a verification pass of S sequences (slots (S,) int64), T positions each:
        conv_states (S, T, C, K-1), cum (S, T, H), dtx (S, T, H, P), B (S, T, G, N)."""
        T = cum.shape[1]
        for scratch, new in ((self.scratch_conv, conv_states), (self.scratch_cum, cum),
                             (self.scratch_dtx, dtx), (self.scratch_B, B)):
            scratch[:, :T].index_copy_(0, slots, new.to(scratch.dtype))
        for slot in slots.tolist():
            self.kept[slot] = T

    def commit(self, slots: list[int], indices: list[int]) -> None:
        """For each sequence, the state after its verified position `index` becomes its state."""
        for slot, index in zip(slots, indices):
            if not 0 <= index < self.kept[slot]:
                raise IndexError(f"commit index {index} outside the {self.kept[slot]} verified positions of slot {slot}")
            self.kept[slot] = 0
        sl = torch.tensor(slots, device=self.ssm.device)
        ix = torch.tensor(indices, device=self.ssm.device)
        self.conv.index_copy_(0, sl, self.scratch_conv[sl, ix])
        self.ssm.index_copy_(0, sl, ops.ssd_state_at(self.ssm[sl], self.scratch_cum[sl], self.scratch_dtx[sl],
                                                     self.scratch_B[sl], ix))

    def reset(self, slot: int) -> None:
        self.conv[slot].zero_()
        self.ssm[slot].zero_()

    @staticmethod
    def bytes_per_slot(cfg: ModelConfig, max_positions: int = 1) -> int:
        H, P, N, G = cfg.mamba_num_heads, cfg.mamba_head_dim, cfg.ssm_state_size, cfg.n_groups
        conv = cfg.conv_dim * (cfg.conv_kernel - 1)
        return 4 * (conv + H * P * N + max_positions * (conv + H + H * P + G * N))


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
        """The Mamba state after verified position `index` becomes sequence `slot`'s state."""
        self.commit_many([slot], [index])

    def commit_many(self, slots: list[int], indices: list[int]) -> None:
        """commit for several sequences at once: one batched update per Mamba layer."""
        if slots:
            for c in self.mamba.values():
                c.commit(slots, indices)
