"""Per-layer cost and parameter model of a replica, from the config alone (no torch).

The planner (`cluster/planner.py`) splits stages and sizes memory with these numbers: what one layer
(or the embedding, head, MTP block) costs per token and how many parameters it holds, split into the
stage actor's part and the routed experts; and the bytes of one KV block / one Mamba slot per layer.

Cost model (per token, FLOPs = 2 x multiply-adds; documented so it can be replaced by measurements):
    Mamba-2    2*d*in_proj_dim + 2*conv_dim*K (depthwise conv) + 5*H*P*N (state decay+update, C.h readout)
               + 2*d_inner*d (out_proj)
    attention  2*d*(H + 2*Hkv)*Dh (q, k, v) + 2*H*Dh*d (o) + 4*H*Dh*L (QK^T and PV over L cached tokens;
               L = `context_len`, the average context a token attends over)
    MoE        2*d*E (router) + 4*d*latent (fc1/fc2 latent projections) + 4*d*S (shared expert)
               + k*4*D_in*I routed experts; the routed part runs on the stage's ep shards in parallel,
               so it counts 1/ep towards the stage's time
    dense MLP  4*d*I
    head       2*d*V (lm_head; norm_f is noise); MTP block: 4*d*d (eh_proj) + its layers + 2*d*V (its own
               lm_head pass), counted once per token (tail drafting runs it about once per verified token)
    embedding  a lookup: 0

Placement facts the planner prices (checked against the real allocations in tests/unit/test_plan_command.py):
the MTP block's routed experts stay whole in the last stage actor (`MTPBlock` takes no expert range and
expert shards load backbone layers only); serving's drafter (`model_shards/drafter.py`) keeps copies of
the MTP block and lm_head on the last stage (`drafter_bytes`). Mamba states and their verification
scratch are float32 whatever the weights' dtype (`mamba_slot_bytes_per_layer`).
"""
from __future__ import annotations

import dataclasses

from model_shards.config import ATTENTION, MAMBA, MLP, MOE, ModelConfig
from model_shards.params import mixer_parameters, mtp_parameters


class PlanError(ValueError):
    """The deployment cannot be planned (weights do not fit, no room for one sequence, too few devices).

    Defined here, below the planner, because `layer_cost` raises it too; `cluster.planner` re-exports it.
    """


@dataclasses.dataclass(frozen=True)
class LayerCost:
    """One layer (or the embedding / head / MTP block): per-token FLOPs and parameters.

    `flops`/`params` belong to the stage actor; `expert_*` are the routed experts, split over EP shards.
    """

    flops: int = 0
    expert_flops: int = 0
    params: int = 0
    expert_params: int = 0
    active_expert_params: int = 0

    def __add__(self, o: "LayerCost") -> "LayerCost":
        return LayerCost(self.flops + o.flops, self.expert_flops + o.expert_flops, self.params + o.params,
                         self.expert_params + o.expert_params, self.active_expert_params + o.active_expert_params)

    def __sub__(self, o: "LayerCost") -> "LayerCost":
        return self + LayerCost(-o.flops, -o.expert_flops, -o.params, -o.expert_params, -o.active_expert_params)


def layer_cost(cfg: ModelConfig, kind: str, context_len: int) -> LayerCost:
    """Per-token cost of one layer of `kind`; parameters (pre-norm included) from model_shards.params,
    split here into the stage actor's part and the routed experts."""
    d = cfg.hidden_size
    params = d + mixer_parameters(cfg, kind).total
    if kind == MAMBA:
        H, P, N = cfg.mamba_num_heads, cfg.mamba_head_dim, cfg.ssm_state_size
        flops = 2 * d * cfg.mamba_in_proj_dim + 2 * cfg.conv_dim * cfg.conv_kernel + 5 * H * P * N \
            + 2 * cfg.d_inner * d
        return LayerCost(flops=flops, params=params)
    if kind == ATTENTION:
        q, kv = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
        return LayerCost(flops=2 * (d * q + 2 * d * kv + q * d) + 4 * q * context_len, params=params)
    if kind == MOE:
        E, k = cfg.n_routed_experts, cfg.num_experts_per_tok
        latent = 2 * d * cfg.moe_latent_size if cfg.moe_latent_size else 0
        shared = 2 * d * cfg.moe_shared_expert_intermediate_size
        per_expert = 2 * cfg.moe_expert_input_size * cfg.moe_intermediate_size   # up + down
        return LayerCost(flops=2 * (d * E + latent + shared), expert_flops=2 * k * per_expert,
                         params=params - E * per_expert, expert_params=E * per_expert,
                         active_expert_params=k * per_expert)
    if kind == MLP:
        return LayerCost(flops=4 * d * cfg.intermediate_size, params=params)
    raise PlanError(f"hybrid_override_pattern: unknown layer kind {kind!r}")


def layer_costs(cfg: ModelConfig, context_len: int = 8192, expert_parallel_size: int = 1) -> list[float]:
    """Per-layer stage-time cost (FLOPs per token: non-expert + routed/ep) of every backbone layer.
    Without the head and MTP extras: `plan_replica` adds those to the last stage."""
    costs = [layer_cost(cfg, kind, context_len) for kind in cfg.hybrid_override_pattern]
    return [c.flops + c.expert_flops / expert_parallel_size for c in costs]


def _embedding(cfg: ModelConfig) -> LayerCost:
    return LayerCost(params=cfg.vocab_size * cfg.hidden_size)


def _head(cfg: ModelConfig) -> LayerCost:
    """norm_f + lm_head (its weights are the embedding's when tied; the stage then holds the embedding)."""
    d, V = cfg.hidden_size, cfg.vocab_size
    return LayerCost(flops=2 * d * V, params=d + (0 if cfg.tie_word_embeddings else V * d))


def _mtp(cfg: ModelConfig, context_len: int) -> LayerCost:
    """enorm, hnorm, eh_proj, its layers, final_layernorm; shares embedding and lm_head with the model."""
    d = cfg.hidden_size
    out = LayerCost(flops=4 * d * d + 2 * d * cfg.vocab_size)  # eh_proj; its own lm_head pass
    for kind in cfg.mtp_hybrid_override_pattern:
        out = out + layer_cost(cfg, kind, context_len)
    fuse = mtp_parameters(cfg).total - out.params - out.expert_params  # norms and eh_proj
    return out + LayerCost(params=fuse)


def kv_block_bytes_per_layer(cfg: ModelConfig, block_size: int, dtype_bytes: int) -> int:
    """k and v of one block of one attention layer (= PagedKVCache.bytes_per_block)."""
    return 2 * block_size * cfg.num_key_value_heads * cfg.head_dim * dtype_bytes


def mamba_slot_bytes_per_layer(cfg: ModelConfig, max_positions: int) -> int:
    """conv + SSM state in float32, plus the verification scratch (conv window, cum, dt*x, B) for `max_positions` positions
    (= MambaStateCache.bytes_per_slot)."""
    H, P, N, G = cfg.mamba_num_heads, cfg.mamba_head_dim, cfg.ssm_state_size, cfg.n_groups
    conv = cfg.conv_dim * (cfg.conv_kernel - 1)
    return 4 * (conv + H * P * N + max_positions * (conv + H + H * P + G * N))


def router_bias_extra_bytes(cfg: ModelConfig, n_moe: int, weight_dtype_bytes: int) -> int:
    """The router's correction bias (E per MoE layer) stays float32 whatever the weights' dtype, as on disk
    (model_shards/weights.py load_checkpoint): what that adds to `n_moe` layers counted at `weight_dtype_bytes`."""
    return n_moe * cfg.n_routed_experts * (4 - weight_dtype_bytes)


# Bytes per element of the dtypes weights and KV may take (Mamba states are float32 whatever these are).
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def draft_dtype_bytes(draft_dtype: str, weight_dtype_bytes: int, on_cpu: bool) -> int:
    """Bytes per weight of the drafter's copy, as `model_shards.drafter.resolve_draft_dtype` picks the dtype
    (EngineConfig.draft_dtype): "auto" is float16 on a CPU when the model is float32, else the model's. (On a
    CPU with exactly-bfloat16 weights and the native kernels, auto keeps the model's weights: this estimate
    is then an upper bound; the plan counts neither that nor the CPU kernels' weight copies, docs/KERNELS.md.)"""
    if draft_dtype == "auto":
        return 2 if on_cpu and weight_dtype_bytes == 4 else weight_dtype_bytes
    if draft_dtype == "model":
        return weight_dtype_bytes
    if draft_dtype not in DTYPE_BYTES:
        raise PlanError(f"draft_dtype: expected auto, model or one of {', '.join(DTYPE_BYTES)}, "
                        f"found {draft_dtype!r}")
    return DTYPE_BYTES[draft_dtype]


def drafter_bytes(cfg: ModelConfig, weight_dtype_bytes: int, draft_bytes: int, draft_vocab: bool) -> int:
    """What serving's Drafter adds to the last stage next to the model's own weights: with a draft
    vocabulary a copy of lm_head with the vocabulary's rows first (model dtype); with a drafting dtype
    other than the model's a copy of the MTP block and of that head in it. Zero without MTP."""
    if not cfg.has_mtp:
        return 0
    head = cfg.vocab_size * cfg.hidden_size
    extra = head * weight_dtype_bytes if draft_vocab else 0
    if draft_bytes != weight_dtype_bytes:
        extra += (mtp_parameters(cfg).total + head) * draft_bytes
    return extra
