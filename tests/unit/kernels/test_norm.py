"""RMSNorm and Mamba's gated grouped RMSNorm (kernels/reference/norm.py) against direct float64 formulas.

    rms_norm(x) = w * x / sqrt(mean(x^2) + eps)
    gated_rms_norm(x, z) = w * h / sqrt(mean_group(h^2) + eps),  h = x * silu(z),
        the mean taken over each group of `group_size` consecutive channels.
Both compute in float32 and return the input dtype, so 16-bit tolerances are one rounding of the output.
"""
from __future__ import annotations

import pytest
import torch

from kernels.reference.norm import gated_rms_norm, rms_norm

TOL = {  # (atol, rtol) against the float64 formula
    torch.float32: (1e-5, 1e-5),
    torch.bfloat16: (2e-2, 1e-2),
    torch.float16: (2e-3, 2e-3),
}
DTYPES = list(TOL)
EPS = 1e-5


def _nonzero(t: torch.Tensor, floor: float = 1e-2) -> torch.Tensor:
    return torch.where(t >= 0, t.clamp_min(floor), t.clamp_max(-floor))


def rand(*shape, g, dtype=torch.float32, scale=1.0, shift=0.0):
    return _nonzero(torch.randn(*shape, generator=g) * scale + shift).to(dtype)


def check(actual, expected, dtype):
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(actual.double(), expected.double(), atol=atol, rtol=rtol)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(5, 64), (3, 4, 48), (1, 16)], ids=str)
def test_rms_norm_equals_direct_formula(dtype, shape):
    g = torch.Generator().manual_seed(20)
    x = rand(*shape, g=g, dtype=dtype, scale=3.0)
    w = rand(shape[-1], g=g, dtype=dtype, scale=0.1, shift=1.0)
    y = rms_norm(x, w, EPS)
    xd = x.double()
    ref = w.double() * xd / torch.sqrt(xd.pow(2).mean(-1, keepdim=True) + EPS)
    assert y.dtype == dtype and y.shape == x.shape
    check(y, ref, dtype)


def naive_gated(x, z, w, group_size, eps):
    """Group by group, in float64."""
    h = x.double() * z.double() * torch.sigmoid(z.double())
    out = torch.empty_like(h)
    for g0 in range(0, h.shape[-1], group_size):
        part = h[..., g0:g0 + group_size]
        out[..., g0:g0 + group_size] = part / torch.sqrt(part.pow(2).mean(-1, keepdim=True) + eps)
    return out * w.double()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,group_size", [((7, 64), 16), ((7, 64), 64), ((2, 3, 96), 32), ((1, 24), 8)], ids=str)
def test_gated_rms_norm_equals_direct_formula_per_group(dtype, shape, group_size):
    g = torch.Generator().manual_seed(21)
    x = rand(*shape, g=g, dtype=dtype, scale=2.0)
    z = rand(*shape, g=g, dtype=dtype, scale=2.0)
    w = rand(shape[-1], g=g, scale=0.1, shift=1.0)
    y = gated_rms_norm(x, z, w, group_size=group_size, eps=EPS)
    assert y.dtype == dtype and y.shape == x.shape
    check(y, naive_gated(x, z, w, group_size, EPS), dtype)


def test_gated_rms_norm_normalises_each_group_on_its_own():
    """Scaling one group's input leaves every other group's output unchanged (and this one's, up to eps)."""
    g = torch.Generator().manual_seed(22)
    x, z = rand(4, 64, g=g), rand(4, 64, g=g)
    w = rand(64, g=g, scale=0.1, shift=1.0)
    y = gated_rms_norm(x, z, w, group_size=16, eps=EPS)
    x2 = x.clone()
    x2[:, 16:32] *= 10.0
    y2 = gated_rms_norm(x2, z, w, group_size=16, eps=EPS)
    others = torch.cat([torch.arange(0, 16), torch.arange(32, 64)])
    torch.testing.assert_close(y2[:, others], y[:, others], atol=0, rtol=0)
    torch.testing.assert_close(y2[:, 16:32], y[:, 16:32], atol=1e-3, rtol=1e-3)
    # One group over all channels is a different function: the grouping is not a no-op.
    y_one = gated_rms_norm(x2, z, w, group_size=64, eps=EPS)
    assert not torch.allclose(y_one, y2, atol=1e-2)


def test_gated_rms_norm_gates_before_normalising():
    """norm(x * silu(z)), not norm(x) * silu(z) (the Mamba-2 norm_before_gate=False order)."""
    g = torch.Generator().manual_seed(23)
    x, z = rand(3, 32, g=g), rand(3, 32, g=g, scale=2.0)
    w = torch.ones(32)
    y = gated_rms_norm(x, z, w, group_size=32, eps=EPS)
    gate_after = rms_norm(x, w, EPS) * torch.nn.functional.silu(z)
    assert not torch.allclose(y, gate_after, atol=1e-2)
    check(y, naive_gated(x, z, w, 32, EPS), torch.float32)
