"""Helpers shared by transport tests: reproducible random tensors of any dtype, compared bit for bit."""
from __future__ import annotations

import torch

from cluster.transport import to_bytes


def random_tensor(dtype: torch.dtype | str, shape, seed: int = 0, scale: float = 100) -> torch.Tensor:
    """Floats: normal x `scale`; bool: coin flips; integers: uniform over the dtype's whole range."""
    g = torch.Generator().manual_seed(seed)
    dt = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    if dt.is_floating_point:
        return (torch.randn(shape, generator=g) * scale).to(dt)
    if dt == torch.bool:
        return torch.rand(shape, generator=g) > 0.5
    info = torch.iinfo(dt)
    return torch.randint(info.min, info.max, shape, generator=g, dtype=torch.int64).to(dt)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    a, b = a.cpu(), b.cpu()
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(to_bytes(a), to_bytes(b))
