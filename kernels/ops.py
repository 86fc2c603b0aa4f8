"""The hot ops, one import site for the model.

Each op has a plain-torch reference in reference/ (readable, the definition) and, where it pays, a fast
path: fast/ holds CPU versions that issue a fixed handful of ops (decode is dispatch-bound on a CPU).
The decode-path ops also have Triton kernels (triton/), which take over for CUDA tensors.
tests/unit/kernels checks every fast path and every Triton kernel against its reference.

Dispatch (docs/KERNELS.md), per call, for the ops in _FAST below:
    HYBRIDSERVE_KERNELS unset or "auto": CUDA tensor -> Triton kernel (the fast path if triton is not
        importable); anything else -> the CPU fast path
    "triton": the Triton kernel whatever the device (CPU tensors need TRITON_INTERPRET=1 set before
        kernels.triton is first imported: the interpreter)
    "fast": the fast path; "reference": the plain-torch reference (per-sequence loops for the batched
        ops; ssd_verify / ssd_state_at / ssd_advance_, whose contract only the fast path defines, use it)
The variable is read at every call (tests set it), the other ops (no Triton kernel yet: linear, the
router, the chunked scan, sampling) are bound directly, with no dispatch at all.
"""
from __future__ import annotations

import os

import torch

from .fast import attention as _fast_attn
from .fast import conv1d as _fast_conv
from .fast import norm as _fast_norm
from .fast import ssd as _fast_ssd
from .fast import moe as _fast_moe
from .fast import native as _native
from .fast.linear import linear  # noqa: F401
from .reference import attention as _ref_attn
from .reference import conv1d as _ref_conv
from .reference import moe as _ref_moe
from .reference import norm as _ref_norm
from .reference import sampling as _ref_sampling
from .reference import ssd as _ref_ssd
from .reference.moe import route  # noqa: F401
from .reference.sampling import probs_from_logits, rejection_sample  # noqa: F401
from .reference.ssd import ssd_chunk_scan  # noqa: F401

ENV = "HYBRIDSERVE_KERNELS"
CHOICES = ("auto", "triton", "fast", "reference")

# The variable's value, None when unset. os.environ.get costs ~0.5 us (it encodes the key, then
# decodes the value); CPython keeps os.environ's contents in a dict of encoded keys that assignments
# to os.environ (and pytest's monkeypatch.setenv) update, where the usual miss costs ~15 ns. A CPU
# decode pass makes ~100 dispatched calls.
try:
    _ENV_DATA, _ENV_KEY, _decode = os.environ._data, os.environ.encodekey(ENV), os.environ.decodevalue

    def _forced():
        v = _ENV_DATA.get(_ENV_KEY)
        return None if v is None else _decode(v)
except AttributeError:                                 # another Python: the public way
    def _forced():
        return os.environ.get(ENV)


_TRITON: dict | None = None
_TRITON_ERROR: Exception | None = None


def _triton_ops() -> dict:
    """kernels.triton's ops by name, imported on first use ({} if triton cannot be imported)."""
    global _TRITON, _TRITON_ERROR
    if _TRITON is None:
        try:
            from . import triton as _tk
            _TRITON = _tk.OPS
        except ImportError as e:
            _TRITON, _TRITON_ERROR = {}, e
    return _TRITON


def _pick(name: str, t: torch.Tensor):
    """The implementation of op `name` for a call whose main tensor is t."""
    forced = _forced()
    if forced is None:
        return _triton_ops().get(name, _FAST[name]) if t.is_cuda else _FAST[name]
    return _choose(name, t, forced)


def _choose(name: str, t: torch.Tensor, forced: str):
    if forced == "fast":
        return _FAST[name]
    if forced == "reference":
        return _REFERENCE[name]
    if forced == "auto" or forced == "":
        return _triton_ops().get(name, _FAST[name]) if t.is_cuda else _FAST[name]
    if forced == "triton":
        ops = _triton_ops()
        if name not in ops:
            raise RuntimeError(f"{ENV}=triton, but the Triton kernels cannot be imported: {_TRITON_ERROR!r}")
        if not t.is_cuda:
            from .triton import INTERPRET
            if not INTERPRET:
                raise RuntimeError(f"{ENV}=triton on a {t.device} tensor needs Triton's interpreter: set "
                                   "TRITON_INTERPRET=1 before kernels.triton is first imported")
        return ops[name]
    raise ValueError(f"{ENV}={forced!r}: expected one of {', '.join(CHOICES)}")


# ---- the dispatched ops: the fast paths' signatures -------------------------------------------------

def rms_norm(x, weight, eps):
    return _pick("rms_norm", x)(x, weight, eps)


def gated_rms_norm(x, z, weight, *, group_size, eps):
    return _pick("gated_rms_norm", x)(x, z, weight, group_size=group_size, eps=eps)


def conv_step(x, states, weight, bias, *, activation=True):
    return _pick("conv_step", x)(x, states, weight, bias, activation=activation)


def conv_step_(states, x, weight, bias, *, activation=True):
    return _pick("conv_step_", x)(states, x, weight, bias, activation=activation)


def causal_conv1d_update(x, state, weight, bias, *, activation=True):
    return _pick("causal_conv1d_update", x)(x, state, weight, bias, activation=activation)


def causal_conv1d(x, weight, bias, initial_state=None, *, activation=True):
    return _pick("causal_conv1d", x)(x, weight, bias, initial_state, activation=activation)


def causal_conv1d_varlen(x, weight, bias, cu_seqlens, initial_states=None, *, activation=True, max_seqlen=None):
    return _pick("causal_conv1d_varlen", x)(x, weight, bias, cu_seqlens, initial_states, activation=activation,
                                            max_seqlen=max_seqlen)


def prefill_conv_batched(x) -> bool:
    """Whether causal_conv1d_varlen runs its Triton kernel for x: the model then convolves all its prompt
    chunks in one call. Otherwise it loops causal_conv1d per sequence (the CPU path: the varlen reference
    is that same loop plus a gather and a scatter of the windows)."""
    return _pick("causal_conv1d_varlen", x) is not _FAST["causal_conv1d_varlen"]   # (no triton import on a CPU)


def ssd_step(state, x, dt, A, B, C, D, dt_bias, *, dt_limit=(0.0, float("inf"))):
    return _pick("ssd_step", x)(state, x, dt, A, B, C, D, dt_bias, dt_limit=dt_limit)


def ssd_update_(state, x, dt, A, B, C, D, dt_bias, *, dt_limit=(0.0, float("inf")), live=None):
    return _pick("ssd_update_", x)(state, x, dt, A, B, C, D, dt_bias, dt_limit=dt_limit, live=live)


def mamba_decode_(conv, ssm, slots, rows, xbc, dt, conv_w, conv_b, A, D, dt_bias, y, *,
                  dt_limit=(0.0, float("inf"))) -> bool:
    """The fused Mamba decode step (conv_step_ then ssd_update_ in one C call, kernels/fast/native.py) for
    the sequences at `rows`, whose states are in `slots`; it takes CPU float32 calls when the kernels are
    "auto" or "fast". Returns False when it did not take the call: the caller runs the two ops."""
    forced = _forced()
    if xbc.is_cuda or forced not in (None, "", "auto", "fast"):
        return False
    return _native.mamba_decode_(conv, ssm, slots, rows, xbc, dt, conv_w, conv_b, A, D, dt_bias, y,
                                 dt_limit=dt_limit)


def mamba_verify_(conv, ssm, scratch, slots, rows0, T, xbc, dt, conv_w, conv_b, A, D, dt_bias, y, *,
                  dt_limit=(0.0, float("inf"))) -> bool:
    """The fused verification of T positions per sequence (causal_conv1d_update, ssd_verify and the scratch
    a commit needs, in one C call, kernels/fast/native.py); the same terms as mamba_decode_."""
    forced = _forced()
    if xbc.is_cuda or forced not in (None, "", "auto", "fast"):
        return False
    return _native.mamba_verify_(conv, ssm, scratch, slots, rows0, T, xbc, dt, conv_w, conv_b, A, D, dt_bias, y,
                                 dt_limit=dt_limit)


def mamba_commit_(conv, ssm, scratch, slots, indices) -> bool:
    """The commit of verified Mamba states of several sequences, every layer, in one C call
    (kernels/fast/native.py) when the kernels are "auto" or "fast" on a CPU; False when it did not take
    the call (the caller runs ssd_advance_ per sequence)."""
    forced = _forced()
    if ssm.is_cuda or forced not in (None, "", "auto", "fast"):
        return False
    return _native.mamba_commit_(conv, ssm, scratch, slots, indices)


def router_topk(x, router_weight, correction_bias, *, top_k: int, normalize: bool, scaling: float):
    """The router's logits x @ router_weight^T (in float32), then `route`: one C call for float32 on a CPU
    (kernels/fast/native/moe.c) when the kernels are "auto" or "fast", else the two steps in torch."""
    forced = _forced()
    if not x.is_cuda and forced in (None, "", "auto", "fast"):
        out = _native.moe_route(x, router_weight, correction_bias, top_k, normalize, scaling)
        if out is not None:
            return out
    logits = x.float() @ router_weight.float().t()
    return route(logits, correction_bias, top_k=top_k, normalize=normalize, scaling=scaling)


def ssd_verify(state, x, dt, A, B, C, D, dt_bias, *, dt_limit=(0.0, float("inf"))):
    return _pick("ssd_verify", x)(state, x, dt, A, B, C, D, dt_bias, dt_limit=dt_limit)


def ssd_state_at(state, cum, dtx, B, index):
    return _pick("ssd_state_at", dtx)(state, cum, dtx, B, index)


def ssd_advance_(state, cum, dtx, B, index):
    return _pick("ssd_advance_", state)(state, cum, dtx, B, index)


def write_kv(k_cache, v_cache, k, v, block_table, start_pos):
    return _pick("write_kv", k)(k_cache, v_cache, k, v, block_table, start_pos)


def paged_attention(q, k_cache, v_cache, block_table, *, start_pos):
    return _pick("paged_attention", q)(q, k_cache, v_cache, block_table, start_pos=start_pos)


def paged_attention_(q, k, v, k_cache, v_cache, rows0, lens, starts, block_tables, out) -> bool:
    """Short chunks of several sequences (decode steps, verification, MTP catch-ups: rows rows0[s].. of the
    pass, lens[s] of them, at positions starts[s]..), k/v written and attended, in one C call
    (kernels/fast/native.py) when the kernels are "auto" or "fast" on a CPU; False when it did not take
    the call (write_kv with decode_attention, paged_attention or prefill_attention then serve)."""
    forced = _forced()
    if q.is_cuda or forced not in (None, "", "auto", "fast"):
        return False
    return _native.paged_attention_(q, k, v, k_cache, v_cache, rows0, lens, starts, block_tables, out)


def decode_attention(q, k, v, k_cache, v_cache, block_tables, positions):
    return _pick("decode_attention", q)(q, k, v, k_cache, v_cache, block_tables, positions)


def grouped_experts(x, topk_weights, topk_ids, up, down, *, first_expert=0):
    return _pick("grouped_experts", x)(x, topk_weights, topk_ids, up, down, first_expert=first_expert)


def prefill_attention(q, k_cache, v_cache, block_tables, start_positions, cu_seqlens, *, max_seqlen=None):
    return _pick("prefill_attention", q)(q, k_cache, v_cache, block_tables, start_positions, cu_seqlens,
                                         max_seqlen=max_seqlen)


def verify_greedy(target, draft_tokens, num_drafts):
    return _pick("verify_greedy", target)(target, draft_tokens, num_drafts)


def verify_random(target_probs, draft_probs, draft_tokens, num_drafts, uniforms):
    return _pick("verify_random", target_probs)(target_probs, draft_probs, draft_tokens, num_drafts, uniforms)


def ssd_chunk_scan_varlen(x, dt, A, B, C, D, dt_bias, *, cu_seqlens, chunk_size, initial_states=None,
                          dt_limit=(0.0, float("inf"))):
    return _pick("ssd_chunk_scan_varlen", x)(x, dt, A, B, C, D, dt_bias, cu_seqlens=cu_seqlens,
                                             chunk_size=chunk_size, initial_states=initial_states,
                                             dt_limit=dt_limit)


# ---- HYBRIDSERVE_KERNELS=reference: the references, looped over the sequences of a batched op ---------

def _ref_decode_attention(q, k, v, k_cache, v_cache, block_tables, positions):
    outs = []
    for i, (table, pos) in enumerate(zip(block_tables, positions)):
        _ref_attn.write_kv(k_cache, v_cache, k[i:i + 1], v[i:i + 1], table, pos)
        outs.append(_ref_attn.paged_attention(q[i:i + 1], k_cache, v_cache, table, start_pos=pos))
    return torch.cat(outs)


def _ints(x) -> list[int]:
    return x.tolist() if torch.is_tensor(x) else list(x)


def _fast_prefill_attention(q, k_cache, v_cache, block_tables, start_positions, cu_seqlens, *, max_seqlen=None):
    """Several sequences' short chunks batched (verification, MTP catch-up); otherwise per sequence."""
    if len(start_positions) > 1 and (max_seqlen or 0) <= _fast_attn.SMALL_T and torch.is_tensor(block_tables):
        cu, starts = _ints(cu_seqlens), _ints(start_positions)
        lengths = [b - a for a, b in zip(cu, cu[1:])]
        if 0 < max(lengths) <= _fast_attn.SMALL_T:
            return _fast_attn.short_chunks_attention(q, k_cache, v_cache, block_tables, starts, lengths)
    return _ref_attn.varlen_loop(_fast_attn.paged_attention, q, k_cache, v_cache, block_tables, start_positions,
                                 cu_seqlens)


def _ref_conv_update(x, state, weight, bias, *, activation=True):
    S, T, Cdim = x.shape
    zeros = x.new_zeros(Cdim, weight.shape[1] - 1)
    outs = [_ref_conv.causal_conv1d_update(x[s], zeros if state is None else state[s], weight, bias,
                                           activation=activation) for s in range(S)]
    return torch.stack([y for y, _ in outs]), torch.stack([st for _, st in outs])


def _ref_conv_step_(states, x, weight, bias, *, activation=True):
    y, new = _ref_conv_update(x[:, None], states, weight, bias, activation=activation)
    states.copy_(new[:, 0])
    return y[:, 0]


def _ref_conv_step(x, states, weight, bias, *, activation=True):
    new = states.clone()
    return _ref_conv_step_(new, x, weight, bias, activation=activation), new


def _ref_ssd_update_(state, x, dt, A, B, C, D, dt_bias, *, dt_limit=(0.0, float("inf")), live=None):
    S, H, P = x.shape
    R = H // B.shape[1]
    ys = []
    for s in range(S):
        if live is None or bool(live[s]):
            y, states = _ref_ssd.ssd_state_update(state[s], x[s:s + 1], dt[s:s + 1], A, B[s:s + 1], C[s:s + 1],
                                                  D, dt_bias, dt_limit=dt_limit)
            state[s] = states[0]
        else:                                          # a dead row keeps its state; y as with dt = 0
            Ch = C[s].float().repeat_interleave(R, dim=0)
            y = (torch.einsum("hpn,hn->hp", state[s], Ch) + D.float()[:, None] * x[s].float())[None].to(x.dtype)
        ys.append(y)
    return torch.cat(ys)


def _ref_ssd_step(state, x, dt, A, B, C, D, dt_bias, *, dt_limit=(0.0, float("inf"))):
    S, H, P = x.shape
    new = x.new_zeros(S, H, P, B.shape[2], dtype=torch.float32) if state is None else state.float().clone()
    return _ref_ssd_update_(new, x, dt, A, B, C, D, dt_bias, dt_limit=dt_limit), new


_FAST = {
    "rms_norm": _fast_norm.rms_norm,
    "gated_rms_norm": _fast_norm.gated_rms_norm,
    "conv_step": _fast_conv.conv_step,
    "conv_step_": _fast_conv.conv_step_,
    "causal_conv1d_update": _fast_conv.causal_conv1d_update,
    "causal_conv1d": _ref_conv.causal_conv1d,           # prefill: no CPU fast path, the reference
    "causal_conv1d_varlen": _ref_conv.causal_conv1d_varlen,
    "ssd_step": _fast_ssd.ssd_step,
    "ssd_update_": _fast_ssd.ssd_update_,
    "ssd_verify": _fast_ssd.ssd_verify,
    "ssd_state_at": _fast_ssd.ssd_state_at,
    "ssd_advance_": _fast_ssd.ssd_advance_,
    "write_kv": _fast_attn.write_kv,
    "paged_attention": _fast_attn.paged_attention,
    "decode_attention": _fast_attn.decode_attention,
    "grouped_experts": _fast_moe.grouped_experts,
    "prefill_attention": _fast_prefill_attention,      # the fast per-sequence paged_attention, looped
    "verify_greedy": _ref_sampling.verify_greedy,       # batched torch already: the reference
    "verify_random": _ref_sampling.verify_random,
    "ssd_chunk_scan_varlen": _ref_ssd.ssd_chunk_scan_varlen,  # prefill: no CPU fast path, the reference
}
_REFERENCE = {
    **_FAST,                                           # ssd_verify, ssd_state_at, ssd_advance_: the definition
    "rms_norm": _ref_norm.rms_norm,
    "gated_rms_norm": _ref_norm.gated_rms_norm,
    "conv_step": _ref_conv_step,
    "conv_step_": _ref_conv_step_,
    "causal_conv1d_update": _ref_conv_update,
    "ssd_step": _ref_ssd_step,
    "ssd_update_": _ref_ssd_update_,
    "write_kv": _ref_attn.write_kv,
    "paged_attention": _ref_attn.paged_attention,
    "decode_attention": _ref_decode_attention,
    "grouped_experts": _ref_moe.grouped_experts,
    "prefill_attention": _ref_attn.prefill_attention,
    "ssd_chunk_scan_varlen": _ref_ssd.ssd_chunk_scan_varlen,
}
