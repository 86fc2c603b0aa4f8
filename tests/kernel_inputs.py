"""Inputs for kernel tests: random values that are never zero (a zero hides a missing term)."""
from __future__ import annotations

import torch


def nonzero(t: torch.Tensor, floor: float = 1e-2) -> torch.Tensor:
    """t with every value pushed at least `floor` away from zero, keeping its sign."""
    return torch.where(t >= 0, t.clamp_min(floor), t.clamp_max(-floor))
