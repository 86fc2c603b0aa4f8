"""What every Triton kernel module shares: launching with autotuning on a GPU and one fixed config under
the interpreter, output allocation (poisoned with NaN when a test asks), and small jitted helpers.

Whether a kernel runs compiled or interpreted is decided by triton.jit when the kernel is decorated
(TRITON_INTERPRET=1 at import time of these modules), so INTERPRET is read once, here, the same way.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

try:
    from triton import knobs
    INTERPRET: bool = bool(knobs.runtime.interpret)
except ImportError:                                   # triton < 3.4 reads the variable itself
    INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")

# Tests set this to True: every output the wrappers allocate starts as NaN (or a NaN-like pattern for
# 16-bit types), so an element a kernel forgets to write fails the comparison instead of passing on
# whatever memory held.
POISON = False


def empty(*shape, dtype, device) -> torch.Tensor:
    if POISON:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def next_pow2(n: int) -> int:
    return triton.next_power_of_2(max(int(n), 1))


class Launcher:
    """A jitted kernel and, compiled on a GPU only, its autotuned twin.

    launch(grid, *args, fixed=..., **kwargs): on a CUDA tensor (not interpreting) the autotuned kernel
    picks the meta-parameters its configs list; otherwise the plain kernel runs with `fixed` (one config,
    chosen by the wrapper for the shape at hand). `grid` is a callable of the meta-parameters.
    restore: names of arguments updated in place (autotuning runs a kernel several times: their contents
    are saved and put back between trials)."""

    def __init__(self, kernel, configs: list[triton.Config], key: list[str], restore: tuple[str, ...] = ()):
        self.kernel = kernel
        self.tuned = None if INTERPRET else triton.autotune(configs=configs, key=key,
                                                            restore_value=list(restore))(kernel)

    def __call__(self, grid, *args, cuda: bool, fixed: dict, **kwargs):
        if cuda and self.tuned is not None:
            self.tuned[grid](*args, **kwargs)
        else:
            self.kernel[grid](*args, **kwargs, **fixed)


@triton.jit
def softplus(v):
    """torch's softplus (its threshold 20 included) as max(v, 0) + log1p(exp(-|v|)), with log1p in the
    accurate form log(u) * e / (u - 1), u = 1 + e (libdevice's log1p does not run under the interpreter)."""
    e = tl.exp(-tl.abs(v))
    u = 1.0 + e
    one = u == 1.0
    lp = tl.where(one, e, tl.log(u) * (e / tl.where(one, 1.0, u - 1.0)))
    return tl.where(v > 20.0, v, tl.maximum(v, 0.0) + lp)
