"""RMSNorm and Mamba's gated, grouped RMSNorm. Both compute in float32 and return the input dtype."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x (..., D), weight (D,)."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (weight.float() * xf).to(x.dtype)


def gated_rms_norm(x: torch.Tensor, z: torch.Tensor, weight: torch.Tensor, *, group_size: int,
                   eps: float) -> torch.Tensor:
    """y = RMSNorm_per_group(x * silu(z)) * weight. x, z (..., D); D a multiple of group_size."""
    dtype = x.dtype
    h = x.float() * F.silu(z.float())
    shape = h.shape
    h = h.view(*shape[:-1], shape[-1] // group_size, group_size)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return (weight.float() * h.view(shape)).to(dtype)
