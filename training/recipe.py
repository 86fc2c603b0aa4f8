"""The hybrid-mini model shape and the training hyper-parameters, in one place.

Why this shape: the Super family in miniature (only M, *, E layers; latent MoE with relu² experts, a shared
expert and a sigmoid router; an MTP block `*E`), small enough that a 2-core CPU trains it usefully in about
an hour and the bf16 checkpoint stays under ~30 MB. Deep and narrow (20 layers, Mamba-heavy like Super,
8 experts top-2) rather than the first 9-layer version: the MTP block is then a tenth of the depth, not
two ninths, so drafting costs less relative to a decode step (docs/MODEL_CARD.md has both measured).
"""
from __future__ import annotations

import dataclasses

from model_shards.config import ModelConfig

MODEL = ModelConfig(
    name="hybrid-mini", vocab_size=4096, hidden_size=256, hybrid_override_pattern="MEMM*EMMEMMEMM*EMMEM",
    num_attention_heads=8, num_key_value_heads=2, head_dim=32,
    mamba_num_heads=8, mamba_head_dim=64, ssm_state_size=32, n_groups=2, conv_kernel=4, chunk_size=64,
    n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=256,
    moe_shared_expert_intermediate_size=512, moe_latent_size=128, routed_scaling_factor=2.5,
    num_nextn_predict_layers=1, mtp_hybrid_override_pattern="*E", max_position_embeddings=4096,
    bos_token_id=1, eos_token_id=2, pad_token_id=0)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    seed: int = 1234
    batch_size: int = 8              # sequences per step
    seq_len: int = 256               # tokens per sequence (targets need seq_len + 3)
    steps: int = 800
    lr: float = 2e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 40
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    mtp_weight: float = 0.3          # loss = CE(main) + mtp_weight * mean over depths and variants of CE(MTP)
    mtp_loss_fraction: float = 0.25  # MTP losses on a random quarter of the positions (lm_head is the CPU cost)
    bias_update_rate: float = 1e-2   # aux-loss-free expert balancing (selection bias nudged toward even load)
    mtp_finetune_steps: int = 250    # second stage: both MTP heads, backbone frozen, all positions
    mtp_finetune_lr: float = 1e-3
    log_every: int = 10
    ckpt_every_s: float = 300.0
    eval_windows: int = 8
    threads: int = 1                 # on a shared 2-core box, 1 thread ran 3-5x faster than 2 (no spin-waits)
    bf16: bool = False
