"""Parameter counts from a config alone: the planner sizes memory and splits stages with these, and
the counts must agree with what a real checkpoint holds.

Conventions (documented because published figures differ on them):
- We count every tensor of the checkpoint, buffers included (the router's `e_score_correction_bias`).
- "active" is what one token touches in a forward pass: all dense weights, the shared expert, the
  router, and `num_experts_per_tok` of the routed experts per MoE layer. The embedding and lm_head
  are both counted as active (Nemotron-3-Super: ~12.7B active this way).
- The MTP block is counted separately (`include_mtp`), because the published totals (Super ~120.7B)
  exclude it; its embedding and lm_head are shared with the main model and not counted again.
"""
from __future__ import annotations

from typing import NamedTuple

from .config import ATTENTION, MAMBA, MLP, MOE, ModelConfig


class ParamCount(NamedTuple):
    total: int
    active: int

    def __add__(self, other: "ParamCount") -> "ParamCount":  # type: ignore[override]
        return ParamCount(self.total + other.total, self.active + other.active)


def mixer_parameters(cfg: ModelConfig, kind: str) -> ParamCount:
    """Parameters of one mixer of the given kind (without its pre-norm)."""
    d = cfg.hidden_size
    if kind == MAMBA:
        n = (d * cfg.mamba_in_proj_dim                                   # in_proj
             + cfg.conv_dim * cfg.conv_kernel                            # conv1d.weight (C, 1, K)
             + (cfg.conv_dim if cfg.use_conv_bias else 0)                # conv1d.bias
             + 3 * cfg.mamba_num_heads                                   # A_log, D, dt_bias
             + cfg.d_inner                                               # gated norm weight
             + cfg.d_inner * d)                                          # out_proj
        return ParamCount(n, n)
    if kind == ATTENTION:
        q = cfg.num_attention_heads * cfg.head_dim
        kv = cfg.num_key_value_heads * cfg.head_dim
        n = d * q + 2 * d * kv + q * d                                   # q, k, v, o
        return ParamCount(n, n)
    if kind == MLP:
        n = 2 * d * cfg.intermediate_size
        return ParamCount(n, n)
    if kind == MOE:
        E, din, inter = cfg.n_routed_experts, cfg.moe_expert_input_size, cfg.moe_intermediate_size
        fixed = (E * d + E                                               # gate.weight, correction bias
                 + (2 * d * cfg.moe_latent_size if cfg.moe_latent_size else 0)  # fc1/fc2 latent
                 + 2 * d * cfg.moe_shared_expert_intermediate_size)      # shared expert
        per_expert = 2 * inter * din                                     # up (I, Din) + down (Din, I)
        return ParamCount(fixed + E * per_expert, fixed + cfg.num_experts_per_tok * per_expert)
    raise ValueError(f"unknown layer kind {kind!r}")


def layer_parameters(cfg: ModelConfig, i: int) -> ParamCount:
    """Backbone layer i: its pre-norm plus its mixer."""
    d = cfg.hidden_size
    return ParamCount(d, d) + mixer_parameters(cfg, cfg.layer_kind(i))


def mtp_parameters(cfg: ModelConfig) -> ParamCount:
    """The MTP block alone (shared embedding and lm_head excluded); zero without MTP."""
    if not cfg.has_mtp:
        return ParamCount(0, 0)
    d = cfg.hidden_size
    fuse = 2 * d + 2 * d * d                                             # enorm, hnorm, eh_proj
    count = ParamCount(fuse + d, fuse + d)                               # + final_layernorm
    for kind in cfg.mtp_hybrid_override_pattern:
        count = count + ParamCount(d, d) + mixer_parameters(cfg, kind)
    return count


def count_parameters(cfg: ModelConfig, *, include_mtp: bool = False) -> ParamCount:
    """(total, active) parameters of the model; see the module docstring for what is counted."""
    d, V = cfg.hidden_size, cfg.vocab_size
    head = V * d if not cfg.tie_word_embeddings else 0
    count = ParamCount(V * d + head + d, V * d + head + d)               # embeddings, lm_head, norm_f
    for i in range(cfg.num_hidden_layers):
        count = count + layer_parameters(cfg, i)
    if include_mtp:
        count = count + mtp_parameters(cfg)
    return count
