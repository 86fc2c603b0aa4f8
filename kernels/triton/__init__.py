"""Triton kernels of the decode path, one file per op family; each matches its plain-torch reference
(kernels/reference/) and takes the same arguments as the CPU fast path it stands in for (kernels/fast/).

    ssd.py        selective state update (ssd_step, ssd_update_), verification (ssd_verify) and the
                  commit of a verified position (ssd_state_at, ssd_advance_)
    conv1d.py     causal depthwise conv1d: one-step update (conv_step, conv_step_), T positions
                  (causal_conv1d_update), whole prompt chunks (causal_conv1d_varlen, causal_conv1d)
    norm.py       rms_norm, gated_rms_norm
    attention.py  paged GQA attention: decode_attention, paged_attention, prefill_attention (varlen,
                  S sequences' queries flat); write_kv
    verify.py     speculative verification of S sequences: verify_greedy, verify_random
    moe.py        the latent MoE's routed experts: grouped_experts (grouped by expert, relu², weighted sum)
    ssd_prefill.py  the prefill chunked scan over variable-length sequences in one flat batch
                  (ssd_chunk_scan_varlen)

kernels/ops.py picks these for CUDA tensors (HYBRIDSERVE_KERNELS forces a choice; docs/KERNELS.md).
Importing this package decorates the kernels: with TRITON_INTERPRET=1 set before that, they run on CPU
tensors through Triton's interpreter (how tests/unit/kernels/test_triton_kernels.py runs them).
"""
from __future__ import annotations

from . import attention, conv1d, moe, norm, ssd
from . import ssd_prefill
from . import verify
from ._common import INTERPRET  # noqa: F401

# The ops kernels/ops.py may bind to a Triton kernel, by name.
OPS = {
    "rms_norm": norm.rms_norm,
    "gated_rms_norm": norm.gated_rms_norm,
    "conv_step": conv1d.conv_step,
    "conv_step_": conv1d.conv_step_,
    "causal_conv1d_update": conv1d.causal_conv1d_update,
    "causal_conv1d": conv1d.causal_conv1d,
    "causal_conv1d_varlen": conv1d.causal_conv1d_varlen,
    "ssd_step": ssd.ssd_step,
    "ssd_update_": ssd.ssd_update_,
    "ssd_verify": ssd.ssd_verify,
    "ssd_state_at": ssd.ssd_state_at,
    "ssd_advance_": ssd.ssd_advance_,
    "write_kv": attention.write_kv,
    "paged_attention": attention.paged_attention,
    "decode_attention": attention.decode_attention,
    "grouped_experts": moe.grouped_experts,
    "prefill_attention": attention.prefill_attention,
    "verify_greedy": verify.verify_greedy,
    "verify_random": verify.verify_random,
    "ssd_chunk_scan_varlen": ssd_prefill.ssd_chunk_scan_varlen,
}
