"""RMSNorm and Mamba's gated, grouped RMSNorm in Triton.

Contract: kernels/reference/norm.py (rms_norm, gated_rms_norm), same signatures:
    rms_norm:        y = x / sqrt(mean(x^2) + eps) * weight                        over the last dim D
    gated_rms_norm:  h = x * silu(z);  y = h / sqrt(mean_group(h^2) + eps) * weight, groups of group_size
x, z (..., D), any leading shape; rows may be strided (z is a column slice of in_proj's output), the
last dim must be contiguous (else a copy is made). Computes in float32, returns x's dtype.

Why a kernel: the torch path is 5-7 elementwise/reduction passes (upcast, silu, multiply, square-mean,
rsqrt-scale, weight, downcast), each a round trip to memory; here one program per (row, group) loads x
and z once, does everything in registers and writes y once.
"""
from __future__ import annotations

import triton
import triton.language as tl

from ._common import Launcher, empty, next_pow2

_CONFIGS = [triton.Config({}, num_warps=w) for w in (1, 2, 4, 8, 16)]


@triton.jit
def _rms_norm_kernel(
    x, z, w, y, GS, x_r, z_r, y_r, eps,
    HAS_Z: tl.constexpr, BLOCK: tl.constexpr,
):
    r = tl.program_id(0).to(tl.int64)
    col = tl.program_id(1) * GS + tl.arange(0, BLOCK)
    m = tl.arange(0, BLOCK) < GS
    h = tl.load(x + r * x_r + col, mask=m, other=0.0).to(tl.float32)
    if HAS_Z:
        zv = tl.load(z + r * z_r + col, mask=m, other=0.0).to(tl.float32)
        h = h * (zv * tl.sigmoid(zv))
    rstd = 1.0 / tl.sqrt(tl.sum(h * h, axis=0) / GS + eps)
    out = tl.load(w + col, mask=m, other=0.0).to(tl.float32) * (h * rstd)
    tl.store(y + r * y_r + col, out.to(y.dtype.element_ty), mask=m)


_norm = Launcher(_rms_norm_kernel, _CONFIGS, key=["GS", "BLOCK"])


def _rows(t, D):
    t2 = t.reshape(-1, D)
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def _launch(x, z, weight, group_size: int, eps: float):
    D = x.shape[-1]
    x2 = _rows(x, D)
    z2 = _rows(z, D) if z is not None else x2
    M = x2.shape[0]
    y = empty(*x.shape, dtype=x.dtype, device=x.device)
    y2 = y.view(M, D)
    block = next_pow2(group_size)
    _norm((M, D // group_size), x2, z2, weight.contiguous(), y2, group_size, x2.stride(0), z2.stride(0), y2.stride(0),
          float(eps), cuda=x.is_cuda, fixed={"num_warps": 4}, HAS_Z=z is not None, BLOCK=block)
    return y


def rms_norm(x, weight, eps: float):
    """x (..., D), weight (D,)."""
    return _launch(x, None, weight, x.shape[-1], eps)


def gated_rms_norm(x, z, weight, *, group_size: int, eps: float):
    """RMSNorm_per_group(x * silu(z)) * weight; x, z (..., D), D a multiple of group_size."""
    return _launch(x, z, weight, group_size, eps)
