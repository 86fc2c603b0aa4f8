"""ModelConfig reads every spelling of a nemotron_h config.json seen in the wild, and rejects bad ones by name."""
from __future__ import annotations

import json
import math

import pytest
import torch

from model_shards.config import ConfigError, ModelConfig
from model_shards.model import HybridModel
from model_shards.params import count_parameters, mtp_parameters
from model_shards.presets import PRESETS, get_preset

SUPER, NANO = "nemotron-3-super-120b-a12b", "nemotron-3-nano-30b-a3b"


def hub_config(**changes) -> dict:
    """A small config.json as the Hub checkpoints write it (pattern as a string)."""
    raw = {
        "model_type": "nemotron_h", "architectures": ["NemotronHForCausalLM"], "vocab_size": 128,
        "hidden_size": 32, "hybrid_override_pattern": "M*E-", "num_hidden_layers": 4,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8,
        "mamba_num_heads": 4, "mamba_head_dim": 8, "ssm_state_size": 8, "n_groups": 2, "conv_kernel": 4,
        "chunk_size": 16, "n_routed_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 16,
        "moe_shared_expert_intermediate_size": 24, "moe_latent_size": 16, "routed_scaling_factor": 2.5,
        "intermediate_size": 48, "num_nextn_predict_layers": 1, "mtp_hybrid_override_pattern": "*E",
        "time_step_limit": [0.0, {"__float__": "Infinity"}],
    }
    raw.update(changes)
    return {k: v for k, v in raw.items() if v is not None}


# ---- the pattern, in each spelling ---------------------------------------------------------------
def test_pattern_string_is_read_as_is():
    cfg = ModelConfig.from_dict(hub_config())
    assert cfg.hybrid_override_pattern == "M*E-"
    assert cfg.num_hidden_layers == 4
    assert [cfg.layer_kind(i) for i in range(4)] == ["M", "*", "E", "-"]


@pytest.mark.parametrize("block_types", [
    ["linear_attention", "full_attention", "moe", "mlp"],   # transformers >= 5
    ["mamba", "attention", "moe", "mlp"],                   # older code
])
def test_layers_block_type_list_gives_the_same_pattern(block_types):
    raw = hub_config(hybrid_override_pattern=None, layers_block_type=block_types)
    assert ModelConfig.from_dict(raw).hybrid_override_pattern == "M*E-"


@pytest.mark.parametrize("mtp_fields", [
    {"mtp_hybrid_override_pattern": "*E"},
    {"mtp_hybrid_override_pattern": None, "mtp_layers_block_type": ["full_attention", "moe"]},
    {"mtp_hybrid_override_pattern": None, "mtp_layers_block_type": ["attention", "moe"]},
])
def test_mtp_pattern_is_read_from_either_spelling(mtp_fields):
    cfg = ModelConfig.from_dict(hub_config(**mtp_fields))
    assert cfg.has_mtp and cfg.mtp_hybrid_override_pattern == "*E"


def test_absent_mtp_fields_mean_no_mtp():
    cfg = ModelConfig.from_dict(hub_config(num_nextn_predict_layers=None, mtp_hybrid_override_pattern=None))
    assert not cfg.has_mtp


def test_zero_nextn_layers_turn_mtp_off_even_with_a_pattern():
    """transformers always writes mtp_layers_block_type, even when the model has no MTP block."""
    cfg = ModelConfig.from_dict(hub_config(num_nextn_predict_layers=0, mtp_hybrid_override_pattern=None,
                                           mtp_layers_block_type=["full_attention", "moe"]))
    assert not cfg.has_mtp and cfg.mtp_hybrid_override_pattern == ""


@pytest.mark.parametrize("encoded, expected", [
    ([0.0, {"__float__": "Infinity"}], (0.0, math.inf)),
    ([0.0, "inf"], (0.0, math.inf)),
    ([0.001, 100.0], (0.001, 100.0)),
])
def test_time_step_limit_accepts_odd_encodings_of_infinity(encoded, expected):
    assert ModelConfig.from_dict(hub_config(time_step_limit=encoded)).time_step_limit == expected


def test_unknown_extra_fields_are_ignored():
    extra = {"rope_theta": 10000, "some_future_field": {"a": [1, 2]}, "transformers_version": "9.9",
             "quantization_config": {"quant_method": "fp8"}}
    assert ModelConfig.from_dict(hub_config(**extra)) == ModelConfig.from_dict(hub_config())


def test_absent_latent_size_means_experts_work_in_the_hidden_size():
    cfg = ModelConfig.from_dict(hub_config(moe_latent_size=None))
    assert cfg.moe_latent_size is None and cfg.moe_expert_input_size == cfg.hidden_size


# ---- bad values name the field -------------------------------------------------------------------
@pytest.mark.parametrize("changes, field", [
    ({"num_key_value_heads": 3}, "num_key_value_heads"),
    ({"hybrid_override_pattern": "M*X-"}, "hybrid_override_pattern"),
    ({"hybrid_override_pattern": None, "layers_block_type": ["mamba", "conv", "moe", "mlp"]}, "layers_block_type[1]"),
    ({"hidden_size": None}, "hidden_size"),
    ({"hidden_size": None, "head_dim": None}, "hidden_size"),
    ({"num_attention_heads": None}, "num_attention_heads"),
    ({"mamba_num_heads": None}, "mamba_num_heads"),
    ({"n_groups": 3}, "n_groups"),
    ({"num_experts_per_tok": 5}, "num_experts_per_tok"),
    ({"num_hidden_layers": 5}, "num_hidden_layers"),
    ({"time_step_limit": [0.0, "lots"]}, "time_step_limit[1]"),
    ({"time_step_limit": 3.0}, "time_step_limit"),
    ({"model_type": "llama"}, "model_type"),
    ({"mtp_hybrid_override_pattern": "M"}, "mtp_hybrid_override_pattern"),
    ({"intermediate_size": 0}, "intermediate_size"),
])
def test_bad_values_raise_config_error_naming_the_field(changes, field):
    with pytest.raises(ConfigError) as err:
        ModelConfig.from_dict(hub_config(**changes))
    assert str(err.value).startswith(field + ":"), str(err.value)


def test_config_error_is_a_value_error():
    assert issubclass(ConfigError, ValueError)


def test_missing_config_file_says_so(tmp_path):
    with pytest.raises(ConfigError, match="config.json"):
        ModelConfig.from_json(tmp_path)


# ---- round trips ---------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(PRESETS))
def test_to_hf_dict_then_from_dict_is_identity(name):
    cfg = get_preset(name)
    assert ModelConfig.from_dict(cfg.to_hf_dict(), name=cfg.name) == cfg


@pytest.mark.parametrize("name", ["tiny", NANO])
def test_saved_config_json_is_standard_json_and_reads_back(tmp_path, name):
    cfg = get_preset(name)
    cfg.save(tmp_path)
    text = (tmp_path / "config.json").read_text()
    json.loads(text, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))
    assert '"__float__": "Infinity"' in text
    assert ModelConfig.from_json(tmp_path).replace(name=cfg.name) == cfg


@pytest.mark.parametrize("name", ["tiny", NANO])
def test_config_written_by_transformers_reads_back(tmp_path, name):
    """transformers rewrites the pattern as layers_block_type lists and infinity as {"__float__": ...}."""
    from transformers import NemotronHConfig

    cfg = get_preset(name)
    NemotronHConfig(**cfg.to_hf_dict()).save_pretrained(tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())
    assert "layers_block_type" in raw and "hybrid_override_pattern" not in raw
    assert ModelConfig.from_json(tmp_path).replace(name=cfg.name) == cfg


# ---- parameter counts ----------------------------------------------------------------------------
def test_super_has_about_120_7b_parameters_12_7b_active_and_a_2_9b_mtp_block():
    cfg = get_preset(SUPER)
    total, active = count_parameters(cfg)
    assert total == pytest.approx(120.7e9, rel=0.005)
    assert active == pytest.approx(12.7e9, rel=0.01)
    assert mtp_parameters(cfg).total == pytest.approx(2.9e9, rel=0.02)
    assert count_parameters(cfg, include_mtp=True).total == total + mtp_parameters(cfg).total


def test_nano_has_about_31_6b_parameters_and_3_6b_active():
    total, active = count_parameters(get_preset(NANO))
    assert total == pytest.approx(31.6e9, rel=0.005)
    assert active == pytest.approx(3.6e9, rel=0.01)
    assert mtp_parameters(get_preset(NANO)).total == 0


@pytest.mark.parametrize("name", ["tiny", "small"])
def test_parameter_count_equals_the_tensors_of_a_built_model(name):
    cfg = get_preset(name)
    with torch.device("meta"):
        model = HybridModel(cfg)
    built = sum(t.numel() for t in model.state_dict().values())   # parameters and the routers' bias
    assert count_parameters(cfg, include_mtp=True).total == built
    with torch.device("meta"):
        no_mtp = HybridModel(cfg, with_mtp=False)
    assert count_parameters(cfg).total == sum(t.numel() for t in no_mtp.state_dict().values())


def test_active_parameters_drop_exactly_the_unchosen_experts():
    cfg = get_preset("tiny")
    total, active = count_parameters(cfg)
    per_expert = 2 * cfg.moe_intermediate_size * cfg.moe_expert_input_size
    moe_layers = cfg.hybrid_override_pattern.count("E")
    assert total - active == moe_layers * (cfg.n_routed_experts - cfg.num_experts_per_tok) * per_expert
