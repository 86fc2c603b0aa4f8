"""The hot ops, one import site for the model.

Each op has a plain-torch reference in reference/ (readable, the definition) and, where it pays, a fast
path: fast/ holds CPU versions that issue a fixed handful of ops (decode is dispatch-bound on a CPU).
The model calls whatever is bound here; tests/unit/kernels checks every fast path against its reference.
A Triton kernel takes over an op for CUDA tensors once it exists and matches the reference.
"""
from __future__ import annotations

from .fast.attention import decode_attention, paged_attention, write_kv  # noqa: F401
from .fast.conv1d import causal_conv1d_update, conv_step, conv_step_  # noqa: F401
from .fast.linear import linear  # noqa: F401
from .fast.moe import grouped_experts  # noqa: F401
from .fast.norm import gated_rms_norm, rms_norm  # noqa: F401
from .fast.ssd import ssd_advance_, ssd_state_at, ssd_step, ssd_update_, ssd_verify  # noqa: F401
from .reference.conv1d import causal_conv1d  # noqa: F401
from .reference.moe import route  # noqa: F401
from .reference.sampling import probs_from_logits, rejection_sample  # noqa: F401
from .reference.ssd import ssd_chunk_scan  # noqa: F401
