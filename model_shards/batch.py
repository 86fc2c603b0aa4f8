"""What a forward pass needs to know about the sequences in a flat (ragged) token batch.

The model runs on tokens of many sequences concatenated along dim 0; Mamba and attention layers use
this layout to find each sequence's tokens, its recurrent-state slot and its KV block table.
"""
from __future__ import annotations

import dataclasses

import torch


@dataclasses.dataclass
class SeqSlice:
    """One sequence's part of the batch.

    offset:       index of its first token in the flat batch
    num_tokens:   how many tokens it has in this pass (a prefill chunk, 1 decode token, or 1+k to verify)
    start_pos:    how many of its tokens the caches already hold (position of its first token here)
    mamba_slot:   its row in every Mamba layer's state cache
    block_table:  (n_blocks,) int64 KV block ids covering positions 0..start_pos+num_tokens-1
    keep_states:  keep the Mamba state after each position (verification); the runner commits the
                  accepted one (HybridCache.commit) before the sequence's next pass
    """

    offset: int
    num_tokens: int
    start_pos: int
    mamba_slot: int
    block_table: torch.Tensor
    keep_states: bool = False

    @property
    def end(self) -> int:
        return self.offset + self.num_tokens


@dataclasses.dataclass
class BatchLayout:
    """seqs: the sequences, in row order. slots: set only for a CUDA-graph decode pass (cuda_graphs.py):
    row r is one decode token of the sequence in Mamba slot slots[r] (a device tensor), and seqs is empty,
    so no Python value steers the pass: a captured graph replays with whatever slots then holds."""

    seqs: list[SeqSlice]
    slots: torch.Tensor | None = None

    @property
    def num_tokens(self) -> int:
        return sum(s.num_tokens for s in self.seqs)

    @classmethod
    def single(cls, num_tokens: int, start_pos: int, block_table: torch.Tensor, *, mamba_slot: int = 0,
               keep_states: bool = False) -> "BatchLayout":
        return cls([SeqSlice(0, num_tokens, start_pos, mamba_slot, block_table, keep_states)])
