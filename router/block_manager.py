"""Allocator of KV blocks and Mamba state slots. Pure bookkeeping: the tensors live on the stages.

A KV block may be held by several sequences (the choices of an n > 1 request share their prompt's full
blocks, router/fork.py): `refs[b]` counts its holders and it is free again when the last one lets go."""
from __future__ import annotations

import heapq
import math

from .sequence import Sequence


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, num_slots: int):
        if num_blocks <= 0 or block_size <= 0 or num_slots <= 0:
            raise ValueError(f"BlockManager: num_blocks ({num_blocks}), block_size ({block_size}) and "
                             f"num_slots ({num_slots}) must be positive")
        self.num_blocks, self.block_size, self.num_slots = num_blocks, block_size, num_slots
        self.free_blocks: list[int] = list(range(num_blocks - 1, -1, -1))
        # A min-heap: the lowest free slot first keeps running sequences in a dense range of slots, which
        # the Mamba decode step updates in place (model_shards/mamba.py) instead of gathering.
        self.free_slots: list[int] = list(range(num_slots))
        self.refs: list[int] = [0] * num_blocks          # holders per block (0: free)

    def blocks_for(self, num_positions: int) -> int:
        return math.ceil(num_positions / self.block_size)

    def can_hold(self, seq: Sequence, num_positions: int) -> bool:
        """Could `seq` grow to cover `num_positions` (and get a slot if it has none)?"""
        need = max(0, self.blocks_for(num_positions) - len(seq.block_table))
        return need <= len(self.free_blocks) and (seq.mamba_slot >= 0 or bool(self.free_slots))

    def grow(self, seq: Sequence, num_positions: int) -> None:
        if not self.can_hold(seq, num_positions):
            raise RuntimeError(f"seq {seq.seq_id}: not enough KV blocks or Mamba slots")
        if seq.mamba_slot < 0:
            seq.mamba_slot = heapq.heappop(self.free_slots)
        while len(seq.block_table) < self.blocks_for(num_positions):
            seq.block_table.append(self.allocate())

    def allocate(self) -> int:
        """One free block, now held once."""
        block = self.free_blocks.pop()
        self.refs[block] = 1
        return block

    def share(self, blocks: list[int]) -> list[int]:
        """Another holder for each of `blocks` (already held): a copy of the list to put in its table."""
        for b in blocks:
            if self.refs[b] <= 0:
                raise RuntimeError(f"block {b} is free: it cannot be shared")
            self.refs[b] += 1
        return list(blocks)

    def slot(self) -> int:
        """The lowest free Mamba slot."""
        return heapq.heappop(self.free_slots)

    def free(self, seq: Sequence) -> None:
        for b in reversed(seq.block_table):
            self.refs[b] -= 1
            if self.refs[b] == 0:
                self.free_blocks.append(b)
            elif self.refs[b] < 0:
                raise RuntimeError(f"block {b} freed more often than it was held")
        seq.block_table = []
        if seq.mamba_slot >= 0:
            heapq.heappush(self.free_slots, seq.mamba_slot)
            seq.mamba_slot = -1

    def freed_by(self, seqs) -> int:
        """Blocks that would be free if every one of `seqs` let go of its blocks (shared ones count once
        all their holders are among them)."""
        held: dict[int, int] = {}
        for seq in seqs:
            for b in seq.block_table:
                held[b] = held.get(b, 0) + 1
        return sum(n == self.refs[b] for b, n in held.items())

    @property
    def used_blocks(self) -> int:
        return self.num_blocks - len(self.free_blocks)

    @property
    def used_slots(self) -> int:
        return self.num_slots - len(self.free_slots)

    def all_free(self) -> bool:
        return len(self.free_blocks) == self.num_blocks and len(self.free_slots) == self.num_slots
