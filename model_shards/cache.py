"""Caches: paged KV per attention layer; Mamba states (one slot per sequence) stacked over a stage's layers.

A stage allocates caches only for the layers it owns. Block ids and slot ids come from the engine's
allocator (router/block_manager.py); these classes only hold the tensors.
"""
from __future__ import annotations

import torch

from kernels import ops

from .config import ModelConfig


class PagedKVCache:
    """k, v: (num_blocks, block_size, H_kv, Dh) in `dtype`: the model's dtype (float32 on the CPU path,
    bf16/fp16 for a model loaded so), as the attention layers write k and v in it."""

    def __init__(self, cfg: ModelConfig, num_blocks: int, block_size: int, dtype=torch.float32, device="cpu"):
        shape = (num_blocks, block_size, cfg.num_key_value_heads, cfg.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.block_size = block_size

    def copy_blocks(self, src: list[int], dst: list[int]) -> None:
        """Blocks dst[i] := src[i] (k and v), for a forked sequence's copy-on-write of a shared block."""
        s, d = (torch.tensor(x, dtype=torch.long, device=self.k.device) for x in (src, dst))
        self.k.index_copy_(0, d, self.k.index_select(0, s))          # (n, block_size, H_kv, Dh)
        self.v.index_copy_(0, d, self.v.index_select(0, s))

    @staticmethod
    def bytes_per_block(cfg: ModelConfig, block_size: int, dtype_bytes: int = 4) -> int:
        """k and v of one block (= cluster.cost_model.kv_block_bytes_per_layer)."""
        return 2 * block_size * cfg.num_key_value_heads * cfg.head_dim * dtype_bytes


class MambaStateCache:
    """The Mamba states of every Mamba layer a stage owns, stacked: conv (L, S, conv_dim, K-1) and
    ssm (L, S, H, P, N) float32, one row per layer and sequence slot; `layer(l)` is layer l's view.

    A verification pass over up to `max_positions` tokens leaves the slots' states untouched and keeps
    in scratch what any of its positions' states needs: the conv window after each position, and the
    SSM inputs (cum log-decay (L, S, H, T), dt*x (L, S, H, T, P), B (L, S, T, G, N)). When the accepted
    count arrives, `commit` builds the one state that is kept (kernels ssd_advance_ in place per sequence on a
    CPU, ssd_state_at over the gathered slots on a GPU), for every layer at once: a pass never materialises T full SSM states,
    and a commit is one batched update, not one per layer.
    """

    def __init__(self, cfg: ModelConfig, num_layers: int, num_slots: int, max_positions: int = 1, device="cpu"):
        f32 = torch.float32
        H, P, N, G = cfg.mamba_num_heads, cfg.mamba_head_dim, cfg.ssm_state_size, cfg.n_groups
        L, S, T, conv = num_layers, num_slots, max_positions, (cfg.conv_dim, cfg.conv_kernel - 1)
        self.conv = torch.zeros((L, S, *conv), dtype=f32, device=device)
        self.ssm = torch.zeros((L, S, H, P, N), dtype=f32, device=device)
        self.scratch_conv = torch.zeros((L, S, T, *conv), dtype=f32, device=device)
        self.scratch_cum = torch.zeros((L, S, H, T), dtype=f32, device=device)
        self.scratch_dtx = torch.zeros((L, S, H, T, P), dtype=f32, device=device)
        self.scratch_B = torch.zeros((L, S, T, G, N), dtype=f32, device=device)
        self.kept = [0] * num_slots                       # verified positions in scratch, per slot

    def layer(self, index: int) -> "MambaLayerCache":
        return MambaLayerCache(self, index)

    def commit(self, slots: list[int], indices: list[int]) -> None:
        """For each sequence, the state after its verified position `index` becomes its state (all layers)."""
        for slot, index in zip(slots, indices):
            if not 0 <= index < self.kept[slot]:
                raise IndexError(f"commit index {index} outside the {self.kept[slot]} verified positions of slot {slot}")
            self.kept[slot] = 0
        if self.ssm.is_cuda and len(slots) > 1:            # one launch sequence for all (per-sequence: S)
            self._commit_gathered(slots, indices)
            return
        if ops.mamba_commit_(self.conv, self.ssm, (self.scratch_conv, self.scratch_cum, self.scratch_dtx,
                                                   self.scratch_B), list(slots), list(indices)):
            return                                         # every sequence and layer in one C call
        # On a CPU, per sequence, every layer at once, in place on the slot's views: gathering the slots'
        # states (L, S, H, P, N) for one batched ssd_state_at and scattering them back moves three times
        # the state's bytes, and was the slower of the two at every batch size timed (2 to 32).
        for slot, index in zip(slots, indices):
            self.conv[:, slot].copy_(self.scratch_conv[:, slot, index])
            ops.ssd_advance_(self.ssm[:, slot], self.scratch_cum[:, slot], self.scratch_dtx[:, slot],
                             self.scratch_B[:, slot], index)

    def _commit_gathered(self, slots: list[int], indices: list[int]) -> None:
        L, S = self.ssm.shape[0], len(slots)
        sl = torch.tensor(slots, device=self.ssm.device)
        ix = torch.tensor(indices, device=self.ssm.device)
        self.conv.index_copy_(1, sl, self.scratch_conv[:, sl, ix])                 # (L, S, C, K-1)

        def rows(t):                                                                # (L, S, ...) -> (L*S, ...)
            t = t.index_select(1, sl)
            return t.reshape(L * S, *t.shape[2:])
        new = ops.ssd_state_at(rows(self.ssm), rows(self.scratch_cum), rows(self.scratch_dtx),
                               rows(self.scratch_B), ix.repeat(L))                  # (L*S, H, P, N)
        self.ssm.index_copy_(1, sl, new.view(L, S, *new.shape[1:]))

    def copy_slots(self, src: list[int], dst: list[int]) -> None:
        """Slots dst[i] := src[i] for every layer (conv and SSM state; not the verification scratch: a fork
        happens between verifications, with nothing kept there)."""
        s, d = (torch.tensor(x, dtype=torch.long, device=self.ssm.device) for x in (src, dst))
        self.conv.index_copy_(1, d, self.conv.index_select(1, s))     # (L, n, C, K-1)
        self.ssm.index_copy_(1, d, self.ssm.index_select(1, s))       # (L, n, H, P, N)
        for slot in dst:
            self.kept[slot] = 0

    @staticmethod
    def bytes_per_slot(cfg: ModelConfig, max_positions: int = 1) -> int:
        """Per layer and slot: the state and the verification scratch."""
        H, P, N, G = cfg.mamba_num_heads, cfg.mamba_head_dim, cfg.ssm_state_size, cfg.n_groups
        conv = cfg.conv_dim * (cfg.conv_kernel - 1)
        return 4 * (conv + H * P * N + max_positions * (conv + H + H * P + G * N))


class MambaLayerCache:
    """One layer's view of a MambaStateCache: conv (S, C, K-1), ssm (S, H, P, N), scratch (S, T, ...)."""

    def __init__(self, store: MambaStateCache, index: int):
        self.store = store
        self.conv, self.ssm = store.conv[index], store.ssm[index]
        self.scratch = (store.scratch_conv[index], store.scratch_cum[index], store.scratch_dtx[index],
                        store.scratch_B[index])

    def keep(self, slots: torch.Tensor | slice, conv_states, cum, dtx, B) -> None:
        """Scratch of a verification pass of S sequences (slots: (S,) int64, or a slice of S slots), T
        positions each: conv_states (S, T, C, K-1), cum (S, H, T), dtx (S, H, T, P), B (S, T, G, N)."""
        T = B.shape[1]
        conv, cum_, dtx_, B_ = self.scratch
        conv[slots, :T] = conv_states
        cum_[slots, :, :T] = cum
        dtx_[slots, :, :T] = dtx
        B_[slots, :T] = B
        self.mark_kept(range(len(self.conv))[slots] if isinstance(slots, slice) else slots.tolist(), T)

    def mark_kept(self, slots, T: int) -> None:
        """These slots' scratch holds T verified positions (written by keep, or by a fused kernel)."""
        for slot in slots:
            self.store.kept[slot] = T

    def reset(self, slot: int) -> None:
        self.conv[slot].zero_()
        self.ssm[slot].zero_()


class HybridCache:
    """The caches of the layers one process owns, keyed by layer index ("mtp" for the MTP attention).

    kv_dtype: the dtype of every paged KV cache; pass the model's dtype (HybridModel.make_cache does),
    which is what the planner budgets per KV element (DeviceSpec.kv_dtype_bytes). No default: a KV cache
    in another dtype than the model's either wastes memory the plan did not count or loses precision.
    The Mamba states and their scratch are float32 whatever it is (the model card keeps SSM state in float32).
    """

    def __init__(self, cfg: ModelConfig, layer_ids: list[int], *, num_blocks: int, block_size: int,
                 num_slots: int, kv_dtype: torch.dtype, max_verify_positions: int = 1, with_mtp: bool = False,
                 device="cpu"):
        self.block_size = block_size
        self.kv: dict = {}
        mamba_ids = [i for i in layer_ids if cfg.layer_kind(i) == "M"]
        self.mamba_states = MambaStateCache(cfg, len(mamba_ids), num_slots, max_verify_positions, device)
        self.mamba = {i: self.mamba_states.layer(n) for n, i in enumerate(mamba_ids)}
        for i in layer_ids:
            if cfg.layer_kind(i) == "*":
                self.kv[i] = PagedKVCache(cfg, num_blocks, block_size, kv_dtype, device)
        if with_mtp:
            self.kv["mtp"] = PagedKVCache(cfg, num_blocks, block_size, kv_dtype, device)

    def fork(self, slots: list[tuple[int, int]], blocks: list[tuple[int, int]]) -> None:
        """Copy (source, destination) Mamba slots and KV blocks, in every layer this process owns (the MTP
        block's KV too): n > 1 choices start from their parent's prompt state (router/fork.py)."""
        if slots and self.mamba:
            self.mamba_states.copy_slots([a for a, _ in slots], [b for _, b in slots])
        if blocks:
            for kv in self.kv.values():
                kv.copy_blocks([a for a, _ in blocks], [b for _, b in blocks])

    def commit(self, slot: int, index: int) -> None:
        """The Mamba state after verified position `index` becomes sequence `slot`'s state."""
        self.commit_many([slot], [index])

    def commit_many(self, slots: list[int], indices: list[int]) -> None:
        """commit for several sequences at once: one batched update for all Mamba layers."""
        if slots and self.mamba:
            self.mamba_states.commit(slots, indices)
