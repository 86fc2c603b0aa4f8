"""`hybridserve export --gguf`: the file read back with `gguf` matches the checkpoint it came from.

The expectations here are written out independently of model_shards/gguf_export.py: llama.cpp's
tensor names and transformations (its convert_hf_to_gguf.py NemotronH class and its nemotron_h
loader), the hparams from config.json, the tokenizer from tokenizer.json. Every GGUF tensor is
compared with its checkpoint tensor(s): exactly for f32, exactly against the rounded value for
f16/bf16. Every checkpoint tensor is accounted for: written, or in the one deliberately skipped set
(the MTP block).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

gguf = pytest.importorskip("gguf")

from model_shards.config import ModelConfig  # noqa: E402
from model_shards.gguf_export import GGUFExportError, export_gguf  # noqa: E402
from model_shards.weights import checkpoint_index  # noqa: E402
from router.engine_config import DEFAULT_CHECKPOINT, resolve_checkpoint  # noqa: E402

F32_ALWAYS = ("_norm.weight", ".bias", "ssm_a", "ssm_d", "ssm_conv1d.weight", "ffn_gate_inp.weight")


# ---- what llama.cpp expects, written out -------------------------------------------------------------
def expected_tensors(cfg: ModelConfig) -> dict[str, tuple[list[str], callable]]:
    """GGUF name -> (checkpoint names, transformation to the GGUF's numpy layout)."""
    same = lambda ts: ts[0]  # noqa: E731
    out: dict[str, tuple[list[str], callable]] = {
        "token_embd.weight": (["backbone.embeddings.weight"], same),
        "output_norm.weight": (["backbone.norm_f.weight"], same),
        "output.weight": (["lm_head.weight"], same),
    }
    for i, kind in enumerate(cfg.hybrid_override_pattern):
        p, b = f"backbone.layers.{i}.mixer.", f"blk.{i}."
        out[b + "attn_norm.weight"] = ([f"backbone.layers.{i}.norm.weight"], same)
        if kind == "M":
            out.update({
                b + "ssm_in.weight": ([p + "in_proj.weight"], same),
                b + "ssm_conv1d.weight": ([p + "conv1d.weight"], lambda ts: ts[0][:, 0, :]),
                b + "ssm_conv1d.bias": ([p + "conv1d.bias"], same),
                b + "ssm_dt.bias": ([p + "dt_bias"], same),
                b + "ssm_a": ([p + "A_log"], lambda ts: -torch.exp(ts[0].float())[:, None]),
                b + "ssm_d": ([p + "D"], lambda ts: ts[0][:, None]),
                b + "ssm_norm.weight": ([p + "norm.weight"], lambda ts: ts[0].view(cfg.n_groups, -1)),
                b + "ssm_out.weight": ([p + "out_proj.weight"], same),
            })
        elif kind == "*":
            for ours, theirs in (("q", "q"), ("k", "k"), ("v", "v"), ("o", "output")):
                out[b + f"attn_{theirs}.weight"] = ([p + f"{ours}_proj.weight"], same)
        elif kind == "E":
            stack = lambda ts: torch.stack(ts)  # noqa: E731
            experts = range(cfg.n_routed_experts)
            out.update({
                b + "ffn_gate_inp.weight": ([p + "gate.weight"], same),
                b + "exp_probs_b.bias": ([p + "gate.e_score_correction_bias"], same),
                b + "ffn_up_exps.weight": ([p + f"experts.{e}.up_proj.weight" for e in experts], stack),
                b + "ffn_down_exps.weight": ([p + f"experts.{e}.down_proj.weight" for e in experts], stack),
                b + "ffn_up_shexp.weight": ([p + "shared_experts.up_proj.weight"], same),
                b + "ffn_down_shexp.weight": ([p + "shared_experts.down_proj.weight"], same),
            })
            if cfg.moe_latent_size is not None:
                out[b + "ffn_latent_down.weight"] = ([p + "fc1_latent_proj.weight"], same)
                out[b + "ffn_latent_up.weight"] = ([p + "fc2_latent_proj.weight"], same)
        elif kind == "-":
            out[b + "ffn_up.weight"] = ([p + "up_proj.weight"], same)
            out[b + "ffn_down.weight"] = ([p + "down_proj.weight"], same)
    return out


def expected_mtp_names(cfg: ModelConfig) -> set[str]:
    """The MTP block of a `*E` pattern: exported by nobody, listed here name by name."""
    if not cfg.has_mtp:
        return set()
    assert cfg.mtp_hybrid_override_pattern == "*E"
    a, m = "mtp.layers.0.", "mtp.layers.1."
    names = {a + f"{n}.weight" for n in ("enorm", "hnorm", "eh_proj", "norm")}
    names |= {a + f"mixer.{x}_proj.weight" for x in "qkvo"}
    names |= {m + "norm.weight", m + "final_layernorm.weight", m + "mixer.gate.weight",
              m + "mixer.gate.e_score_correction_bias", m + "mixer.shared_experts.up_proj.weight",
              m + "mixer.shared_experts.down_proj.weight"}
    if cfg.moe_latent_size is not None:
        names |= {m + "mixer.fc1_latent_proj.weight", m + "mixer.fc2_latent_proj.weight"}
    names |= {m + f"mixer.experts.{e}.{w}_proj.weight" for e in range(cfg.n_routed_experts) for w in ("up", "down")}
    return names


def expected_hparams(raw: dict) -> dict:
    """`nemotron_h_moe.*` keys from config.json itself (not from ModelConfig)."""
    pat = raw["hybrid_override_pattern"]
    return {
        "vocab_size": raw["vocab_size"],
        "context_length": raw["max_position_embeddings"],
        "embedding_length": raw["hidden_size"],
        "block_count": raw["num_hidden_layers"],
        "feed_forward_length": [raw["moe_intermediate_size"] if c == "E" else 0 for c in pat],
        "attention.head_count": raw["num_attention_heads"],
        "attention.head_count_kv": [raw["num_key_value_heads"] if c == "*" else 0 for c in pat],
        "attention.key_length": raw["head_dim"],
        "attention.value_length": raw["head_dim"],
        "attention.layer_norm_rms_epsilon": raw["layer_norm_epsilon"],
        "attention.layer_norm_epsilon": raw["layer_norm_epsilon"],      # required by llama.cpp's loader
        "ssm.conv_kernel": raw["conv_kernel"],
        "ssm.inner_size": raw["mamba_num_heads"] * raw["mamba_head_dim"],
        "ssm.state_size": raw["ssm_state_size"],
        "ssm.time_step_rank": raw["mamba_num_heads"],
        "ssm.group_count": raw["n_groups"],
        "expert_count": raw["n_routed_experts"],
        "expert_used_count": raw["num_experts_per_tok"],
        "expert_feed_forward_length": raw["moe_intermediate_size"],
        "expert_shared_feed_forward_length": raw["moe_shared_expert_intermediate_size"],
        "expert_shared_count": 1,
        "expert_weights_norm": raw["norm_topk_prob"],
        "expert_weights_scale": raw["routed_scaling_factor"],
        "expert_gating_func": 2,                    # sigmoid
        "expert_group_count": raw["n_group"],
        "expert_group_used_count": raw["topk_group"],
        "moe_latent_size": raw["moe_latent_size"],
    }


# ---- reading back ------------------------------------------------------------------------------------
def _fields(reader) -> dict:
    return {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}


def _as_float32(t) -> np.ndarray:
    if t.tensor_type == gguf.GGMLQuantizationType.F32:
        return np.asarray(t.data)
    return gguf.quants.dequantize(t.data, t.tensor_type)


def _check_tensors(reader, folder: Path, cfg: ModelConfig, outtype: str, skipped: list[str]) -> None:
    index = checkpoint_index(folder)
    want = expected_tensors(cfg)
    got = {t.name: t for t in reader.tensors}
    assert set(got) == set(want)
    used = {s for srcs, _ in want.values() for s in srcs}
    assert set(skipped) == expected_mtp_names(cfg)
    assert used | set(skipped) == set(index), "a checkpoint tensor was dropped silently"
    assert not used & set(skipped)
    files = {f: safe_open(str(folder / f), framework="pt") for f in set(index.values())}
    rounding = {"bf16": torch.bfloat16, "f16": torch.float16, "f32": torch.float32}[outtype]
    gtype = {"bf16": gguf.GGMLQuantizationType.BF16, "f16": gguf.GGMLQuantizationType.F16,
             "f32": gguf.GGMLQuantizationType.F32}[outtype]
    for name, (srcs, fn) in want.items():
        t = got[name]
        expected = fn([files[index[s]].get_tensor(s) for s in srcs])
        assert tuple(int(x) for x in reversed(t.shape)) == tuple(expected.shape), name   # ggml ne = numpy reversed
        keep_f32 = name.endswith(F32_ALWAYS)
        assert t.tensor_type == (gguf.GGMLQuantizationType.F32 if keep_f32 else gtype), name
        value = torch.from_numpy(_as_float32(t).reshape(expected.shape).copy())
        exact = expected.float() if keep_f32 else expected.to(rounding).float()
        assert torch.equal(value, exact), name
        if not keep_f32:        # and the rounding is no more than the dtype's half ulp
            tol = {torch.bfloat16: 2 ** -8, torch.float16: 2 ** -11, torch.float32: 0.0}[rounding]
            ref = expected.float()
            assert torch.all((value - ref).abs() <= tol * ref.abs() + 1e-30 + (6e-8 if outtype == "f16" else 0)), name


# ---- tests -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("outtype", ["auto", "f16"])
def test_default_checkpoint_round_trip(tmp_path, outtype):
    folder = DEFAULT_CHECKPOINT
    if not (folder / "config.json").exists():
        pytest.skip("no shipped checkpoint")
    raw = json.loads((folder / "config.json").read_text())
    cfg = ModelConfig.from_json(folder)
    result = export_gguf(folder, tmp_path / "m.gguf", outtype=outtype)
    assert result.outtype == ("bf16" if outtype == "auto" else outtype)      # the checkpoint is bf16
    reader = gguf.GGUFReader(tmp_path / "m.gguf")
    kv = _fields(reader)

    assert kv["general.architecture"] == "nemotron_h_moe"
    assert kv["general.file_type"] == {"bf16": 32, "f16": 1}[result.outtype]
    for key, value in expected_hparams(raw).items():
        got = kv[f"nemotron_h_moe.{key}"]
        if isinstance(value, float):
            assert got == pytest.approx(value, rel=1e-6), key
        else:
            assert got == value, key
    assert "nemotron_h_moe.nextn_predict_layers" not in kv       # MTP not exported

    tok = json.loads((folder / "tokenizer.json").read_text())
    tcfg = json.loads((folder / "tokenizer_config.json").read_text())
    assert tok["model"]["type"] == "BPE" and tok["pre_tokenizer"]["type"] == "ByteLevel"
    vocab = sorted(tok["model"]["vocab"].items(), key=lambda kv_: kv_[1])
    assert [i for _, i in vocab] == list(range(raw["vocab_size"]))
    assert kv["tokenizer.ggml.model"] == "gpt2" and kv["tokenizer.ggml.pre"] == "gpt-2"
    assert kv["tokenizer.ggml.tokens"] == [t for t, _ in vocab]
    special = {a["id"] for a in tok["added_tokens"] if a["special"]}
    assert kv["tokenizer.ggml.token_type"] == [3 if i in special else 1 for i in range(raw["vocab_size"])]
    assert kv["tokenizer.ggml.merges"] == [m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]]
    assert kv["tokenizer.ggml.bos_token_id"] == tok["model"]["vocab"][tcfg["bos_token"]] == raw["bos_token_id"]
    assert kv["tokenizer.ggml.eos_token_id"] == tok["model"]["vocab"][tcfg["eos_token"]] == raw["eos_token_id"]
    assert kv["tokenizer.ggml.padding_token_id"] == tok["model"]["vocab"][tcfg["pad_token"]] == raw["pad_token_id"]
    assert kv["tokenizer.ggml.add_bos_token"] is False          # no post-processor; the template writes <s>
    assert kv["tokenizer.chat_template"] == tcfg["chat_template"]

    _check_tensors(reader, folder, cfg, result.outtype, result.skipped)


@pytest.mark.parametrize("outtype", ["f32", "bf16"])
def test_random_preset_round_trip_through_the_cli(tmp_path, preset_cache, outtype):
    from router.cli import main
    from router.tokenizer import DEFAULT_CHAT_TEMPLATE

    out = tmp_path / "small.gguf"
    assert main(["export", "--gguf", str(out), "--model", "small", "--outtype", outtype]) == 0
    folder = resolve_checkpoint("small")
    raw = json.loads((folder / "config.json").read_text())
    cfg = ModelConfig.from_json(folder)
    reader = gguf.GGUFReader(out)
    kv = _fields(reader)
    assert kv["general.architecture"] == "nemotron_h_moe"
    for key, value in expected_hparams(raw).items():
        got = kv[f"nemotron_h_moe.{key}"]
        assert got == (pytest.approx(value, rel=1e-6) if isinstance(value, float) else value), key

    # No tokenizer.json: the server's byte tokenizer (byte b is id b+3) as a byte-level BPE vocabulary.
    from model_shards.gguf_tokenizer import bytes_to_unicode
    table = bytes_to_unicode()
    assert len(set(table.values())) == 256
    tokens, types = kv["tokenizer.ggml.tokens"], kv["tokenizer.ggml.token_type"]
    assert len(tokens) == raw["vocab_size"]
    assert tokens[:3] == ["<pad>", "<s>", "</s>"] and types[:3] == [3, 3, 3]
    assert tokens[3:259] == [table[b] for b in range(256)] and set(types[3:259]) == {1}
    assert set(types[259:]) == {5}                               # unused
    assert kv["tokenizer.ggml.add_bos_token"] is True            # ByteTokenizer.encode prepends <s>
    assert kv["tokenizer.chat_template"] == DEFAULT_CHAT_TEMPLATE
    merges_left = {m.split(" ")[0] for m in kv["tokenizer.ggml.merges"]}
    assert all(len(x) > 1 for x in merges_left)                  # no merge can fire on single characters

    _check_tensors(reader, folder, cfg, outtype, sorted(expected_mtp_names(cfg)))


def test_what_llama_cpp_cannot_represent_is_refused(tmp_path, preset_cache):
    # "tiny" has a dense MLP layer beside MoE layers: nemotron_h_moe makes every FFN layer a MoE.
    with pytest.raises(GGUFExportError, match="dense MLP layers"):
        export_gguf(resolve_checkpoint("tiny"), tmp_path / "tiny.gguf")
    assert not list(tmp_path.iterdir())                          # nothing half-written


def test_model_without_moe_is_nemotron_h(tmp_path):
    from model_shards.model import HybridModel
    from model_shards.presets import get_preset
    from model_shards.weights import save_checkpoint

    cfg = get_preset("tiny").replace(hybrid_override_pattern="M*-M", n_routed_experts=0, num_experts_per_tok=0,
                                     moe_intermediate_size=0, moe_shared_expert_intermediate_size=0,
                                     moe_latent_size=None, num_nextn_predict_layers=0,
                                     mtp_hybrid_override_pattern="")
    with torch.no_grad():
        save_checkpoint(HybridModel(cfg).init_random(3), tmp_path / "ck")
    result = export_gguf(tmp_path / "ck", tmp_path / "d.gguf", outtype="f32")
    assert result.arch == "nemotron_h" and result.skipped == []
    reader = gguf.GGUFReader(tmp_path / "d.gguf")
    kv = _fields(reader)
    assert kv["general.architecture"] == "nemotron_h"
    assert kv["nemotron_h.feed_forward_length"] == [0, 0, cfg.intermediate_size, 0]
    assert kv["nemotron_h.attention.head_count_kv"] == [0, cfg.num_key_value_heads, 0, 0]
    assert not [k for k in kv if "expert" in k]
    _check_tensors(reader, tmp_path / "ck", ModelConfig.from_json(tmp_path / "ck"), "f32", [])
