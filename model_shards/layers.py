"""RMSNorm and the pre-norm residual block that wraps every mixer kind."""
from __future__ import annotations

import torch
from torch import nn

from kernels import ops

from . import fused_blocks
from .attention import Attention
from .config import ATTENTION, MAMBA, MLP, MOE, ModelConfig
from .mamba import Mamba2Mixer
from .moe import LatentMoE, ReluSquaredMLP


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.rms_norm(x, self.weight, self.eps)


def make_mixer(cfg: ModelConfig, kind: str, expert_range: tuple[int, int] | None = None) -> nn.Module:
    if kind == MAMBA:
        return Mamba2Mixer(cfg)
    if kind == ATTENTION:
        return Attention(cfg)
    if kind == MOE:
        first, n = (0, cfg.n_routed_experts) if expert_range is None else (expert_range[0], expert_range[1] - expert_range[0])
        return LatentMoE(cfg, first, n)
    if kind == MLP:
        return ReluSquaredMLP(cfg.hidden_size, cfg.intermediate_size)
    raise ValueError(f"unknown layer kind {kind!r}")


class Block(nn.Module):
    """h + mixer(norm(h)). Mamba and attention mixers take the batch layout and their cache."""

    def __init__(self, cfg: ModelConfig, kind: str, expert_range: tuple[int, int] | None = None):
        super().__init__()
        self.kind = kind
        self.norm = RMSNorm(cfg.hidden_size, cfg.layer_norm_epsilon)
        self.mixer = make_mixer(cfg, kind, expert_range)

    def forward(self, h, batch, cache) -> torch.Tensor:
        out = fused_blocks.forward(self, h, batch, cache)      # a few rows: the block in one C call
        if out is not None:
            return out
        x = self.norm(h)
        if self.kind in (MAMBA, ATTENTION):
            return h + self.mixer(x, batch, cache)
        return h + self.mixer(x)
