"""Fused CPU kernels in plain C (kernels/fast/native/*.c), built on first use with the machine's C compiler
and called through ctypes.

Why C and not more torch ops: a CPU decode step is bound by dispatch, not arithmetic (docs/KERNELS.md);
the Mamba decode step alone was ~30 torch ops and three passes over the SSM states per layer. Why not a
torch C++ extension: the torch headers take a minute to compile on a small machine, where this file
compiles in well under a second; it needs no headers but libc's. Built with -O3 -march=native for the
machine it runs on, into a cache keyed by the source, the flags and the CPU's feature flags
(HYBRIDSERVE_CACHE, else ~/.cache/hybridserve; a temporary folder when neither is writable).

`HYBRIDSERVE_NATIVE=0` turns them off (the torch fast path runs instead), as does any failure to build or
load (no compiler, read-only disk): logged once, never an error. tests/unit/kernels/test_native_mamba.py
checks every kernel against the reference ops.
"""
from __future__ import annotations

import ctypes
import hashlib
import logging
import math
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch

log = logging.getLogger("hybridserve.kernels")

ENV = "HYBRIDSERVE_NATIVE"
SOURCES = tuple(Path(__file__).with_name("native") / f
                for f in ("mamba.c", "linear.c", "norm.c", "moe.c", "attention.c", "blocks.c"))
HEADERS = (Path(__file__).with_name("native") / "bf16.h",)
# -ffast-math lets the SiLU's expf vectorize (glibc's libmvec needs finite math) and the dot products
# reassociate; so the kernel is never handed an infinity (an unbounded dt limit goes in as FLT_MAX). It is
# given to the compile step only: linked with it, the library would set flush-to-zero for the whole
# process on load (crtfastmath), and every subnormal float in torch and numpy would read as 0.
COMPILE_FLAGS = ("-O3", "-march=native", "-fopenmp-simd", "-ffast-math", "-fPIC", "-c")
LINK_FLAGS = ("-shared",)
FLT_MAX = 3.4028234663852886e38

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_tried = False
_why_not: str | None = None

_i64, _f32, _ptr = ctypes.c_int64, ctypes.c_float, ctypes.c_void_p
_SIGNATURE = ([_i64] * 7 + [_ptr, _ptr] + [_ptr, _i64, _ptr, _i64] + [_ptr] * 7 + [_f32, _f32, ctypes.c_int]
              + [_ptr, _i64])
_VERIFY_SIGNATURE = [_i64] + _SIGNATURE + [_ptr] * 4 + [_i64]


# Read once (a decode step makes ~50 calls here; os.environ.get costs ~0.5 us): set it before the first
# import, or set this attribute.
ENABLED = os.environ.get(ENV, "1") not in ("0", "false", "no", "off")


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor()


def _cache_dir() -> Path:
    for base in (os.environ.get("HYBRIDSERVE_CACHE"), Path.home() / ".cache" / "hybridserve"):
        if base:
            d = Path(base) / "native"
            try:
                d.mkdir(parents=True, exist_ok=True)
                if os.access(d, os.W_OK):
                    return d
            except OSError:
                continue
    return Path(tempfile.gettempdir()) / f"hybridserve-native-{os.getuid()}"


def _run(cmd: list[str], cc: str) -> None:
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    if r.returncode != 0:
        raise RuntimeError(f"{cc} failed: {r.stderr.strip()[:500]}")


def _build() -> ctypes.CDLL:
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not cc:
        raise RuntimeError("no C compiler (cc, gcc, or $CC)")
    src = b"".join(p.read_bytes() for p in SOURCES + HEADERS)
    key = hashlib.sha256(src + " ".join((cc, *COMPILE_FLAGS, *LINK_FLAGS, platform.machine(), _cpu_flags())).encode()
                         ).hexdigest()[:16]
    d = _cache_dir()
    d.mkdir(parents=True, exist_ok=True)
    so = d / f"kernels-{key}.so"
    if not so.exists():
        build = Path(tempfile.mkdtemp(prefix="build-", dir=d))
        try:
            objects = []
            for source in SOURCES:
                obj = build / f"{source.stem}.o"
                _run([cc, *COMPILE_FLAGS, "-o", str(obj), str(source)], cc)
                objects.append(str(obj))
            _run([cc, *LINK_FLAGS, "-o", str(build / "lib.so"), *objects, "-lm"], cc)
            os.replace(build / "lib.so", so)        # atomic: a concurrent builder's copy is as good
        finally:
            shutil.rmtree(build, ignore_errors=True)
        log.info("native kernels: built %s", so)
    lib = ctypes.CDLL(str(so))
    lib.mamba_decode_f32.argtypes = _SIGNATURE
    lib.mamba_decode_f32.restype = None
    lib.mamba_verify_f32.argtypes = _VERIFY_SIGNATURE
    lib.mamba_verify_f32.restype = None
    lib.mamba_commit_f32.argtypes = [_i64] * 10 + [_ptr] * 8
    lib.mamba_commit_f32.restype = None
    lib.linear_bf16p_f32.argtypes = [_i64, _i64, _i64, _ptr, _i64, _ptr, _ptr, _i64]
    lib.linear_bf16p_f32.restype = None
    lib.rms_norm_f32.argtypes = [_i64, _i64, _ptr, _i64, _ptr, _f32, _ptr]
    lib.rms_norm_f32.restype = None
    lib.gated_rms_norm_f32.argtypes = [_i64, _i64, _i64, _ptr, _i64, _ptr, _i64, _ptr, _f32, _ptr]
    lib.gated_rms_norm_f32.restype = None
    lib.moe_route_f32.argtypes = [_i64, _i64, _i64, _ptr, _i64, _ptr, _ptr, _i64, ctypes.c_int, _f32, _ptr, _ptr]
    lib.moe_route_f32.restype = None
    lib.moe_experts_bf16w_f32.argtypes = [_i64] * 6 + [_ptr, _i64, _ptr, _ptr, _ptr, _ptr, _ptr]
    lib.moe_experts_bf16w_f32.restype = None
    lib.paged_attention_f32.argtypes = [_i64] * 5 + [_ptr] * 4 + [_ptr, _i64, _ptr, _i64, _ptr, _i64, _ptr, _ptr,
                                                                 _f32, _ptr, _i64]
    lib.paged_attention_f32.restype = ctypes.c_int
    return lib


def library() -> ctypes.CDLL | None:
    """The built kernels, or None (turned off, or they could not be built: `why_not()` says why)."""
    global _lib, _tried, _why_not
    if _lib is not None:
        return _lib if ENABLED else None
    if not ENABLED or _tried:
        return None
    with _lock:
        if not _tried:
            try:
                _lib = _build()
            except Exception as e:  # noqa: BLE001 - the torch path serves instead
                _why_not = f"{type(e).__name__}: {e}"
                log.warning("native kernels unavailable (%s); using the torch fast path", _why_not)
            _tried = True
    return _lib


def why_not() -> str | None:
    return _why_not


def _f32_on_cpu(*ts) -> bool:
    return all(t.dtype is torch.float32 and t.is_cpu for t in ts)


def _layout(conv, ssm, xbc, dt, conv_w, conv_b, A, D, dt_bias, y) -> tuple[int, int, int, int, int, int] | None:
    """(C, K, H, P, N, G) when the kernels can read these tensors as they are; None otherwise."""
    if not _f32_on_cpu(conv, ssm, xbc, dt, conv_w, A, D, dt_bias, y):
        return None
    if torch.is_grad_enabled() and any(t.requires_grad for t in (xbc, dt, conv_w, A, D, dt_bias)):
        return None                                    # autograd needs the torch ops
    if conv_b is not None and not (conv_b.dtype == torch.float32 and conv_b.is_contiguous()):
        return None
    if not (conv.is_contiguous() and ssm.is_contiguous() and conv_w.is_contiguous() and xbc.stride(1) == 1
            and dt.stride(1) == 1 and y.stride(1) == 1 and A.is_contiguous() and D.is_contiguous()
            and dt_bias.is_contiguous()):
        return None
    _, C, W = conv.shape
    _, H, P, N = ssm.shape
    G = (C - H * P) // (2 * N)
    if xbc.shape[1] != C or y.shape[1] != H * P or conv_w.shape != (C, W + 1) or G < 1 or H % G:
        return None
    return C, W + 1, H, P, N, G


def _check(slots, rows, last_row, num_slots, what):
    if not (0 <= min(slots) and max(slots) < num_slots and 0 <= min(rows) and max(rows) <= last_row):
        raise IndexError(f"{what}: slots {slots} / rows {rows} outside the cache or the pass")


def mamba_decode_(conv, ssm, slots: list[int], rows: list[int], xbc, dt, conv_w, conv_b, A, D, dt_bias, y, *,
                  dt_limit=(0.0, float("inf"))) -> bool:
    """One decode position for the sequences at `rows` of the pass, whose states live in `slots`: the conv
    step and the SSD update in place on conv (num_slots, C, K-1) and ssm (num_slots, H, P, N), outputs into
    y (T, H*P) at those rows. xbc (T, C) and dt (T, H) may be strided views (rows of the in_proj output).
    conv_w (C, K); conv_b (C,) or None; A, D, dt_bias (H,) float32. Returns False, having done nothing,
    when the kernel cannot take the call (not built, not float32 on a CPU, a layout it does not read);
    the caller then runs the torch ops."""
    lib = library()
    shape = None if lib is None or not rows else _layout(conv, ssm, xbc, dt, conv_w, conv_b, A, D, dt_bias, y)
    if shape is None:
        return False
    C, K, H, P, N, G = shape
    _check(slots, rows, min(xbc.shape[0], dt.shape[0], y.shape[0]) - 1, conv.shape[0], "mamba_decode_")
    S = len(rows)
    lo, hi = dt_limit
    lib.mamba_decode_f32(S, C, K, H, P, N, G, (_i64 * S)(*rows), (_i64 * S)(*slots), xbc.data_ptr(),
                         xbc.stride(0), dt.data_ptr(), dt.stride(0), conv.data_ptr(), ssm.data_ptr(),
                         conv_w.data_ptr(), None if conv_b is None else conv_b.data_ptr(), A.data_ptr(),
                         D.data_ptr(), dt_bias.data_ptr(), float(lo), min(float(hi), FLT_MAX),
                         int(lo > 0.0 or hi != float("inf")), y.data_ptr(), y.stride(0))
    return True


def mamba_verify_(conv, ssm, scratch, slots: list[int], rows0: list[int], T: int, xbc, dt, conv_w, conv_b, A, D,
                  dt_bias, y, *, dt_limit=(0.0, float("inf"))) -> bool:
    """T positions of each sequence (rows rows0[s] .. rows0[s]+T-1 of the pass, states in slots[s]) under
    verification: outputs into y at those rows, the slots' states untouched, and in `scratch` = the
    layer's (conv (num_slots, Tmax, C, K-1), cum (num_slots, H, Tmax), dtx (num_slots, H, Tmax, P),
    B (num_slots, Tmax, G, N)) what the commit needs (model_shards/cache.py). What kernels/fast/ssd.py
    ssd_verify and conv1d.causal_conv1d_update compute, in one C call. False: not taken (see mamba_decode_)."""
    lib = library()
    shape = None if lib is None or not rows0 else _layout(conv, ssm, xbc, dt, conv_w, conv_b, A, D, dt_bias, y)
    if shape is None:
        return False
    C, K, H, P, N, G = shape
    s_conv, s_cum, s_dtx, s_B = scratch
    Tmax = s_cum.shape[2]
    if not (T <= Tmax and all(t.dtype == torch.float32 and t.is_contiguous() for t in scratch)):
        return False
    _check(slots, rows0, min(xbc.shape[0], dt.shape[0], y.shape[0]) - T, conv.shape[0], "mamba_verify_")
    S = len(rows0)
    lo, hi = dt_limit
    lib.mamba_verify_f32(S, T, C, K, H, P, N, G, (_i64 * S)(*rows0), (_i64 * S)(*slots), xbc.data_ptr(),
                         xbc.stride(0), dt.data_ptr(), dt.stride(0), conv.data_ptr(), ssm.data_ptr(),
                         conv_w.data_ptr(), None if conv_b is None else conv_b.data_ptr(), A.data_ptr(),
                         D.data_ptr(), dt_bias.data_ptr(), float(lo), min(float(hi), FLT_MAX),
                         int(lo > 0.0 or hi != float("inf")), y.data_ptr(), y.stride(0), s_conv.data_ptr(),
                         s_cum.data_ptr(), s_dtx.data_ptr(), s_B.data_ptr(), Tmax)
    return True


def linear_bf16_packed(x, packed, out) -> None:
    """out (R, O) = x (R, I) @ W^T for W given packed (ceil(O/16), I, 16) as kernels/fast/linear.py's
    packed_bf16 makes it; O = out.shape[1]. x float32 with unit stride along I; out float32 with unit
    stride along O. The caller checks eligibility and that the library is built."""
    R, I = x.shape
    library().linear_bf16p_f32(R, out.shape[1], I, x.data_ptr(), x.stride(0), packed.data_ptr(), out.data_ptr(),
                               out.stride(0))


def _rows(t: torch.Tensor) -> torch.Tensor | None:
    """t (..., D) as (R, D) with unit stride along D, without a copy; None if that takes one."""
    if t.stride(-1) != 1:
        return None
    if t.dim() == 2:
        return t
    try:
        return t.view(-1, t.shape[-1])
    except RuntimeError:
        return None


def _norm_eligible(*ts) -> bool:
    return (library() is not None and _f32_on_cpu(*ts)
            and not (torch.is_grad_enabled() and any(t.requires_grad for t in ts)))


def rms_norm(x, weight, eps: float):
    """kernels/fast/norm.py rms_norm in one C call for float32 on a CPU; None where it does not apply."""
    x2 = _rows(x) if _norm_eligible(x, weight) and weight.is_contiguous() else None
    if x2 is None or x2.shape[0] == 0:
        return None
    out = torch.empty(x2.shape, dtype=torch.float32)
    library().rms_norm_f32(x2.shape[0], x2.shape[1], x2.data_ptr(), x2.stride(0), weight.data_ptr(), eps,
                           out.data_ptr())
    return out.view(x.shape)


def gated_rms_norm(x, z, weight, group_size: int, eps: float):
    """kernels/fast/norm.py gated_rms_norm in one C call for float32 on a CPU; None where it does not apply."""
    if not (_norm_eligible(x, z, weight) and weight.is_contiguous() and x.shape == z.shape
            and x.shape[-1] % group_size == 0):
        return None
    x2, z2 = _rows(x), _rows(z)
    if x2 is None or z2 is None or x2.shape[0] == 0:
        return None
    out = torch.empty(x2.shape, dtype=torch.float32)
    library().gated_rms_norm_f32(x2.shape[0], x2.shape[1], group_size, x2.data_ptr(), x2.stride(0), z2.data_ptr(),
                                 z2.stride(0), weight.data_ptr(), eps, out.data_ptr())
    return out.view(x.shape)


def moe_route(x, router_weight, bias, top_k: int, normalize: bool, scaling: float):
    """kernels/reference/moe.py route over router logits x @ router_weight^T, in one C call, for float32 on
    a CPU: (topk_weights float32 (T, k), topk_ids int64 (T, k)); None where it does not apply."""
    x2 = _rows(x) if _norm_eligible(x, router_weight) and router_weight.is_contiguous() else None
    if x2 is None or x2.shape[0] == 0:
        return None
    if bias is not None and not (bias.dtype is torch.float32 and bias.is_contiguous()):
        return None
    T, E = x2.shape[0], router_weight.shape[0]
    ids = torch.empty(T, top_k, dtype=torch.int64)
    weights = torch.empty(T, top_k, dtype=torch.float32)
    library().moe_route_f32(T, E, x2.shape[1], x2.data_ptr(), x2.stride(0), router_weight.data_ptr(),
                            None if bias is None else bias.data_ptr(), top_k, int(normalize), scaling,
                            ids.data_ptr(), weights.data_ptr())
    return weights, ids


def moe_experts(x, topk_weights, topk_ids, up_bits, down_bits, first_expert: int):
    """sum_k w_k down_e(relu(up_e x)^2) over this shard's chosen experts, with the experts' exact bfloat16
    bits up (E, I, D) and down (E, D, I) (kernels/fast/linear.py bf16_bits): (T, D) float32. The caller
    checks eligibility."""
    T, D = x.shape
    E, I = up_bits.shape[0], up_bits.shape[1]
    ids, w = topk_ids.contiguous(), topk_weights.float().contiguous()
    out = torch.empty(T, D, dtype=torch.float32)
    library().moe_experts_bf16w_f32(T, ids.shape[1], D, I, E, first_expert, x.data_ptr(), x.stride(0),
                                    ids.data_ptr(), w.data_ptr(), up_bits.data_ptr(), down_bits.data_ptr(),
                                    out.data_ptr())
    return out


def paged_attention_(q, k, v, k_cache, v_cache, rows0: list[int], lens: list[int], starts: list[int],
                     block_tables, out) -> bool:
    """Short chunks of several sequences (decode steps: lens 1; verification; MTP catch-ups): sequence s's
    rows rows0[s] .. rows0[s]+lens[s]-1 of the pass, at positions starts[s] ..; their k, v written into the
    paged cache, then causal attention into `out` at those rows, in one C call. q, out (T, H, Dh); k, v
    (T, H_kv, Dh) (each row contiguous); k_cache, v_cache (num_blocks, block_size, H_kv, Dh) contiguous;
    block_tables: int64 tensors. False (nothing done) where it does not apply."""
    lib = library()
    if lib is None or not rows0 or not _f32_on_cpu(q, k, v, k_cache, v_cache, out):
        return False
    T, H, Dh = q.shape
    nb, bs, hkv, _ = k_cache.shape
    if not (k_cache.is_contiguous() and v_cache.is_contiguous() and q.stride()[1:] == (Dh, 1)
            and out.stride()[1:] == (Dh, 1) and k.stride()[1:] == (Dh, 1) and v.stride()[1:] == (Dh, 1)
            and H % hkv == 0 and all(t.dtype is torch.int64 and t.is_contiguous() for t in block_tables)):
        return False
    for t, row, n, start in zip(block_tables, rows0, lens, starts):
        if not (start >= 0 and n >= 1 and start + n <= t.shape[0] * bs and 0 <= row and row + n <= T):
            raise IndexError(f"paged_attention_: positions {start}..{start + n - 1} (rows {row}..) outside "
                             f"{t.shape[0]} blocks of {bs} or the pass")
    S = len(rows0)
    tables = (_ptr * S)(*[t.data_ptr() for t in block_tables])
    rc = lib.paged_attention_f32(S, H, hkv, Dh, bs, (_i64 * S)(*rows0), (_i64 * S)(*lens), (_i64 * S)(*starts),
                                 tables, q.data_ptr(), q.stride(0), k.data_ptr(), k.stride(0), v.data_ptr(),
                                 v.stride(0), k_cache.data_ptr(), v_cache.data_ptr(), 1.0 / math.sqrt(Dh),
                                 out.data_ptr(), out.stride(0))
    if rc != 0:
        raise MemoryError("paged_attention_: out of memory for the scores")
    return True


def mamba_commit_(conv, ssm, scratch, slots: list[int], indices: list[int]) -> bool:
    """For each sequence, the state after its verified position indices[s] becomes slot slots[s]'s state, in
    every layer of the stack: conv (L, num_slots, C, K-1), ssm (L, num_slots, H, P, N) and the scratch
    (conv (L, num_slots, Tmax, C, K-1), cum (L, num_slots, H, Tmax), dtx (L, num_slots, H, Tmax, P),
    B (L, num_slots, Tmax, G, N)) of model_shards/cache.py, in one C call. False (nothing done) where it
    does not apply; the caller checked the indices."""
    lib = library()
    s_conv, s_cum, s_dtx, s_B = scratch
    if lib is None or not slots or not _f32_on_cpu(conv, ssm, *scratch):
        return False
    if not all(t.is_contiguous() for t in (conv, ssm, *scratch)):
        return False
    L, num_slots, C, W = conv.shape
    _, _, H, P, N = ssm.shape
    G, Tmax = s_B.shape[3], s_cum.shape[3]
    if not (0 <= min(slots) and max(slots) < num_slots and 0 <= min(indices) and max(indices) < Tmax):
        raise IndexError(f"mamba_commit_: slots {slots} / indices {indices} outside the cache")
    S = len(slots)
    lib.mamba_commit_f32(S, L, num_slots, C, W + 1, H, P, N, G, Tmax, (_i64 * S)(*slots), (_i64 * S)(*indices),
                         conv.data_ptr(), ssm.data_ptr(), s_conv.data_ptr(), s_cum.data_ptr(), s_dtx.data_ptr(),
                         s_B.data_ptr())
    return True
