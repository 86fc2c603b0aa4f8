"""Expert parallelism applied from the outside: a drop-in for a MoE layer's `experts` module.

Expert-parallel rank 0 of a stage lives in the stage actor itself (`local`); the other ranks are
expert-shard actors. Each remote shard gets only the tokens routed to it (latent vectors, top-k ids and
weights); the local slice computes while the remote ones do, and the weighted partial sums are added.
"""
from __future__ import annotations

import ray
import torch
from torch import nn


class RemoteExperts(nn.Module):
    def __init__(self, layer: int, local: nn.Module, shards: list, ranges: list[tuple[int, int]]):
        super().__init__()
        self.layer, self.local, self.shards, self.ranges = layer, local, shards, ranges

    def forward(self, x_lat: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
        """x_lat (T, D_in), topk_* (T, k) -> (T, D_in), the sum over all shards."""
        calls = []
        for shard, (lo, hi) in zip(self.shards, self.ranges):
            rows = ((topk_ids >= lo) & (topk_ids < hi)).any(dim=1).nonzero().squeeze(1)   # tokens for this shard
            if rows.numel():
                calls.append((rows, shard.compute.remote(self.layer, x_lat[rows].cpu(), topk_weights[rows].cpu(),
                                                         topk_ids[rows].cpu())))
        out = self.local(x_lat, topk_weights, topk_ids).float()          # overlaps with the remote shards
        for (rows, _), partial in zip(calls, ray.get([c for _, c in calls])):
            out.index_add_(0, rows, partial.to(out.device, torch.float32))
        return out.to(x_lat.dtype)
