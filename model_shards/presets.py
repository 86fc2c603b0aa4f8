"""Named configurations: the real Super and Nano shapes (for planning on paper) and small ones that run here."""
from __future__ import annotations

from .config import ModelConfig

SUPER_PATTERN = ("MEMEMEM*EMEMEMEM*EMEMEMEM*EMEMEMEMEM*EMEMEMEMEM*EMEMEMEMEM*EMEMEMEMEM*EMEMEMEM*EMEMEMEME")
NANO_PATTERN = "MEMEM*EMEMEM*EMEMEM*EMEMEM*EMEMEM*EMEMEMEM*EMEMEMEME"

PRESETS: dict[str, ModelConfig] = {
    "nemotron-3-super-120b-a12b": ModelConfig(
        name="nemotron-3-super-120b-a12b", vocab_size=131072, hidden_size=4096,
        hybrid_override_pattern=SUPER_PATTERN, num_attention_heads=32, num_key_value_heads=2, head_dim=128,
        mamba_num_heads=128, mamba_head_dim=64, ssm_state_size=128, n_groups=8, conv_kernel=4, chunk_size=128,
        n_routed_experts=512, num_experts_per_tok=22, moe_intermediate_size=2688,
        moe_shared_expert_intermediate_size=5376, moe_latent_size=1024, routed_scaling_factor=5.0,
        num_nextn_predict_layers=1, mtp_hybrid_override_pattern="*E", max_position_embeddings=262144),
    "nemotron-3-nano-30b-a3b": ModelConfig(
        name="nemotron-3-nano-30b-a3b", vocab_size=131072, hidden_size=2688,
        hybrid_override_pattern=NANO_PATTERN, num_attention_heads=32, num_key_value_heads=2, head_dim=128,
        mamba_num_heads=64, mamba_head_dim=64, ssm_state_size=128, n_groups=8, conv_kernel=4, chunk_size=128,
        n_routed_experts=128, num_experts_per_tok=6, moe_intermediate_size=1856,
        moe_shared_expert_intermediate_size=3712, moe_latent_size=None, routed_scaling_factor=2.5,
        max_position_embeddings=262144),
    # Small shapes with every layer kind, latent MoE and an MTP block: they run in seconds on a CPU.
    "tiny": ModelConfig(
        name="tiny", vocab_size=256, hidden_size=64, hybrid_override_pattern="ME*EM-",
        num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        mamba_num_heads=8, mamba_head_dim=16, ssm_state_size=16, n_groups=2, conv_kernel=4, chunk_size=8,
        n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
        moe_shared_expert_intermediate_size=48, moe_latent_size=32, routed_scaling_factor=2.0,
        intermediate_size=96, num_nextn_predict_layers=1, mtp_hybrid_override_pattern="*E",
        max_position_embeddings=1024),
    "small": ModelConfig(
        name="small", vocab_size=2048, hidden_size=256, hybrid_override_pattern="MEM*EMEM*EME",
        num_attention_heads=8, num_key_value_heads=2, head_dim=32,
        mamba_num_heads=8, mamba_head_dim=64, ssm_state_size=32, n_groups=2, conv_kernel=4, chunk_size=32,
        n_routed_experts=16, num_experts_per_tok=4, moe_intermediate_size=128,
        moe_shared_expert_intermediate_size=256, moe_latent_size=128, routed_scaling_factor=2.5,
        num_nextn_predict_layers=1, mtp_hybrid_override_pattern="*E", max_position_embeddings=4096),
    # hybrid-mini's layer mix (20 layers: 12 Mamba, 6 latent MoE with a shared expert, 2 attention) at
    # 281M parameters, 68M active (+42M MTP): benchmarks/peers.py's larger model, random weights.
    "hybrid-280m": ModelConfig(
        name="hybrid-280m", vocab_size=4096, hidden_size=640, hybrid_override_pattern="MEMM*EMMEMMEMM*EMMEM",
        num_attention_heads=10, num_key_value_heads=2, head_dim=64,
        mamba_num_heads=20, mamba_head_dim=64, ssm_state_size=64, n_groups=2, conv_kernel=4, chunk_size=64,
        n_routed_experts=64, num_experts_per_tok=4, moe_intermediate_size=768,
        moe_shared_expert_intermediate_size=1536, moe_latent_size=384, routed_scaling_factor=2.5,
        num_nextn_predict_layers=1, mtp_hybrid_override_pattern="*E", mtp_use_final_norm_hidden=True,
        max_position_embeddings=4096),
}


def get_preset(name: str) -> ModelConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise KeyError(f"unknown model preset {name!r}; known: {sorted(PRESETS)}") from None
