"""Model configuration: one validated dataclass read from a Hugging Face `config.json` (nemotron_h).

Why a dataclass of our own: the Hub files and transformers spell the layer pattern three ways and
encode infinity oddly; everything downstream (model, planner, loader) reads one normalised shape.
"""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

# Layer kinds, one character each, as in `hybrid_override_pattern`.
MAMBA, ATTENTION, MOE, MLP = "M", "*", "E", "-"
_BLOCK_TYPE_TO_CHAR = {
    "mamba": MAMBA, "linear_attention": MAMBA, "m": MAMBA,
    "attention": ATTENTION, "full_attention": ATTENTION, "*": ATTENTION,
    "moe": MOE, "e": MOE,
    "mlp": MLP, "-": MLP,
}
_CHAR_TO_BLOCK_TYPE = {MAMBA: "mamba", ATTENTION: "attention", MOE: "moe", MLP: "mlp"}


class ConfigError(ValueError):
    """A config field is missing or out of range; the message names the field."""


def _as_float(name: str, value: Any) -> float:
    """Accept the encodings of numbers seen in the wild: floats, ints, strings, {"__float__": "Infinity"}."""
    if isinstance(value, dict) and "__float__" in value:
        value = value["__float__"]
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name}: expected a number, found {value!r}") from None


def _encode_special_floats(obj: Any) -> Any:
    """inf / -inf / nan as transformers writes them, so the JSON stays standard."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return {"__float__": "NaN" if math.isnan(obj) else ("Infinity" if obj > 0 else "-Infinity")}
    if isinstance(obj, dict):
        return {k: _encode_special_floats(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_encode_special_floats(v) for v in obj]
    return obj


def _pattern_from(raw: dict, pattern_key: str, list_key: str) -> str | None:
    if raw.get(pattern_key) is not None:
        return str(raw[pattern_key])
    if raw.get(list_key) is not None:
        chars = []
        for i, kind in enumerate(raw[list_key]):
            char = _BLOCK_TYPE_TO_CHAR.get(str(kind).lower())
            if char is None:
                raise ConfigError(f"{list_key}[{i}]: unknown block type {kind!r}")
            chars.append(char)
        return "".join(chars)
    return None


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The fields of a nemotron_h config that change the computation (see docs/MODEL.md of shared)."""

    vocab_size: int
    hidden_size: int
    hybrid_override_pattern: str
    # attention
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    # mamba-2
    mamba_num_heads: int
    mamba_head_dim: int
    ssm_state_size: int
    n_groups: int
    conv_kernel: int = 4
    chunk_size: int = 128
    time_step_limit: tuple[float, float] = (0.0, math.inf)
    use_conv_bias: bool = True
    # MoE
    n_routed_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    moe_shared_expert_intermediate_size: int = 0
    moe_latent_size: int | None = None
    routed_scaling_factor: float = 1.0
    norm_topk_prob: bool = True
    n_group: int = 1
    topk_group: int = 1
    # dense MLP
    intermediate_size: int = 0
    # MTP
    num_nextn_predict_layers: int = 0
    mtp_hybrid_override_pattern: str = ""
    mtp_use_final_norm_hidden: bool = False  # MTP reads h_t after norm_f (True) or before (False)
    # misc
    layer_norm_epsilon: float = 1e-5
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    bos_token_id: int = 1
    eos_token_id: int = 2
    pad_token_id: int = 0
    mlp_hidden_act: str = "relu2"
    mamba_hidden_act: str = "silu"
    name: str = "custom"

    def __post_init__(self) -> None:
        self.validate()

    # ---- derived sizes -------------------------------------------------------------------------
    @property
    def num_hidden_layers(self) -> int:
        return len(self.hybrid_override_pattern)

    @property
    def d_inner(self) -> int:
        return self.mamba_num_heads * self.mamba_head_dim

    @property
    def conv_dim(self) -> int:
        return self.d_inner + 2 * self.n_groups * self.ssm_state_size

    @property
    def mamba_in_proj_dim(self) -> int:
        return self.d_inner + self.conv_dim + self.mamba_num_heads

    @property
    def moe_expert_input_size(self) -> int:
        """Width the routed experts see: the latent size, or the hidden size without a latent path."""
        return self.moe_latent_size or self.hidden_size

    @property
    def has_mtp(self) -> bool:
        return self.num_nextn_predict_layers > 0 and bool(self.mtp_hybrid_override_pattern)

    def layer_kind(self, i: int) -> str:
        return self.hybrid_override_pattern[i]

    def layers_of(self, kind: str) -> list[int]:
        return [i for i, c in enumerate(self.hybrid_override_pattern) if c == kind]

    # ---- validation ----------------------------------------------------------------------------
    def validate(self) -> None:
        def need(cond: bool, field: str, msg: str) -> None:
            if not cond:
                raise ConfigError(f"{field}: {msg}")

        for f in ("vocab_size", "hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim",
                  "mamba_num_heads", "mamba_head_dim", "ssm_state_size", "n_groups", "conv_kernel", "chunk_size"):
            v = getattr(self, f)
            need(isinstance(v, int) and v > 0, f, f"must be a positive integer, found {v!r}")
        pat = self.hybrid_override_pattern
        need(len(pat) > 0, "hybrid_override_pattern", "is empty")
        bad = sorted(set(pat) - {MAMBA, ATTENTION, MOE, MLP})
        need(not bad, "hybrid_override_pattern", f"unknown layer symbols {bad}; allowed M * E -")
        need(self.num_attention_heads % self.num_key_value_heads == 0, "num_key_value_heads",
             f"{self.num_key_value_heads} does not divide num_attention_heads {self.num_attention_heads}")
        need(self.mamba_num_heads % self.n_groups == 0, "n_groups",
             f"{self.n_groups} does not divide mamba_num_heads {self.mamba_num_heads}")
        uses_moe = MOE in pat or MOE in self.mtp_hybrid_override_pattern
        if uses_moe:
            need(self.n_routed_experts > 0, "n_routed_experts", "must be > 0 when the pattern has MoE layers")
            need(0 < self.num_experts_per_tok <= self.n_routed_experts, "num_experts_per_tok",
                 f"must be in 1..n_routed_experts ({self.n_routed_experts}), found {self.num_experts_per_tok}")
            need(self.moe_intermediate_size > 0, "moe_intermediate_size", "must be > 0 with MoE layers")
            need(self.n_group == 1 and self.topk_group == 1, "n_group",
                 f"grouped expert selection (n_group={self.n_group}, topk_group={self.topk_group}) is not supported")
        if self.moe_latent_size is not None:
            need(self.moe_latent_size > 0, "moe_latent_size", f"must be positive, found {self.moe_latent_size}")
        if MLP in pat:
            need(self.intermediate_size > 0, "intermediate_size", "must be > 0 when the pattern has dense MLP layers")
        if self.num_nextn_predict_layers:
            need(self.num_nextn_predict_layers == 1, "num_nextn_predict_layers",
                 f"only 1 MTP block is supported, found {self.num_nextn_predict_layers}")
            mtp = self.mtp_hybrid_override_pattern
            need(len(mtp) > 0 and set(mtp) <= {ATTENTION, MOE, MLP}, "mtp_hybrid_override_pattern",
                 f"must be a non-empty pattern of * E -, found {mtp!r}")
        need(self.mlp_hidden_act == "relu2", "mlp_hidden_act", f"only relu2 is supported, found {self.mlp_hidden_act!r}")
        need(self.mamba_hidden_act == "silu", "mamba_hidden_act", f"only silu is supported, found {self.mamba_hidden_act!r}")
        need(self.layer_norm_epsilon > 0, "layer_norm_epsilon", "must be > 0")

    # ---- (de)serialisation ---------------------------------------------------------------------
    @classmethod
    def from_dict(cls, raw: dict, name: str = "custom") -> "ModelConfig":
        mt = raw.get("model_type")
        if mt is not None and mt != "nemotron_h":
            raise ConfigError(f"model_type: expected 'nemotron_h', found {mt!r}")
        pattern = _pattern_from(raw, "hybrid_override_pattern", "layers_block_type")
        if pattern is None:
            raise ConfigError("hybrid_override_pattern: missing (nor is layers_block_type given)")
        if raw.get("num_hidden_layers") not in (None, len(pattern)):
            raise ConfigError(f"num_hidden_layers: {raw['num_hidden_layers']} does not match the pattern's "
                              f"length {len(pattern)}")
        mtp_pattern = _pattern_from(raw, "mtp_hybrid_override_pattern", "mtp_layers_block_type") or ""
        nextn = int(raw.get("num_nextn_predict_layers") or 0)
        if nextn == 0:
            mtp_pattern = ""
        for required in ("hidden_size", "num_attention_heads"):   # needed below to derive head_dim
            if raw.get(required) is None:
                raise ConfigError(f"{required}: missing from config.json")
        heads = raw["num_attention_heads"]
        kw: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            if f.name in raw and f.name not in ("hybrid_override_pattern", "mtp_hybrid_override_pattern",
                                                "time_step_limit", "name"):
                kw[f.name] = raw[f.name]
        # Fields with other spellings in the wild.
        if "head_dim" not in raw or raw["head_dim"] is None:
            kw["head_dim"] = raw.get("attention_head_dim") or raw["hidden_size"] // heads
        if "ssm_state_size" not in kw and "state_size" in raw:
            kw["ssm_state_size"] = raw["state_size"]
        if raw.get("moe_latent_size") is None:
            kw["moe_latent_size"] = None
        if "mamba_head_dim" not in kw and raw.get("mamba_d_head"):
            kw["mamba_head_dim"] = raw["mamba_d_head"]
        if isinstance(kw.get("eos_token_id"), list):
            kw["eos_token_id"] = kw["eos_token_id"][0]
        tsl = raw.get("time_step_limit", (0.0, math.inf))
        if not isinstance(tsl, (list, tuple)) or len(tsl) != 2:
            raise ConfigError(f"time_step_limit: expected [low, high], found {tsl!r}")
        kw["time_step_limit"] = (_as_float("time_step_limit[0]", tsl[0]), _as_float("time_step_limit[1]", tsl[1]))
        for f in ("routed_scaling_factor", "layer_norm_epsilon"):
            if f in kw:
                kw[f] = _as_float(f, kw[f])
        missing = [f.name for f in dataclasses.fields(cls)
                   if f.default is dataclasses.MISSING and f.name not in kw and f.name != "hybrid_override_pattern"]
        if missing:
            raise ConfigError(f"{missing[0]}: missing from config.json")
        return cls(hybrid_override_pattern=pattern, mtp_hybrid_override_pattern=mtp_pattern,
                   num_nextn_predict_layers=nextn, name=name, **{k: v for k, v in kw.items()
                                                                  if k != "num_nextn_predict_layers"})

    @classmethod
    def from_json(cls, path: str | Path) -> "ModelConfig":
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"config.json: not found at {path}") from None
        return cls.from_dict(raw, name=path.parent.name)

    def to_hf_dict(self) -> dict:
        """The fields of a config.json that both transformers' NemotronH and this loader read.

        Plain Python values (infinity stays `math.inf`), so `NemotronHConfig(**cfg.to_hf_dict())` works;
        `save` encodes infinity the way transformers writes it (`{"__float__": "Infinity"}`).
        """
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "name"}
        out["time_step_limit"] = [float(v) for v in self.time_step_limit]
        out.update(model_type="nemotron_h", architectures=["NemotronHForCausalLM"],
                   num_hidden_layers=self.num_hidden_layers, mamba_hidden_act=self.mamba_hidden_act,
                   use_bias=False, mlp_bias=False, attention_bias=False, residual_in_fp32=False,
                   rescale_prenorm_residual=True, dtype="float32", expand=self.d_inner // self.hidden_size
                   if self.d_inner % self.hidden_size == 0 else 2)
        if not self.has_mtp:
            out.pop("mtp_hybrid_override_pattern")
            out["num_nextn_predict_layers"] = 0
        if self.moe_latent_size is None:
            out.pop("moe_latent_size")
        return out

    def save(self, folder: str | Path) -> None:
        Path(folder).mkdir(parents=True, exist_ok=True)
        text = json.dumps(_encode_special_floats(self.to_hf_dict()), indent=2, allow_nan=False)
        (Path(folder) / "config.json").write_text(text + "\n")

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)
