"""Write an HF-layout checkpoint as one GGUF file for llama.cpp (`hybridserve export --gguf OUT.gguf`).

The layout is llama.cpp's `nemotron_h_moe` architecture (`nemotron_h` for a model without MoE layers),
as its converter (convert_hf_to_gguf.py, NemotronHModel) writes it and its loader (llama-model.cpp,
models/nemotron-h*.cpp) reads it. Tensors, from checkpoint name to GGUF name (`{i}` the layer):

| checkpoint (`backbone.` prefix unless noted)  | GGUF                         | transformation              |
|-----------------------------------------------|------------------------------|-----------------------------|
| `embeddings.weight`                            | `token_embd.weight`          |                             |
| `norm_f.weight`                                | `output_norm.weight`         | f32                         |
| `lm_head.weight` (no prefix)                   | `output.weight`              |                             |
| `layers.{i}.norm.weight`                       | `blk.{i}.attn_norm.weight`   | f32 (every layer kind)      |
| Mamba `mixer.in_proj.weight`                   | `blk.{i}.ssm_in.weight`      |                             |
| `mixer.conv1d.weight` [C,1,K]                  | `blk.{i}.ssm_conv1d.weight`  | squeeze -> [C,K], f32       |
| `mixer.conv1d.bias`                            | `blk.{i}.ssm_conv1d.bias`    | f32                         |
| `mixer.dt_bias`                                | `blk.{i}.ssm_dt.bias`        | f32                         |
| `mixer.A_log` [H]                              | `blk.{i}.ssm_a`              | -exp(A_log) (in f32) -> [H,1] |
| `mixer.D` [H]                                  | `blk.{i}.ssm_d`              | -> [H,1], f32               |
| `mixer.norm.weight` [d_inner]                  | `blk.{i}.ssm_norm.weight`    | -> [n_groups, d_inner/n_groups], f32 |
| `mixer.out_proj.weight`                        | `blk.{i}.ssm_out.weight`     |                             |
| attention `mixer.{q,k,v,o}_proj.weight`        | `blk.{i}.attn_{q,k,v,output}.weight` |                     |
| MoE `mixer.gate.weight`                        | `blk.{i}.ffn_gate_inp.weight`| f32                         |
| `mixer.gate.e_score_correction_bias`           | `blk.{i}.exp_probs_b.bias`   | f32                         |
| `mixer.fc1_latent_proj.weight`                 | `blk.{i}.ffn_latent_down.weight` |                         |
| `mixer.fc2_latent_proj.weight`                 | `blk.{i}.ffn_latent_up.weight`   |                         |
| `mixer.experts.{e}.up_proj.weight` (all e)     | `blk.{i}.ffn_up_exps.weight` | stacked on a new dim 0      |
| `mixer.experts.{e}.down_proj.weight` (all e)   | `blk.{i}.ffn_down_exps.weight` | stacked on a new dim 0    |
| `mixer.shared_experts.{up,down}_proj.weight`   | `blk.{i}.ffn_{up,down}_shexp.weight` |                     |
| dense MLP `mixer.{up,down}_proj.weight`        | `blk.{i}.ffn_{up,down}.weight` (`nemotron_h` only) |       |

"f32" tensors stay float32 whatever `outtype` says (as llama.cpp's converter keeps 1-D tensors, norms, the
router and the conv kernel); the others take `outtype`. Shapes are numpy's (llama.cpp's `ne` reversed).

Not exported, because llama.cpp cannot take them in this layout (see docs/SERVING.md):
- the MTP block (`mtp.*`): llama.cpp's MTP support for this architecture is newer than the `gguf`
  package's tensor list and its layout has changed between llama.cpp versions, so the main model is
  written alone (as llama.cpp's converter does with `--no-mtp`); `ExportResult.skipped` lists them.
- dense MLP layers (`-`) in a model that also has MoE layers: `nemotron_h_moe` builds every FFN layer
  as a MoE layer, so such a checkpoint is refused (`GGUFExportError`), never written wrong.
- a MoE without a shared expert: llama.cpp requires the shared-expert tensors; refused.

The tokenizer goes in as llama.cpp's GPT-2-style BPE (`tokenizer.ggml.model = "gpt2"`) with the
`gpt-2` pre-tokenizer (the same regex as `tokenizers`' ByteLevel with `use_regex`); a random-weight
preset (no tokenizer.json: the server's byte tokenizer, id = byte + 3) is written as the same BPE with
one token per byte and no reachable merge, which tokenizes exactly as the server does.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .config import ATTENTION, MAMBA, MLP, MOE, ModelConfig
from .gguf_tokenizer import TokenizerData, tokenizer_data
from .weights import CheckpointError, checkpoint_index

log = logging.getLogger("hybridserve.gguf_export")

ARCH_MOE = "nemotron_h_moe"
ARCH_DENSE = "nemotron_h"
OUTTYPES = ("auto", "f32", "f16", "bf16")


class GGUFExportError(ValueError):
    """The checkpoint cannot be written in llama.cpp's layout; the message says what and why."""


def _gguf():
    try:
        import gguf
    except ImportError:
        raise GGUFExportError("the `gguf` package is not installed: pip install 'hybridserve[gguf]'") from None
    return gguf


# ---- tensors ---------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class TensorPlan:
    """One GGUF tensor: its name, the checkpoint tensor(s) it is made of, how, and its numpy shape."""

    name: str
    sources: tuple[str, ...]
    transform: str           # copy | squeeze_conv | neg_exp_column | column | groups | stack
    shape: tuple[int, ...]
    keep_f32: bool = False


def _transform(kind: str, tensors: list[torch.Tensor], cfg: ModelConfig) -> torch.Tensor:
    if kind == "copy":
        return tensors[0]
    if kind == "squeeze_conv":                  # [conv_dim, 1, K] -> [conv_dim, K]
        return tensors[0].reshape(tensors[0].shape[0], tensors[0].shape[-1])
    if kind == "neg_exp_column":                # A = -exp(A_log), [H] -> [H, 1]
        return (-torch.exp(tensors[0].float())).reshape(-1, 1)
    if kind == "column":                        # [H] -> [H, 1]
        return tensors[0].reshape(-1, 1)
    if kind == "groups":                        # [d_inner] -> [n_groups, d_inner / n_groups]
        return tensors[0].reshape(cfg.n_groups, -1)
    if kind == "stack":                         # E x [a, b] -> [E, a, b]
        return torch.stack(tensors, dim=0)
    raise AssertionError(kind)


def arch_for(cfg: ModelConfig) -> str:
    """`nemotron_h_moe` when the main layers have MoE, else `nemotron_h`; refuses what llama.cpp cannot run."""
    pattern = cfg.hybrid_override_pattern
    if MOE not in pattern:
        return ARCH_DENSE
    if MLP in pattern:
        raise GGUFExportError(
            f"hybrid_override_pattern {pattern!r} mixes dense MLP layers ('-', layers {cfg.layers_of(MLP)}) "
            f"with MoE layers ('E'): llama.cpp's {ARCH_MOE} builds every FFN layer as a MoE layer, so it "
            "cannot represent this model")
    if cfg.moe_shared_expert_intermediate_size <= 0:
        raise GGUFExportError("moe_shared_expert_intermediate_size is 0: llama.cpp's "
                              f"{ARCH_MOE} requires a shared expert in every MoE layer")
    return ARCH_MOE


def tensor_plan(cfg: ModelConfig, names: set[str] | dict[str, Any]) -> tuple[list[TensorPlan], list[str]]:
    """The GGUF tensors for `cfg` (in file order) from the checkpoint names present, and the checkpoint
    names deliberately left out (the MTP block). Any other checkpoint tensor not used is an error."""
    gguf = _gguf()
    T = gguf.MODEL_TENSOR
    arch_name = arch_for(cfg)

    def tn(kind, layer: int | None = None, suffix: str = ".weight") -> str:
        base = gguf.TENSOR_NAMES[kind]
        return (base.format(bid=layer) if layer is not None else base) + suffix

    d, H, C, K = cfg.hidden_size, cfg.mamba_num_heads, cfg.conv_dim, cfg.conv_kernel
    plans: list[TensorPlan] = []

    def add(name, src, shape, transform="copy", keep_f32=False, optional=False):
        srcs = (src,) if isinstance(src, str) else tuple(src)
        missing = [s for s in srcs if s not in names]
        if missing:
            if optional:
                return
            raise CheckpointError(f"tensor {missing[0]} is missing from the checkpoint")
        plans.append(TensorPlan(name, srcs, transform, tuple(int(x) for x in shape), keep_f32))

    add(tn(T.TOKEN_EMBD), "backbone.embeddings.weight", (cfg.vocab_size, d))
    for i, kind in enumerate(cfg.hybrid_override_pattern):
        p = f"backbone.layers.{i}."
        add(tn(T.ATTN_NORM, i), p + "norm.weight", (d,), keep_f32=True)
        m = p + "mixer."
        if kind == MAMBA:
            add(tn(T.SSM_IN, i), m + "in_proj.weight", (cfg.mamba_in_proj_dim, d))
            add(tn(T.SSM_CONV1D, i), m + "conv1d.weight", (C, K), "squeeze_conv", keep_f32=True)
            add(tn(T.SSM_CONV1D, i, ".bias"), m + "conv1d.bias", (C,), keep_f32=True, optional=not cfg.use_conv_bias)
            add(tn(T.SSM_DT, i, ".bias"), m + "dt_bias", (H,), keep_f32=True)
            add(tn(T.SSM_A, i, ""), m + "A_log", (H, 1), "neg_exp_column", keep_f32=True)
            add(tn(T.SSM_D, i, ""), m + "D", (H, 1), "column", keep_f32=True)
            add(tn(T.SSM_NORM, i), m + "norm.weight", (cfg.n_groups, cfg.d_inner // cfg.n_groups), "groups",
                keep_f32=True)
            add(tn(T.SSM_OUT, i), m + "out_proj.weight", (d, cfg.d_inner))
        elif kind == ATTENTION:
            q, kv = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
            add(tn(T.ATTN_Q, i), m + "q_proj.weight", (q, d))
            add(tn(T.ATTN_K, i), m + "k_proj.weight", (kv, d))
            add(tn(T.ATTN_V, i), m + "v_proj.weight", (kv, d))
            add(tn(T.ATTN_OUT, i), m + "o_proj.weight", (d, q))
        elif kind == MOE:
            E, lat, ff = cfg.n_routed_experts, cfg.moe_expert_input_size, cfg.moe_intermediate_size
            add(tn(T.FFN_GATE_INP, i), m + "gate.weight", (E, d), keep_f32=True)
            add(tn(T.FFN_EXP_PROBS_B, i, ".bias"), m + "gate.e_score_correction_bias", (E,), keep_f32=True)
            if cfg.moe_latent_size is not None:
                add(tn(T.MOE_LATENT_DOWN, i), m + "fc1_latent_proj.weight", (lat, d))
                add(tn(T.MOE_LATENT_UP, i), m + "fc2_latent_proj.weight", (d, lat))
            add(tn(T.FFN_UP_EXP, i), [f"{m}experts.{e}.up_proj.weight" for e in range(E)], (E, ff, lat), "stack")
            add(tn(T.FFN_DOWN_EXP, i), [f"{m}experts.{e}.down_proj.weight" for e in range(E)], (E, lat, ff),
                "stack")
            sh = cfg.moe_shared_expert_intermediate_size
            add(tn(T.FFN_UP_SHEXP, i), m + "shared_experts.up_proj.weight", (sh, d))
            add(tn(T.FFN_DOWN_SHEXP, i), m + "shared_experts.down_proj.weight", (d, sh))
        elif kind == MLP:
            add(tn(T.FFN_UP, i), m + "up_proj.weight", (cfg.intermediate_size, d))
            add(tn(T.FFN_DOWN, i), m + "down_proj.weight", (d, cfg.intermediate_size))
    add(tn(T.OUTPUT_NORM), "backbone.norm_f.weight", (d,), keep_f32=True)
    # Tied embeddings: llama.cpp uses token_embd when `output` is absent.
    add(tn(T.OUTPUT), "lm_head.weight", (cfg.vocab_size, d), optional=cfg.tie_word_embeddings)

    known = set(gguf.TENSOR_NAMES[t] for t in gguf.MODEL_TENSORS[getattr(gguf.MODEL_ARCH, arch_name.upper())])
    for plan in plans:     # every name is one llama.cpp's tensor list for the architecture has
        base = plan.name.removesuffix(".weight").removesuffix(".bias")
        layer = base.split(".")[1] if base.startswith("blk.") else None
        assert (base.replace(f"blk.{layer}.", "blk.{bid}.") if layer else base) in known, plan.name
    used = {s for plan in plans for s in plan.sources}
    skipped = sorted(n for n in names if n not in used and n.startswith("mtp."))
    unused = sorted(n for n in names if n not in used and not n.startswith("mtp."))
    if unused:
        raise GGUFExportError(f"checkpoint tensor {unused[0]} has no place in llama.cpp's {arch_name} layout"
                              + (f" (and {len(unused) - 1} more)" if len(unused) > 1 else ""))
    return plans, skipped


# ---- metadata --------------------------------------------------------------------------------------
def hparams(cfg: ModelConfig, arch_name: str) -> dict[str, Any]:
    """The `{arch}.*` keys (key -> value; ints are uint32, floats float32, lists per-layer arrays).

    Per-layer arrays tell llama.cpp each layer's kind: attention layers have `head_count_kv` > 0, FFN
    (MoE or dense MLP) layers `feed_forward_length` > 0, Mamba layers both 0.
    """
    gguf = _gguf()
    K = gguf.Keys
    pat = cfg.hybrid_override_pattern
    ffn = {MOE: cfg.moe_intermediate_size, MLP: cfg.intermediate_size}
    out: dict[str, Any] = {
        K.LLM.VOCAB_SIZE: cfg.vocab_size,
        K.LLM.CONTEXT_LENGTH: cfg.max_position_embeddings,
        K.LLM.EMBEDDING_LENGTH: cfg.hidden_size,
        K.LLM.BLOCK_COUNT: cfg.num_hidden_layers,
        K.LLM.FEED_FORWARD_LENGTH: [ffn.get(c, 0) for c in pat],
        K.Attention.HEAD_COUNT: cfg.num_attention_heads,
        K.Attention.HEAD_COUNT_KV: [cfg.num_key_value_heads if c == ATTENTION else 0 for c in pat],
        K.Attention.KEY_LENGTH: cfg.head_dim,
        K.Attention.VALUE_LENGTH: cfg.head_dim,
        K.Attention.LAYERNORM_RMS_EPS: float(cfg.layer_norm_epsilon),
        # llama.cpp's nemotron_h loader requires the plain LayerNorm eps too (its MTP head's final norm).
        K.Attention.LAYERNORM_EPS: float(cfg.layer_norm_epsilon),
        K.SSM.CONV_KERNEL: cfg.conv_kernel,
        K.SSM.INNER_SIZE: cfg.d_inner,
        K.SSM.STATE_SIZE: cfg.ssm_state_size,
        K.SSM.TIME_STEP_RANK: cfg.mamba_num_heads,
        K.SSM.GROUP_COUNT: cfg.n_groups,
    }
    if arch_name == ARCH_MOE:
        out.update({
            K.LLM.EXPERT_COUNT: cfg.n_routed_experts,
            K.LLM.EXPERT_USED_COUNT: cfg.num_experts_per_tok,
            K.LLM.EXPERT_FEED_FORWARD_LENGTH: cfg.moe_intermediate_size,
            K.LLM.EXPERT_SHARED_FEED_FORWARD_LENGTH: cfg.moe_shared_expert_intermediate_size,
            K.LLM.EXPERT_SHARED_COUNT: 1,
            K.LLM.EXPERT_WEIGHTS_NORM: bool(cfg.norm_topk_prob),
            K.LLM.EXPERT_WEIGHTS_SCALE: float(cfg.routed_scaling_factor),
            K.LLM.EXPERT_GATING_FUNC: int(gguf.ExpertGatingFuncType.SIGMOID),
            K.LLM.EXPERT_GROUP_COUNT: cfg.n_group,
            K.LLM.EXPERT_GROUP_USED_COUNT: cfg.topk_group,
        })
        if cfg.moe_latent_size is not None:
            out[K.LLM.MOE_LATENT_SIZE] = cfg.moe_latent_size
    return {k.format(arch=arch_name): v for k, v in out.items()}


# ---- writing ---------------------------------------------------------------------------------------
@dataclasses.dataclass
class ExportResult:
    path: Path
    arch: str
    outtype: str
    tensors: list[TensorPlan]
    skipped: list[str]
    notes: list[str]
    nbytes: int


def _resolve_outtype(outtype: str, folder: Path, index: dict[str, str]) -> str:
    if outtype not in OUTTYPES:
        raise GGUFExportError(f"outtype: {outtype!r} is not one of {', '.join(OUTTYPES)}")
    if outtype != "auto":
        return outtype
    from safetensors import safe_open

    name = "backbone.embeddings.weight"
    with safe_open(str(folder / index[name]), framework="pt") as f:
        dtype = f.get_slice(name).get_dtype()
    return {"BF16": "bf16", "F16": "f16"}.get(dtype.upper(), "f32")


def _to_numpy(t: torch.Tensor, dtype: str) -> tuple[np.ndarray, Any]:
    """The array to write and its GGML type (None: from the numpy dtype)."""
    gguf = _gguf()
    if dtype == "f32":
        return t.to(torch.float32).contiguous().numpy(), None
    if dtype == "f16":
        return t.to(torch.float16).contiguous().numpy(), None
    return t.to(torch.bfloat16).contiguous().view(torch.int16).numpy().view(np.uint16), \
        gguf.GGMLQuantizationType.BF16


def export_gguf(folder: str | os.PathLike, out: str | os.PathLike, *, outtype: str = "auto") -> ExportResult:
    """Write the checkpoint in `folder` (HF layout: config.json, safetensors, tokenizer files) to `out`.

    `outtype` "auto" keeps the checkpoint's own dtype (bf16 / f16, else f32). Tensors are read and
    written one at a time (a layer's experts together), so memory stays near the largest one.
    """
    gguf = _gguf()
    from safetensors import safe_open

    folder = Path(folder)
    if not (folder / "config.json").exists():
        raise CheckpointError(f"config.json is missing from checkpoint folder {folder}")
    index = checkpoint_index(folder)
    cfg = ModelConfig.from_json(folder / "config.json")
    arch_name = arch_for(cfg)
    plans, skipped = tensor_plan(cfg, index)
    outtype = _resolve_outtype(outtype, folder, index)
    notes: list[str] = []
    if skipped:
        notes.append(f"MTP block not exported ({len(skipped)} tensors): llama.cpp runs the main model only")
    lo, hi = cfg.time_step_limit
    if lo > 0 or math.isfinite(hi):
        notes.append(f"time_step_limit {cfg.time_step_limit}: llama.cpp never clamps dt, the server does")
    tok = tokenizer_data(folder, cfg)

    files: dict[str, Any] = {}

    def read(name: str) -> torch.Tensor:
        fname = index[name]
        if fname not in files:
            files[fname] = safe_open(str(folder / fname), framework="pt")
        return files[fname].get_tensor(name)

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    w = gguf.GGUFWriter(str(tmp), arch_name)
    try:
        w.add_name(cfg.name if cfg.name != "custom" else folder.name)
        w.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                         "bf16": gguf.LlamaFileType.MOSTLY_BF16}[outtype])
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        for key, value in hparams(cfg, arch_name).items():
            if isinstance(value, bool):
                w.add_bool(key, value)
            elif isinstance(value, float):
                w.add_float32(key, value)
            elif isinstance(value, list):
                w.add_array(key, value)
            else:
                w.add_uint32(key, int(value))
        w.add_tokenizer_model(tok.model)
        w.add_tokenizer_pre(tok.pre)
        w.add_token_list(tok.tokens)
        w.add_token_types(tok.token_types)
        w.add_token_merges(tok.merges)
        for adder, value in ((w.add_bos_token_id, tok.bos_id), (w.add_eos_token_id, tok.eos_id),
                             (w.add_pad_token_id, tok.pad_id)):
            if value is not None:
                adder(int(value))
        w.add_add_bos_token(tok.add_bos)
        w.add_add_eos_token(False)
        w.add_chat_template(tok.chat_template)

        dtypes = {}
        for plan in plans:
            dt = "f32" if plan.keep_f32 else outtype
            dtypes[plan.name] = dt
            itemsize = 4 if dt == "f32" else 2
            np_dtype = {"f32": np.float32, "f16": np.float16, "bf16": np.uint16}[dt]
            w.add_tensor_info(plan.name, plan.shape, np.dtype(np_dtype), int(np.prod(plan.shape)) * itemsize,
                              raw_dtype=gguf.GGMLQuantizationType.BF16 if dt == "bf16" else None)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        nbytes = 0
        for plan in plans:
            t = _transform(plan.transform, [read(s) for s in plan.sources], cfg)
            if tuple(t.shape) != plan.shape:
                raise CheckpointError(f"{plan.sources[0]}: shape {tuple(t.shape)} after '{plan.transform}' does "
                                      f"not fit {plan.name} {plan.shape} (from config.json)")
            arr, _ = _to_numpy(t, dtypes[plan.name])
            w.write_tensor_data(arr)
            nbytes += arr.nbytes
        w.close()
        tmp.replace(out)
    except BaseException:
        w.close()
        tmp.unlink(missing_ok=True)
        raise
    finally:
        files.clear()
    log.info("wrote %s (%s, %s, %d tensors, %.1f MB); skipped %d MTP tensors", out, arch_name, outtype,
             len(plans), nbytes / 1e6, len(skipped))
    return ExportResult(out, arch_name, outtype, plans, skipped, notes, nbytes)

