"""Same weights in, same logits out: our model against transformers' NemotronH, both ways through safetensors.

This is the strongest check that we compute the real model. transformers has no MTP block, so the
comparison covers the backbone; our checkpoints' mtp.* tensors must not stop transformers from loading.
"""
from __future__ import annotations

import math
import random

import pytest
import torch

from model_shards.random_init import randomize_
import torch.nn.functional as F

from model_shards.batch import BatchLayout
from model_shards.config import ModelConfig
from model_shards.model import HybridModel
from model_shards.weights import load_checkpoint, save_checkpoint

transformers = pytest.importorskip("transformers")

MAX_REL_ERR = 1e-4
LENGTHS = (1, 7, 33, 41)           # 33 and 41 run past every chunk_size below (8 or 16)
CASES = {                          # pattern, latent MoE, Mamba groups, MTP block, seed
    "every kind, latent, 2 groups": ("M*E-ME", True, 2, True, 1),
    "no attention, full-width experts, 4 groups": ("MEM-", False, 4, False, 2),
    "attention first, latent, 1 group": ("*MEM*E", True, 1, True, 3),
    "random pattern, full-width experts, 2 groups": (None, False, 2, True, 4),
}


def random_config(pattern: str | None, latent: bool, n_groups: int, mtp: bool, seed: int) -> ModelConfig:
    """A small config whose sizes are drawn from `seed` (the pattern too, when None)."""
    rng = random.Random(seed)
    if pattern is None:
        pattern = "".join(rng.choice("M*E-") for _ in range(7))
    heads = rng.choice([2, 4])
    return ModelConfig(
        name=f"random{seed}", vocab_size=96, hidden_size=rng.choice([32, 48]), hybrid_override_pattern=pattern,
        num_attention_heads=heads, num_key_value_heads=rng.choice([1, heads]), head_dim=rng.choice([8, 16]),
        mamba_num_heads=n_groups * rng.choice([1, 2]), mamba_head_dim=rng.choice([8, 16]),
        ssm_state_size=rng.choice([8, 16]), n_groups=n_groups, conv_kernel=4, chunk_size=rng.choice([8, 16]),
        n_routed_experts=rng.choice([4, 6]), num_experts_per_tok=rng.choice([2, 3]),
        moe_intermediate_size=rng.choice([16, 24]), moe_shared_expert_intermediate_size=rng.choice([16, 32]),
        moe_latent_size=rng.choice([16, 24]) if latent else None,
        routed_scaling_factor=round(rng.uniform(1.0, 3.0), 2), intermediate_size=rng.choice([40, 64]),
        num_nextn_predict_layers=int(mtp), mtp_hybrid_override_pattern="*E" if mtp else "",
        max_position_embeddings=256)


randomize = randomize_


def dt_floor_hooks(model: HybridModel, seen: list[float]):
    """Record min softplus(dt + dt_bias) of every Mamba layer, to show transformers' 0.001 clamp never acts."""
    handles = []
    for layer in model.backbone.layers.values():
        mixer = layer.mixer
        if hasattr(mixer, "dt_bias"):
            def hook(_m, _inp, out, mixer=mixer):
                dt = out[..., -mixer.H:]
                seen.append(F.softplus(dt + mixer.dt_bias).min().item())
            handles.append(mixer.in_proj.register_forward_hook(hook))
    return handles


@torch.no_grad()
def our_logits(model: HybridModel, ids: torch.Tensor) -> torch.Tensor:
    """One sequence from position 0 with a fresh cache: ids (T,) -> logits (T, V)."""
    T, block = ids.shape[0], 16
    n_blocks = math.ceil(T / block)
    cache = model.make_cache(num_blocks=n_blocks, block_size=block, num_slots=1)
    return model.logits(model(ids, BatchLayout.single(T, 0, torch.arange(n_blocks)), cache))


@torch.no_grad()
def hf_logits(model, ids: torch.Tensor) -> torch.Tensor:
    return model(ids[None], use_cache=False).logits[0].float()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max|a - b| / max|b|, b the reference."""
    return ((a - b).abs().max() / b.abs().max()).item()


def token_batches(cfg: ModelConfig, seed: int):
    g = torch.Generator().manual_seed(1000 + seed)
    return [torch.randint(0, cfg.vocab_size, (T,), generator=g) for T in LENGTHS]


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request, tmp_path_factory):
    """A transformers model with random weights, saved by save_pretrained and loaded by our loader."""
    *spec, seed = CASES[request.param]
    cfg = random_config(*spec, seed)
    hf = transformers.NemotronHForCausalLM(transformers.NemotronHConfig(**cfg.to_hf_dict())).eval()
    randomize(hf, seed)
    folder = tmp_path_factory.mktemp("hf")
    hf.save_pretrained(folder, safe_serialization=True)
    return cfg, hf, load_checkpoint(folder), seed


def test_cases_cover_every_layer_kind_groups_and_both_moe_widths():
    configs = [random_config(*spec) for spec in CASES.values()]
    assert set("".join(c.hybrid_override_pattern for c in configs)) == {"M", "*", "E", "-"}
    assert any(c.n_groups > 1 for c in configs) and any(c.n_groups == 1 for c in configs)
    assert {c.moe_latent_size is None for c in configs} == {True, False}
    assert any("*" not in c.hybrid_override_pattern for c in configs)   # transformers' no-attention path


def test_transformers_checkpoint_gives_the_same_logits_in_our_model(case):
    cfg, hf, ours, seed = case
    assert ours.mtp is None            # transformers writes no mtp.* tensors: MTP off
    floors: list[float] = []
    handles = dt_floor_hooks(ours, floors)
    errors = {}
    for ids in token_batches(cfg, seed):
        ref = hf_logits(hf, ids)
        assert ref.std() > 0.05                          # logits are not degenerate
        errors[len(ids)] = rel_err(our_logits(ours, ids), ref)
    for h in handles:
        h.remove()
    print(f"{cfg.hybrid_override_pattern}: max rel err by length {errors}")
    assert max(errors.values()) <= MAX_REL_ERR, errors
    if "M" in cfg.hybrid_override_pattern:
        assert min(floors) > 0.005                       # far above transformers' dt clamp of 0.001


def test_our_checkpoint_loads_into_transformers_with_the_same_logits(case, tmp_path):
    cfg, _, _, seed = case
    ours = HybridModel(cfg).eval()
    randomize(ours, seed + 50)
    assert (ours.mtp is not None) == cfg.has_mtp
    save_checkpoint(ours, tmp_path, max_shard_bytes=60_000 if seed % 2 else None)
    hf, info = transformers.NemotronHForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["mismatched_keys"], info
    hf.eval()
    errors = {len(ids): rel_err(our_logits(ours, ids), hf_logits(hf, ids)) for ids in token_batches(cfg, seed)}
    print(f"{cfg.hybrid_override_pattern}: max rel err by length {errors}")
    assert max(errors.values()) <= MAX_REL_ERR, errors


def test_the_comparison_notices_a_small_change_in_one_mamba_layer(case):
    cfg, hf, ours, seed = case
    mamba = [layer.mixer for layer in ours.backbone.layers.values() if hasattr(layer.mixer, "dt_bias")]
    if not mamba:
        pytest.skip("no Mamba layer in this pattern")
    ids = token_batches(cfg, seed)[2]
    saved = mamba[-1].dt_bias.detach().clone()
    with torch.no_grad():
        mamba[-1].dt_bias.add_(0.05)
    try:
        assert rel_err(our_logits(ours, ids), hf_logits(hf, ids)) > 10 * MAX_REL_ERR
    finally:
        with torch.no_grad():
            mamba[-1].dt_bias.copy_(saved)
