"""The hot ops, one import site for the model. Today every op is the plain-torch reference; a Triton
kernel takes over an op for CUDA tensors once it exists and matches the reference (tests/unit/kernels)."""
from __future__ import annotations

from .reference.attention import attention_prefill, gather_kv, paged_attention, write_kv  # noqa: F401
from .reference.conv1d import causal_conv1d, causal_conv1d_update  # noqa: F401
from .reference.moe import grouped_experts, route  # noqa: F401
from .reference.norm import gated_rms_norm, rms_norm  # noqa: F401
from .reference.sampling import probs_from_logits, rejection_sample  # noqa: F401
from .reference.ssd import ssd_chunk_scan, ssd_state_update  # noqa: F401
