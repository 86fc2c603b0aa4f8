"""RMSNorm and Mamba's gated grouped RMSNorm: one C call for float32 on a CPU (kernels/fast/native/norm.c),
otherwise torch's fused rms_norm. Reference: kernels/reference/norm.py. Both compute in float32 and
return the input dtype."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import native


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x (..., D), weight (D,)."""
    out = native.rms_norm(x, weight, eps)
    if out is not None:
        return out
    return F.rms_norm(x.float(), (x.shape[-1],), weight.float(), eps).to(x.dtype)


def gated_rms_norm(x: torch.Tensor, z: torch.Tensor, weight: torch.Tensor, *, group_size: int,
                   eps: float) -> torch.Tensor:
    """RMSNorm_per_group(x * silu(z)) * weight; x, z (..., D), D a multiple of group_size."""
    out = native.gated_rms_norm(x, z, weight, group_size, eps)
    if out is not None:
        return out
    h = x.float() * F.silu(z.float())
    shape = h.shape
    h = F.rms_norm(h.view(*shape[:-1], shape[-1] // group_size, group_size), (group_size,), None, eps)
    return (h.view(shape) * weight.float()).to(x.dtype)
