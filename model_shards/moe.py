"""Latent MoE: sigmoid router, routed relu² experts in a low-rank latent space, full-width shared expert.

The routed experts sit behind a small interface (`RoutedExperts`): the model computes with the local
ones; the cluster swaps in a dispatcher that sends latent vectors to expert-shard actors instead.
"""
from __future__ import annotations

import torch
from torch import nn

from kernels import ops

from .config import ModelConfig
from .linear import Linear


class ReluSquaredMLP(nn.Module):
    """down(relu(up(x))^2): the dense MLP layer and the shared expert."""

    def __init__(self, d: int, inter: int):
        super().__init__()
        self.up_proj = Linear(d, inter)
        self.down_proj = Linear(inter, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(torch.relu(self.up_proj(x)).square())


class RoutedExperts(nn.Module):
    """Experts first_expert .. first_expert+num_local-1 as stacked weights.

    up (E_local, inter, D_in), down (E_local, D_in, inter); the checkpoint stores them one expert at a
    time (`experts.{e}.up_proj.weight`), the loader stacks them.
    """

    def __init__(self, cfg: ModelConfig, first_expert: int = 0, num_local: int | None = None):
        super().__init__()
        n = cfg.n_routed_experts if num_local is None else num_local
        din = cfg.moe_expert_input_size
        self.first_expert, self.num_local = first_expert, n
        self.up = nn.Parameter(torch.empty(n, cfg.moe_intermediate_size, din).normal_(std=0.02))
        self.down = nn.Parameter(torch.empty(n, din, cfg.moe_intermediate_size).normal_(std=0.02))

    def forward(self, x_lat: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
        """x_lat (T, D_in), topk_* (T, k) -> weighted partial sum over the local experts (T, D_in)."""
        return ops.grouped_experts(x_lat, topk_weights, topk_ids, self.up, self.down, first_expert=self.first_expert)


class Router(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(cfg.n_routed_experts, cfg.hidden_size).normal_(std=0.02))
        self.register_buffer("e_score_correction_bias", torch.zeros(cfg.n_routed_experts, dtype=torch.float32))
        self.top_k, self.norm, self.scale = cfg.num_experts_per_tok, cfg.norm_topk_prob, cfg.routed_scaling_factor

    def forward(self, x: torch.Tensor):
        """x (T, d) -> topk_weights float32 (T, k), topk_ids (T, k)."""
        return ops.router_topk(x, self.weight, self.e_score_correction_bias, top_k=self.top_k, normalize=self.norm,
                               scaling=self.scale)


class LatentMoE(nn.Module):
    def __init__(self, cfg: ModelConfig, first_expert: int = 0, num_local: int | None = None):
        super().__init__()
        self.gate = Router(cfg)
        self.latent = cfg.moe_latent_size is not None
        if self.latent:
            self.fc1_latent_proj = Linear(cfg.hidden_size, cfg.moe_latent_size)
            self.fc2_latent_proj = Linear(cfg.moe_latent_size, cfg.hidden_size)
        self.experts: nn.Module = RoutedExperts(cfg, first_expert, num_local)
        self.shared_experts = ReluSquaredMLP(cfg.hidden_size, cfg.moe_shared_expert_intermediate_size)

    def forward(self, x: torch.Tensor, *_unused) -> torch.Tensor:
        """x (T, d) -> (T, d)."""
        topk_weights, topk_ids = self.gate(x)
        x_lat = self.fc1_latent_proj(x) if self.latent else x          # (T, latent)
        routed = self.experts(x_lat, topk_weights, topk_ids)            # (T, latent)
        if self.latent:
            routed = self.fc2_latent_proj(routed)
        return routed + self.shared_experts(x)
