"""A block as one C call when its rows are few (kernels/fast/blocks.py): the Block's fast path.

Which blocks, at up to MAX_ROWS rows: a latent-MoE block (its math does not depend on the batch layout:
decode steps, verification, MTP catch-ups alike); a Mamba block whose pass is decode steps (T = 1) and
verifications (T > 1), none its sequence's first: one call per length (rows gathered when the pass mixes
them); an attention block whose
chunks are all short (what one paged-attention call takes). Anything else, and any call the C
path cannot take (no compiler, HYBRIDSERVE_KERNELS other than auto/fast, autograd, weights that are not
exact bfloat16, a GPU tensor), runs the modules as written: the fused path computes the same numbers
(bit for bit), so it is purely a cost decision. HYBRIDSERVE_FUSED_BLOCKS=0 turns it off.

The prepared kernel arguments are kept on the Block and remade when a weight they were made from changes
(in place: its version counter; new storage: its pointer). A routed-experts module swapped for another
kind (expert parallelism) is seen at every call; a Parameter replaced by a new object after the first
pass is not (weights load before it; `forget(block)` drops what was prepared).
"""
from __future__ import annotations

import os

import torch

from kernels import ops
from kernels.fast import blocks as fused
from kernels.fast import linear as fast_linear
from kernels.fast import native

from .attention import FUSED_MAX_TOKENS
from .config import ATTENTION, MAMBA, MOE
from .moe import LatentMoE, RoutedExperts

ENABLED = os.environ.get("HYBRIDSERVE_FUSED_BLOCKS", "1") not in ("0", "false", "no", "off")
_NOT_FUSABLE = "not fusable"


def _fast_kernels() -> bool:
    return native.ENABLED and fast_linear.BF16_WEIGHTS and ops._forced() in (None, "", "auto", "fast")


def forward(block, h: torch.Tensor, batch, cache) -> torch.Tensor | None:
    """block(h, batch, cache) in one C call, or None (the caller runs the modules)."""
    if not (ENABLED and 0 < h.shape[0] <= fused.MAX_ROWS and h.dtype is torch.float32 and h.is_cpu
            and h.dim() == 2 and h.is_contiguous() and not torch.is_grad_enabled() and _fast_kernels()):
        return None
    kind = block.kind
    if kind == MOE:
        if type(block.mixer.experts) is not RoutedExperts:   # expert parallelism: experts in other processes
            return None
        call = _prepared(block, _moe_tensors, _prepare_moe)
        return None if call is None else call(h)
    if kind == MAMBA:
        groups = _mamba_layout(batch, h.shape[0])
        if groups is None or not _plain(cache.conv, cache.ssm):
            return None
        if any(T > 1 for T, _, _ in groups):                # verification: the commit's scratch too
            if not (_plain(*cache.scratch) and max(T for T, _, _ in groups) <= cache.scratch[1].shape[2]):
                return None
        call = _prepared(block, _mamba_tensors, lambda b: _prepare_mamba(b, cache.conv, cache.ssm))
        if call is None:
            return None
        if len(groups) == 1 and groups[0][2] is None:       # the whole pass is one layout, in order
            T, slots, _ = groups[0]
            return _mamba_call(call, h, T, slots, cache)
        out = torch.empty_like(h)
        for T, slots, rows in groups:                       # e.g. decode steps and a few verifications
            out.index_copy_(0, rows, _mamba_call(call, h.index_select(0, rows), T, slots, cache))
        return out
    if kind == ATTENTION:
        if not _plain(cache.k, cache.v):
            return None
        chunks = _attention_chunks(batch, h.shape[0], cache.k.shape[1])
        call = None if chunks is None else _prepared(block, _attention_tensors, _prepare_attention)
        return None if call is None else call(h, chunks, cache.k, cache.v)
    return None


def forget(block) -> None:
    """Drop the block's prepared call (made again on its next pass)."""
    block.__dict__.pop("_fused_call", None)


def _plain(*ts) -> bool:
    return all(t.dtype is torch.float32 and t.is_contiguous() for t in ts)


def _prepared(block, tensors_of, prepare):
    """The block's prepared call, remade when a weight changed (pointer or version); None when it cannot be
    fused. The weights are looked up again only then (attribute lookups through modules cost a decode step
    as much as the check)."""
    cached = block.__dict__.get("_fused_call")
    if cached is not None and fused.weights_key(cached[0]) == cached[1]:
        call = cached[2]
    else:
        tensors = tuple(t for t in tensors_of(block) if t is not None)
        with torch.no_grad():
            call = prepare(block)
        call = _NOT_FUSABLE if call is None else call
        block.__dict__["_fused_call"] = (tensors, fused.weights_key(tensors), call)
    return None if call is _NOT_FUSABLE else call


def _memo(batch, name: str, make):
    """make(batch), remembered on the batch: every block of the pass asks the same question."""
    memo = batch.__dict__.get(name)
    if memo is None:
        memo = make(batch)
        batch.__dict__[name] = _NOT_FUSABLE if memo is None else memo
    return None if memo is _NOT_FUSABLE else memo


def _mamba_call(call, h: torch.Tensor, T: int, slots: list[int], cache) -> torch.Tensor:
    out = call(h, T, slots, cache.conv, cache.ssm, cache.scratch if T > 1 else None)
    if T > 1:
        cache.mark_kept(slots, T)
    return out


def _mamba_layout(batch, rows: int):
    """[(T, slots, rows)]: the pass's sequences grouped by T, each group S sequences of T tokens, none its
    sequence's first: decode steps (T = 1) or verifications (T > 1, keep_states); rows (int64) of the pass
    each group's rows are, or None for one group in rows s*T... None when any sequence is neither (a
    prompt chunk). Each row's numbers do not depend on the rows beside it (the kernels compute rows
    independently), so a group of a mixed pass is the unfused path's, bit for bit."""
    def make(b):
        seqs = b.seqs
        if not seqs or sum(s.num_tokens for s in seqs) != rows:
            return None
        if not all(s.start_pos > 0 and s.keep_states == (s.num_tokens > 1) for s in seqs):
            return None
        T0 = seqs[0].num_tokens
        if all(s.num_tokens == T0 and s.offset == i * T0 for i, s in enumerate(seqs)):
            return [(T0, [s.mamba_slot for s in seqs], None)]
        groups: dict[int, list] = {}
        for s in seqs:
            groups.setdefault(s.num_tokens, []).append(s)
        return [(T, [s.mamba_slot for s in g],
                 torch.cat([torch.arange(s.offset, s.offset + T) for s in g]))
                for T, g in groups.items()]
    return _memo(batch, f"_fused_mamba_{rows}", make)


def _attention_chunks(batch, rows: int, block_size: int):
    """The pass's chunks as the attention block's arrays when every chunk is short (what the unfused path
    sends to one paged-attention call) and they cover the pass's rows; None otherwise."""
    def make(b):
        seqs = b.seqs
        if not seqs or any(s.num_tokens > FUSED_MAX_TOKENS for s in seqs) or sum(s.num_tokens for s in seqs) != rows:
            return None
        if any(s.offset < 0 or s.end > rows for s in seqs):
            return None
        return fused.attention_chunks([s.offset for s in seqs], [s.num_tokens for s in seqs],
                                      [s.start_pos for s in seqs], [s.block_table for s in seqs], block_size)
    return _memo(batch, f"_fused_attention_{rows}_{block_size}", make)


# ---- the modules' tensors (model_shards/moe.py, mamba.py, layers.py) --------------------------------------
def _moe_tensors(block):
    m = block.mixer
    lat = m.latent
    return (block.norm.weight, m.gate.weight, m.gate.e_score_correction_bias,
            m.fc1_latent_proj.weight if lat else None, m.fc2_latent_proj.weight if lat else None,
            m.experts.up, m.experts.down, m.shared_experts.up_proj.weight, m.shared_experts.down_proj.weight)


def _prepare_moe(block):
    m = block.mixer
    if type(m) is not LatentMoE:
        return None
    norm_w, router_w, bias, fc1, fc2, up, down, su, sd = _moe_tensors(block)
    g = m.gate
    return fused.prepare_moe(norm_w.detach(), block.norm.eps, router_w.detach(), bias, g.top_k, g.norm, g.scale,
                             fc1, fc2, up, down, su, sd, m.experts.first_expert)


def _mamba_tensors(block):
    m = block.mixer
    return (block.norm.weight, m.in_proj.weight, m.conv1d.weight, m.conv1d.bias, m.A_log, m.D, m.dt_bias,
            m.norm.weight, m.out_proj.weight)


def _attention_tensors(block):
    m = block.mixer
    return block.norm.weight, m.q_proj.weight, m.k_proj.weight, m.v_proj.weight, m.o_proj.weight


def _prepare_attention(block):
    m = block.mixer
    return fused.prepare_attention(block.norm.weight.detach(), block.norm.eps, m.q_proj.weight, m.k_proj.weight,
                                   m.v_proj.weight, m.o_proj.weight, m.H, m.Hkv, m.Dh)


def _prepare_mamba(block, conv, ssm):
    m = block.mixer
    A = (-torch.exp(m.A_log.float())).contiguous()        # what Mamba2Mixer.forward computes each pass
    conv_b = None if m.conv1d.bias is None else m.conv1d.bias.detach()
    return fused.prepare_mamba(block.norm.weight.detach(), block.norm.eps, m.in_proj.weight,
                                      m.conv1d.weight.detach()[:, 0, :], conv_b, A, m.D.detach().float(),
                                      m.dt_bias.detach().float(), m.cfg.time_step_limit, m.norm.weight.detach(),
                                      m.norm.group_size, m.norm.eps, m.out_proj.weight, (conv.shape, ssm.shape))
