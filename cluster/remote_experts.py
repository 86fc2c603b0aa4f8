"""Expert parallelism applied from the outside: a drop-in for a MoE layer's `experts` module that
sends each shard only the tokens routed to it and sums the weighted partial results."""
from __future__ import annotations

import ray
import torch
from torch import nn


class RemoteExperts(nn.Module):
    def __init__(self, layer: int, shards: list, ranges: list[tuple[int, int]]):
        super().__init__()
        self.layer, self.shards, self.ranges = layer, shards, ranges

    def forward(self, x_lat: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
        """x_lat (T, D_in), topk_* (T, k) -> (T, D_in), the sum over all shards."""
        out = torch.zeros(x_lat.shape, dtype=torch.float32, device=x_lat.device)
        calls = []
        for shard, (lo, hi) in zip(self.shards, self.ranges):
            rows = ((topk_ids >= lo) & (topk_ids < hi)).any(dim=1).nonzero().squeeze(1)   # tokens for this shard
            if rows.numel():
                calls.append((rows, shard.compute.remote(self.layer, x_lat[rows].cpu(), topk_weights[rows].cpu(),
                                                         topk_ids[rows].cpu())))
        for rows, partial in zip([r for r, _ in calls], ray.get([c for _, c in calls])):
            out.index_add_(0, rows, partial.to(out.device, torch.float32))
        return out.to(x_lat.dtype)
