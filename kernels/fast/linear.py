"""x @ W^T for inference on a CPU. Reference: torch.nn.functional.linear.

Three products, chosen by the weight and the number of rows:
- Weights that hold exact bfloat16 values (a checkpoint stored in bfloat16, loaded as float32), up to
  PACKED_MAX_ROWS rows (decode steps, verifications, MTP drafts): the native packed kernel
  (kernels/fast/native/linear.c) over the weight's bfloat16 bits, packed once per weight sixteen output
  features at a time. Such passes are bound by reading the weights, and it reads half the bytes of a float32
  copy, once per call, with float32 products and sums. HYBRIDSERVE_BF16_WEIGHTS=0 turns it off.
- Otherwise, from 8 rows: oneDNN on the weight reordered once into its blocked layout
  (`torch.ops.mkldnn._reorder_linear_weight`, what torch.compile's CPU backend uses for frozen weights);
  torch's own float32 GEMM is MKL's, about half as fast on the AMD EPYC cores these benchmarks run on. The
  reordered copy is kept on the Parameter (HYBRIDSERVE_ONEDNN_LINEAR=0 turns the path off, and so does a
  torch without oneDNN).
- For 2-7 rows, W @ x^T (a tall GEMM over the weight's contiguous rows costs about what one row does, where
  MKL's GEMM against an (out, in) weight runs slower); one row (a GEMV) stays with MKL; so do training
  (autograd through the weight) and any weight that is not a Parameter (a slice made per call).
`python -m benchmarks.linear` measures the products side by side (docs/BENCHMARKS.md has its tables).
Shapes: x (..., in); weight (out, in); returns (..., out).
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from . import native

FEW_ROWS = 8
ENV = "HYBRIDSERVE_ONEDNN_LINEAR"
BF16_ENV = "HYBRIDSERVE_BF16_WEIGHTS"
BF16_WEIGHTS = os.environ.get(BF16_ENV, "1") != "0"   # the packed product from exact bfloat16 weights


def _onednn_works() -> bool:
    """oneDNN's reordered-weight linear exists in this torch and gives F.linear's numbers."""
    if os.environ.get(ENV, "1") == "0" or not torch.backends.mkldnn.is_available():
        return False
    try:
        g = torch.Generator().manual_seed(0)
        x, w = torch.randn(4, 32, generator=g), torch.randn(24, 32, generator=g)
        packed = torch.ops.mkldnn._reorder_linear_weight(w, 4)
        out = torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")
        return bool(torch.allclose(out, F.linear(x, w), atol=1e-4, rtol=1e-4))
    except (RuntimeError, AttributeError):
        return False


ONEDNN = _onednn_works()
ONEDNN_MIN_ROWS = 8    # below, W @ x^T (the few-rows product) was faster in the engine (cold weights, k=3 verification)


def weight_key(weight: torch.Tensor) -> tuple[int, int]:
    """(data pointer, version counter): what changes when the weight does. A tensor made in inference mode
    has no version counter (it can only change inside inference mode): its pointer alone."""
    try:
        return weight.data_ptr(), weight._version
    except RuntimeError:
        return weight.data_ptr(), -1


def derived_weight(weight: torch.nn.Parameter, name: str, make) -> torch.nn.Parameter:
    """make(weight) (a reshaped copy the product wants), kept on the Parameter under `name` and remade when
    the weight changes; itself a Parameter (no grad), so linear() keeps its oneDNN copy too. Inference
    only: autograd does not flow through it."""
    key = weight_key(weight)
    cached = getattr(weight, name, None)
    if cached is None or cached[0] != key:
        with torch.no_grad():
            cached = (key, torch.nn.Parameter(make(weight.detach()).contiguous(), requires_grad=False))
        setattr(weight, name, cached)
    return cached[1]


def packed_weight(weight: torch.nn.Parameter) -> torch.Tensor:
    """The Parameter's oneDNN copy, made on first use and remade when the weight changes (in-place
    updates bump its version; a new .data changes its pointer)."""
    key = weight_key(weight)
    cached = getattr(weight, "_onednn_packed", None)
    if cached is None or cached[0] != key:
        with torch.no_grad():
            cached = (key, torch.ops.mkldnn._reorder_linear_weight(weight.detach(), 32))
        weight._onednn_packed = cached
    return cached[1]


def _packs(x: torch.Tensor, weight: torch.Tensor, rows: int) -> bool:
    return (ONEDNN and rows >= ONEDNN_MIN_ROWS and x.dtype == torch.float32 and weight.dtype == torch.float32
            and isinstance(weight, torch.nn.Parameter) and x.device.type == "cpu"
            and not (torch.is_grad_enabled() and (weight.requires_grad or x.requires_grad)))


_NOT_BF16 = "not bfloat16"


def bf16_bits(weight: torch.Tensor) -> torch.Tensor | None:
    """A float32 Parameter's values as bfloat16 bits (int16, same shape) when that form is exact (a
    checkpoint stored in bfloat16 and loaded as float32), for the packed product of the native kernels
    (kernels/fast/native/linear.c); None otherwise. Checked once per weight version, kept on the Parameter."""
    if not (isinstance(weight, torch.nn.Parameter) and weight.dtype == torch.float32 and weight.device.type == "cpu"
            and native.library() is not None):
        return None
    key = weight_key(weight)
    cached = getattr(weight, "_bf16_bits", None)
    if cached is None or cached[0] != key:
        with torch.no_grad():
            w = weight.detach()
            b = w.to(torch.bfloat16)
            cached = (key, b.contiguous().view(torch.int16) if torch.equal(b.float(), w) else _NOT_BF16)
        weight._bf16_bits = cached
    return None if cached[1] is _NOT_BF16 else cached[1]


PACKED_MAX_ROWS = 64   # up to here exact bfloat16 weights take the packed kernel (decode, verification, MTP)


def _bf16_rows(x: torch.Tensor, weight: torch.Tensor, rows: int) -> torch.Tensor | None:
    """The weight's exact bfloat16 bits if the bfloat16-weight kernel takes this product."""
    if not (0 < rows <= PACKED_MAX_ROWS and BF16_WEIGHTS and x.dtype == torch.float32 and x.device.type == "cpu"
            and not (torch.is_grad_enabled() and (weight.requires_grad or x.requires_grad))):
        return None
    return bf16_bits(weight)


def pack16(bits: torch.Tensor) -> torch.Tensor:
    """(..., O, I) bfloat16 bits -> (..., ceil(O/16), I, 16): sixteen output features at a time, feature-minor,
    zeros past O; the layout of native/linear.c's packed kernel."""
    *lead, O, I = bits.shape
    blocks = -(-O // 16)
    padded = bits.new_zeros(*lead, blocks * 16, I)
    padded[..., :O, :] = bits
    return padded.view(*lead, blocks, 16, I).transpose(-1, -2).contiguous()


def packed_bf16(weight: torch.nn.Parameter, bits: torch.Tensor) -> torch.Tensor:
    """pack16(bits) of the Parameter, made on first use and kept on it (remade when the weight changes)."""
    key = weight_key(weight)
    cached = getattr(weight, "_bf16_packed", None)
    if cached is None or cached[0] != key:
        with torch.no_grad():
            cached = (key, pack16(bits))
        weight._bf16_packed = cached
    return cached[1]


def _bf16_product(x: torch.Tensor, packed: torch.Tensor, out_features: int, rows: int) -> torch.Tensor:
    x2 = x.reshape(rows, x.shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    out = torch.empty(rows, out_features, dtype=torch.float32)
    native.linear_bf16_packed(x2, packed, out)
    return out.view(*x.shape[:-1], out_features)


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    bits = _bf16_rows(x, weight, rows)
    if bits is not None:
        return _bf16_product(x, packed_bf16(weight, bits), weight.shape[0], rows)
    if _packs(x, weight, rows):
        out = torch.ops.mkldnn._linear_pointwise(x.reshape(rows, x.shape[-1]), packed_weight(weight), None,
                                                 "none", [], "")
        return out.view(*x.shape[:-1], weight.shape[0])
    if x.dim() == 2 and 1 < x.shape[0] <= FEW_ROWS:
        return torch.mm(weight, x.t()).t().contiguous()
    return F.linear(x, weight)


def packed_expert(stacked: torch.nn.Parameter, e: int) -> torch.Tensor:
    """Expert e's oneDNN copy of a stacked (E, out, in) Parameter, all experts reordered on first use."""
    key = weight_key(stacked)
    cached = getattr(stacked, "_onednn_packed", None)
    if cached is None or cached[0] != key:
        with torch.no_grad():
            cached = (key, [torch.ops.mkldnn._reorder_linear_weight(w, 32) for w in stacked.detach()])
        stacked._onednn_packed = cached
    return cached[1][e]


def expert_linear(x: torch.Tensor, stacked: torch.Tensor, e: int) -> torch.Tensor:
    """x (T, in) @ stacked[e]^T for stacked expert weights (E, out, in): (T, out)."""
    bits = _bf16_rows(x, stacked, x.shape[0])
    if bits is not None:
        return _bf16_product(x, packed_bf16(stacked, bits)[e], stacked.shape[1], x.shape[0])
    if _packs(x, stacked, x.shape[0]):
        return torch.ops.mkldnn._linear_pointwise(x, packed_expert(stacked, e), None, "none", [], "")
    return linear(x, stacked[e])
