"""Whole pre-norm residual blocks in one C call for up to MAX_ROWS rows (kernels/fast/native/blocks.c).

Why: at decode sizes (decode steps of up to 64 sequences, verifications, MTP drafts) a block is ~10
kernel calls and ~20 torch ops of glue, and their Python dispatch cost about twice what the kernels
compute (docs/KERNELS.md "Fused blocks" says how that was measured). Here a block is one call whose
arguments were prepared once: `MoEBlock`, `MambaBlock` and `AttentionBlock` hold the weights' bfloat16 bits and the
ctypes arguments, built by `prepare_*` (None where the C path does not apply: no library, weights that
are not exact bfloat16, float16 activations, ...). The outputs are the unfused native path's, bit for bit
(the same kernels in the same order; tests/unit/kernels/test_fused_blocks.py checks it), so choosing the
fused path never changes a token.

The caller (model_shards/fused_blocks.py) keeps a prepared block per module and remakes it when a
weight changes (`weights_key`).
"""
from __future__ import annotations

import ctypes
import math

import torch

from . import native
from .linear import PACKED_MAX_ROWS, bf16_bits, packed_bf16, weight_key
from .moe import NATIVE_MAX_ROWS

_i64, _f32, _ptr = ctypes.c_int64, ctypes.c_float, ctypes.c_void_p

# The rows the unfused path sends to the packed bfloat16 product and the native experts kernel (beyond,
# oneDNN's product and torch's expert schedules take them, whose sums differ in order): the fused path
# takes exactly these, so it is exact.
MAX_ROWS = min(PACKED_MAX_ROWS, NATIVE_MAX_ROWS)


def weights_key(tensors) -> tuple:
    """What changes when any of these tensors does (pointer, version counter)."""
    return tuple(weight_key(t) for t in tensors)


def _signatures(lib) -> None:
    if getattr(lib, "_blocks_typed", False):
        return
    lib.moe_block_f32.argtypes = [_i64] * 8 + [_ptr, _ptr, _f32, _ptr, _ptr, ctypes.c_int, _f32] + [_ptr] * 8
    lib.moe_block_f32.restype = None
    lib.mamba_block_f32.argtypes = ([_i64] * 10 + [_ptr, _ptr, _ptr, _f32, _ptr] + [_ptr] * 7
                                    + [_f32, _f32, ctypes.c_int, _ptr, _i64, _f32, _ptr] + [_ptr] * 4 + [_i64]
                                    + [_ptr, _ptr])
    lib.mamba_block_f32.restype = None
    lib.attention_block_f32.argtypes = [_i64] * 7 + [_ptr] * 5 + [_ptr, _f32] + [_ptr] * 6 + [_f32, _ptr, _ptr]
    lib.attention_block_f32.restype = ctypes.c_int
    lib._blocks_typed = True


def _bits(*weights):
    out = [bf16_bits(w) for w in weights]
    return None if any(b is None for b in out) else out


def _packed(*weights):
    """The dense weights' bfloat16 bits packed for the packed product (the unfused path's own copies)."""
    bits = _bits(*weights)
    return None if bits is None else [packed_bf16(w, b) for w, b in zip(weights, bits)]


def _plain(t: torch.Tensor) -> bool:
    return t.dtype is torch.float32 and t.is_cpu and t.is_contiguous()


class MoEBlock:
    """h + LatentMoE(rms_norm(h)) for up to MAX_ROWS rows (model_shards/moe.py, layers.py Block)."""

    def __init__(self, lib, tensors, bits, dims, norm_eps, normalize, scaling):
        self.lib, self.tensors, self.bits = lib, tensors, bits      # kept alive: the call reads their memory
        self.head = dims                                            # (D, L, I, E, k, Is, first)
        self.D, self.L, self.k, self.Is = dims[0], dims[1], dims[4], dims[5]
        norm_w, router_w, bias = tensors[:3]
        fc1, fc2, up, down, su, sd = bits
        self.mid = (norm_w.data_ptr(), norm_eps, router_w.data_ptr(), None if bias is None else bias.data_ptr(),
                    int(normalize), scaling, None if fc1 is None else fc1.data_ptr(),
                    None if fc2 is None else fc2.data_ptr(), up.data_ptr(), down.data_ptr(), su.data_ptr(),
                    sd.data_ptr())
        self.scratch_per_row = 3 * self.k + 2 * self.D + 2 * self.L + self.Is

    def __call__(self, h: torch.Tensor) -> torch.Tensor:
        """h (T, D) float32 contiguous, T <= MAX_ROWS -> (T, D)."""
        T = h.shape[0]
        out = torch.empty(T, self.D)
        scratch = torch.empty(T * self.scratch_per_row)
        self.lib.moe_block_f32(T, *self.head, h.data_ptr(), *self.mid, out.data_ptr(), scratch.data_ptr())
        return out


def prepare_moe(norm_w, norm_eps: float, router_w, bias, top_k: int, normalize: bool, scaling: float,
                fc1, fc2, up, down, shared_up, shared_down, first_expert: int) -> MoEBlock | None:
    """fc1/fc2: the latent projections (None: no latent space); up (E, I, L), down (E, L, I) this shard's
    experts; shared_up (Is, D), shared_down (D, Is). None where the fused path does not apply."""
    lib = native.library()
    if lib is None or not all(_plain(t) for t in (norm_w, router_w)) or (bias is not None and not _plain(bias)):
        return None
    dense = _packed(*[w for w in (fc1, fc2) if w is not None], shared_up, shared_down)
    experts = _bits(up, down)
    if dense is None or experts is None:
        return None
    bits = ([None, None] if fc1 is None else dense[:2]) + experts + dense[-2:]
    _signatures(lib)
    E, I, L = up.shape
    dims = (norm_w.shape[0], L, I, E, top_k, shared_up.shape[0], first_expert)
    return MoEBlock(lib, (norm_w, router_w, bias), bits, dims, norm_eps, normalize, scaling)


class MambaBlock:
    """h + Mamba2Mixer(rms_norm(h)) for S sequences of T tokens each in rows s*T.. (model_shards/mamba.py):
    decode steps (T = 1, the states advanced in place) or verification (states untouched, the commit's
    scratch written)."""

    def __init__(self, lib, tensors, bits, dims, norm_eps, dt_limit, group_size, gnorm_eps):
        self.lib, self.tensors, self.bits = lib, tensors, bits
        self.head = dims                                            # (D, Di, C, K, H, P, N, G)
        self.D, self.Di, self.C, self.H = dims[0], dims[1], dims[2], dims[4]
        norm_w, conv_w, conv_b, A, Dp, dt_bias, gnorm_w = tensors
        win, wout = bits
        lo, hi = dt_limit
        self.norm = (norm_w.data_ptr(), norm_eps, win.data_ptr())
        self.params = (conv_w.data_ptr(), None if conv_b is None else conv_b.data_ptr(), A.data_ptr(),
                       Dp.data_ptr(), dt_bias.data_ptr(), float(lo), min(float(hi), native.FLT_MAX),
                       int(lo > 0.0 or hi != float("inf")), gnorm_w.data_ptr(), group_size, gnorm_eps,
                       wout.data_ptr())
        self.scratch_per_row = self.D + 3 * self.Di + self.C + self.H

    def __call__(self, h: torch.Tensor, T: int, slots: list[int], conv: torch.Tensor, ssm: torch.Tensor,
                 verify_scratch=None) -> torch.Tensor:
        """h (S*T, D) float32 contiguous; slots: each sequence's state slot in conv (num_slots, C, K-1) and
        ssm (num_slots, H, P, N); verify_scratch: None (decode steps, T = 1) or the layer's (conv, cum, dtx,
        B) scratch of model_shards/cache.py -> (S*T, D)."""
        S = len(slots)
        if not (0 <= min(slots) and max(slots) < conv.shape[0]):
            raise IndexError(f"mamba block: slots {slots} outside the cache's {conv.shape[0]}")
        out = torch.empty(h.shape[0], self.D)
        scratch = torch.empty(h.shape[0] * self.scratch_per_row)
        if verify_scratch is None:
            verify = (None, None, None, None, 0)
        else:
            verify = (*(t.data_ptr() for t in verify_scratch), verify_scratch[1].shape[2])
        self.lib.mamba_block_f32(S, T, *self.head, (_i64 * S)(*slots), h.data_ptr(), *self.norm, conv.data_ptr(),
                                 ssm.data_ptr(), *self.params, *verify, out.data_ptr(), scratch.data_ptr())
        return out


def prepare_mamba(norm_w, norm_eps: float, in_proj, conv_w, conv_b, A, D, dt_bias, dt_limit, gnorm_w,
                  group_size: int, gnorm_eps: float, out_proj, cache_shapes) -> MambaBlock | None:
    """conv_w (C, K); A = -exp(A_log), D, dt_bias (H,) float32; cache_shapes: conv (num_slots, C, K-1)'s and
    ssm (num_slots, H, P, N)'s shapes. None where the fused path does not apply."""
    lib = native.library()
    tensors = (norm_w, conv_w, conv_b, A, D, dt_bias, gnorm_w)
    if lib is None or not all(t is None or _plain(t) for t in tensors):
        return None
    bits = _packed(in_proj, out_proj)
    if bits is None:
        return None
    (_, C, W), (_, H, P, N) = cache_shapes
    Di, dm = out_proj.shape[1], norm_w.shape[0]
    G = (C - H * P) // (2 * N)
    if not (conv_w.shape == (C, W + 1) and Di == H * P and G >= 1 and H % G == 0
            and in_proj.shape == (Di + C + H, dm) and Di % group_size == 0):
        return None
    _signatures(lib)
    return MambaBlock(lib, tensors, bits, (dm, Di, C, W + 1, H, P, N, G), norm_eps, dt_limit, group_size,
                      gnorm_eps)


class AttentionBlock:
    """h + Attention(rms_norm(h)) for short chunks (model_shards/attention.py, up to MAX_ROWS rows)."""

    def __init__(self, lib, norm_w, norm_eps, bits, H, Hkv, Dh):
        self.lib, self.norm_w, self.bits = lib, norm_w, bits
        self.D, self.H, self.Hkv, self.Dh = norm_w.shape[0], H, Hkv, Dh
        self.weights = (norm_w.data_ptr(), norm_eps, *(b.data_ptr() for b in bits))
        self.scale = 1.0 / math.sqrt(Dh)
        self.scratch_per_row = self.D + 2 * H * Dh + 2 * Hkv * Dh

    def __call__(self, h: torch.Tensor, chunks, k_cache: torch.Tensor, v_cache: torch.Tensor) -> torch.Tensor:
        """h (T, D) float32 contiguous; chunks: `attention_chunks(...)` of the pass -> (T, D)."""
        T = h.shape[0]
        S, rows0, lens, starts, tables, _ = chunks
        out = torch.empty(T, self.D)
        scratch = torch.empty(T * self.scratch_per_row)
        rc = self.lib.attention_block_f32(S, T, self.D, self.H, self.Hkv, self.Dh, k_cache.shape[1], rows0, lens,
                                          starts, tables, h.data_ptr(), *self.weights, k_cache.data_ptr(),
                                          v_cache.data_ptr(), self.scale, out.data_ptr(), scratch.data_ptr())
        if rc != 0:
            raise MemoryError("attention block: out of memory for the scores")
        return out


def attention_chunks(rows0: list[int], lens: list[int], starts: list[int], block_tables, block_size: int):
    """The ctypes arrays of a pass's chunks (made once per pass, shared by its attention blocks), after the
    checks paged attention makes; the block tables are kept alive with them. None for tables the kernel
    cannot read as they are (not int64, not contiguous)."""
    if not all(t.dtype is torch.int64 and t.is_contiguous() and t.is_cpu for t in block_tables):
        return None
    for t, row, n, start in zip(block_tables, rows0, lens, starts):
        if not (start >= 0 and n >= 1 and start + n <= t.shape[0] * block_size and row >= 0):
            raise IndexError(f"attention block: positions {start}..{start + n - 1} outside {t.shape[0]} "
                             f"blocks of {block_size}")
    S = len(rows0)
    return (S, (_i64 * S)(*rows0), (_i64 * S)(*lens), (_i64 * S)(*starts),
            (_ptr * S)(*[t.data_ptr() for t in block_tables]), list(block_tables))


def prepare_attention(norm_w, norm_eps: float, wq, wk, wv, wo, H: int, Hkv: int, Dh: int) -> AttentionBlock | None:
    """wq (H*Dh, D), wk and wv (Hkv*Dh, D), wo (D, H*Dh). None where the fused path does not apply."""
    lib = native.library()
    if lib is None or not _plain(norm_w) or H % Hkv:
        return None
    bits = _packed(wq, wk, wv, wo)
    if bits is None:
        return None
    _signatures(lib)
    return AttentionBlock(lib, norm_w, norm_eps, bits, H, Hkv, Dh)
