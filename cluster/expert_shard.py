"""An expert-parallel shard: one contiguous slice of the routed experts of every MoE layer of a stage.

It receives latent token vectors (after fc1_latent_proj: 1024 wide for Super, not 4096) with their
top-k ids and weights, and returns the weighted partial sums of its own experts.
"""
from __future__ import annotations

import torch
from torch import nn

from model_shards.config import MOE, ModelConfig
from model_shards.moe import RoutedExperts
from model_shards.weights import load_into


class ExpertShard(nn.Module):
    """State-dict names equal the model's (`backbone.layers.{i}.mixer.experts.*`) so the loader reads
    exactly this shard's expert tensors."""

    def __init__(self, cfg: ModelConfig, layers: range, expert_range: tuple[int, int]):
        super().__init__()
        first, last = expert_range
        moe_layers = [i for i in layers if cfg.layer_kind(i) == MOE]
        self.backbone = nn.Module()
        self.backbone.layers = nn.ModuleDict()
        for i in moe_layers:
            block = nn.Module()
            block.mixer = nn.Module()
            block.mixer.experts = RoutedExperts(cfg, first, last - first)
            self.backbone.layers[str(i)] = block
        self.expert_range = expert_range
        self.moe_layers = moe_layers               # in the order a pass runs them

    @classmethod
    def load(cls, cfg: ModelConfig, folder, layers: range, expert_range: tuple[int, int],
             dtype: torch.dtype = torch.float32) -> "ExpertShard":
        """The shard's experts in `dtype`: the stage model's (load_checkpoint's), as they compute on its activations."""
        with torch.device("meta"):
            shard = cls(cfg, layers, expert_range)
        shard = shard.to(dtype=dtype).to_empty(device="cpu")
        load_into(shard, folder)
        return shard.eval()

    @torch.no_grad()
    def compute(self, layer: int, x_lat: torch.Tensor, topk_weights: torch.Tensor,
                topk_ids: torch.Tensor) -> torch.Tensor:
        """x_lat (T, D_in), topk_* (T, k) -> partial sum over this shard's experts (T, D_in)."""
        return self.backbone.layers[str(layer)].mixer.experts(x_lat, topk_weights, topk_ids)
