"""The model's bias-free linear layer: nn.Linear's parameters and names, the product from kernels/ops."""
from __future__ import annotations

import torch
from torch import nn

from kernels import ops


class Linear(nn.Linear):
    """nn.Linear(in, out, bias=False) whose product goes through ops.linear (fast for a few rows)."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__(in_features, out_features, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.linear(x, self.weight)
