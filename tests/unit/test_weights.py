"""Checkpoints: exact round trips, slices that read only their own tensors, errors that say what is wrong."""
from __future__ import annotations

import json
import logging

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import model_shards.weights as weights
from model_shards.model import HybridModel
from model_shards.presets import get_preset
from model_shards.weights import (CheckpointError, checkpoint_index, load_checkpoint, load_into, read_config,
                                  required_tensor_names, save_checkpoint)

CFG = get_preset("tiny")   # pattern ME*EM-, 8 experts, latent MoE, MTP "*E"


@pytest.fixture(scope="module")
def model() -> HybridModel:
    return HybridModel(CFG).init_random(seed=11)


@pytest.fixture(scope="module")
def single(tmp_path_factory, model):
    folder = tmp_path_factory.mktemp("single")
    save_checkpoint(model, folder)
    return folder


@pytest.fixture(scope="module")
def sharded(tmp_path_factory, model):
    folder = tmp_path_factory.mktemp("sharded")
    save_checkpoint(model, folder, max_shard_bytes=40_000)
    return folder


class ReadSpy:
    """Wraps safe_open in the weights module and records every tensor whose data is read."""

    def __init__(self, monkeypatch):
        self.read: list[str] = []
        real = weights.safe_open
        spy = self

        class Handle:
            def __init__(self, *args, **kwargs):
                self._cm = real(*args, **kwargs)

            def __enter__(self):
                self._f = self._cm.__enter__()
                return self

            def __exit__(self, *exc):
                return self._cm.__exit__(*exc)

            def keys(self):
                return self._f.keys()

            def get_slice(self, name):          # shape only: the header, no data
                sl = self._f.get_slice(name)
                return type("Shape", (), {"get_shape": lambda _s: sl.get_shape()})()

            def get_tensor(self, name):
                spy.read.append(name)
                return self._f.get_tensor(name)

        monkeypatch.setattr(weights, "safe_open", Handle)


def all_keys(folder) -> set[str]:
    return set(checkpoint_index(folder))


def assert_same_tensors(a: HybridModel, b: HybridModel):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype, k
        assert torch.equal(sa[k], sb[k]), k


# ---- layout on disk ------------------------------------------------------------------------------
def test_single_file_holds_hf_names_with_one_tensor_per_expert(single, model):
    names = set(load_file(single / "model.safetensors"))
    assert {"backbone.embeddings.weight", "backbone.norm_f.weight", "lm_head.weight",
            "backbone.layers.0.mixer.A_log", "backbone.layers.1.mixer.experts.7.up_proj.weight",
            "backbone.layers.1.mixer.experts.0.down_proj.weight", "mtp.layers.0.eh_proj.weight",
            "mtp.layers.1.mixer.experts.3.up_proj.weight", "mtp.layers.1.final_layernorm.weight"} <= names
    assert not any(n.endswith(("experts.up", "experts.down")) for n in names)
    stacked = model.backbone.layers["1"].mixer.experts
    expert5 = load_file(single / "model.safetensors")["backbone.layers.1.mixer.experts.5.up_proj.weight"]
    assert torch.equal(expert5, stacked.up[5])
    assert (single / "config.json").exists() and not (single / "model.safetensors.index.json").exists()


def test_correction_bias_is_stored_float32_even_from_a_bf16_model(tmp_path):
    m = HybridModel(CFG).init_random(seed=2).to(torch.bfloat16)
    save_checkpoint(m, tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        assert f.get_tensor("backbone.layers.1.mixer.gate.e_score_correction_bias").dtype == torch.float32
        assert f.get_tensor("backbone.layers.1.mixer.gate.weight").dtype == torch.bfloat16


def test_sharded_save_writes_several_files_and_an_index_covering_every_tensor(sharded, single):
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 2 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    assert set(index["weight_map"]) == all_keys(single)
    on_disk = {}
    for fname in files:
        with safe_open(str(sharded / fname), "pt") as f:
            on_disk.update({k: fname for k in f.keys()})
    assert on_disk == index["weight_map"]
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size()
                                                  for t in load_file(single / "model.safetensors").values())


def test_saving_a_slice_is_refused(tmp_path):
    with pytest.raises(CheckpointError, match="whole model"):
        save_checkpoint(HybridModel(CFG, layers=range(0, 3)), tmp_path)


# ---- round trips ---------------------------------------------------------------------------------
@pytest.mark.parametrize("layout", ["single", "sharded"])
def test_save_then_load_gives_exactly_the_same_tensors(request, layout, model):
    loaded = load_checkpoint(request.getfixturevalue(layout))
    assert loaded.cfg.replace(name=model.cfg.name) == model.cfg and loaded.mtp is not None
    assert_same_tensors(model, loaded)


def test_load_in_bf16_keeps_the_correction_bias_float32(single, model):
    loaded = load_checkpoint(single, dtype=torch.bfloat16)
    gate = loaded.backbone.layers["1"].mixer.gate
    assert gate.weight.dtype == torch.bfloat16 and gate.e_score_correction_bias.dtype == torch.float32
    assert torch.equal(gate.e_score_correction_bias, model.backbone.layers["1"].mixer.gate.e_score_correction_bias)


# ---- slices read only what they own --------------------------------------------------------------
SLICES = {
    "first stage": dict(layers=range(0, 2)),
    "middle stage, some experts": dict(layers=range(2, 4), expert_range=(3, 6)),
    "last stage with MTP": dict(layers=range(4, 6)),
    "last stage without MTP": dict(layers=range(4, 6), with_mtp=False),
    "expert shard of everything": dict(expert_range=(6, 8)),
}


@pytest.mark.parametrize("layout", ["single", "sharded"])
@pytest.mark.parametrize("slice_name", sorted(SLICES))
def test_a_slice_reads_exactly_the_tensors_it_owns(request, monkeypatch, model, layout, slice_name):
    folder = request.getfixturevalue(layout)
    spy = ReadSpy(monkeypatch)
    part = load_checkpoint(folder, **SLICES[slice_name])
    owned = required_tensor_names(part)
    assert sorted(spy.read) == sorted(owned)            # each owned tensor read once, nothing else
    assert owned < all_keys(folder)
    full = model.state_dict()
    for name, t in part.state_dict().items():           # and the values are the right rows
        if name.endswith(("experts.up", "experts.down")):
            e0 = part.get_submodule(name.rsplit(".", 1)[0]).first_expert
            assert torch.equal(t, full[name][e0:e0 + t.shape[0]]), name
        else:
            assert torch.equal(t, full[name]), name


def test_slice_names_follow_the_layers_and_experts_it_owns():
    with torch.device("meta"):
        part = HybridModel(CFG, layers=range(2, 4), expert_range=(3, 6))
    names = required_tensor_names(part)
    assert {n.split(".")[2] for n in names if n.startswith("backbone.layers.")} == {"2", "3"}
    assert {int(n.split(".")[5]) for n in names if ".experts." in n} == {3, 4, 5}
    assert not any(n.startswith(("mtp.", "lm_head", "backbone.embeddings")) for n in names)
    with torch.device("meta"):
        last = HybridModel(CFG, layers=range(4, 6))
    last_names = required_tensor_names(last)
    assert {"lm_head.weight", "backbone.norm_f.weight", "backbone.embeddings.weight",
            "mtp.layers.1.mixer.experts.7.down_proj.weight"} <= last_names


def test_load_into_returns_the_names_it_read(single):
    with torch.device("meta"):
        part = HybridModel(CFG, layers=range(0, 1))
    part = part.to_empty(device="cpu")
    assert load_into(part, single) == required_tensor_names(part)


def test_loading_logs_progress_per_file(sharded, caplog):
    with caplog.at_level(logging.INFO, logger="hybridserve.weights"):
        load_checkpoint(sharded)
    lines = [r.getMessage() for r in caplog.records if r.name == "hybridserve.weights"]
    n_files = len(set(checkpoint_index(sharded).values()))
    assert len(lines) == n_files and lines[-1].endswith("(file %d/%d, 100%%)" % (n_files, n_files))


# ---- bad checkpoints -----------------------------------------------------------------------------
def rewrite(folder, dest, edit):
    """Copy a single-file checkpoint to dest with edit(tensors) applied."""
    tensors = load_file(folder / "model.safetensors")
    edit(tensors)
    dest.mkdir(exist_ok=True)
    save_file(tensors, str(dest / "model.safetensors"), metadata={"format": "pt"})
    (dest / "config.json").write_text((folder / "config.json").read_text())
    return dest


def test_missing_tensor_is_named_with_the_folder(single, tmp_path):
    gone = "backbone.layers.3.mixer.experts.6.down_proj.weight"
    bad = rewrite(single, tmp_path / "bad", lambda t: t.pop(gone))
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(bad)
    assert gone in str(err.value) and str(bad) in str(err.value)
    load_checkpoint(bad, expert_range=(0, 4))    # a shard that does not own it loads fine


def test_misshapen_tensor_is_named_with_expected_and_found_shapes(single, tmp_path):
    name = "backbone.layers.4.mixer.in_proj.weight"
    bad = rewrite(single, tmp_path / "bad", lambda t: t.__setitem__(name, t[name][:-3].clone()))
    expected = (CFG.mamba_in_proj_dim, CFG.hidden_size)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(bad)
    msg = str(err.value)
    assert name in msg and str(expected) in msg and str((expected[0] - 3, expected[1])) in msg


def test_tensor_missing_from_the_file_its_index_names_is_reported(sharded, tmp_path):
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    name = "backbone.layers.0.mixer.D"
    fname = index["weight_map"][name]
    for p in sharded.iterdir():
        (tmp_path / p.name).write_bytes(p.read_bytes())
    tensors = load_file(sharded / fname)
    tensors.pop(name)
    save_file(tensors, str(tmp_path / fname), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=rf"{name} is missing from .*{fname}"):
        load_checkpoint(tmp_path)


def test_missing_config_says_config_json_is_missing(single, tmp_path):
    (tmp_path / "model.safetensors").write_bytes((single / "model.safetensors").read_bytes())
    with pytest.raises(CheckpointError, match="config.json is missing"):
        load_checkpoint(tmp_path)


def test_folder_without_weights_says_so(single, tmp_path):
    (tmp_path / "config.json").write_text((single / "config.json").read_text())
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        load_checkpoint(tmp_path)


def test_unknown_extra_tensors_are_ignored(single, tmp_path, model):
    extra = rewrite(single, tmp_path / "extra", lambda t: t.update({
        "backbone.layers.0.mixer.some_buffer": torch.ones(3), "rotary_emb.inv_freq": torch.ones(4)}))
    assert_same_tensors(model, load_checkpoint(extra))


# ---- checkpoints without MTP ---------------------------------------------------------------------
def test_checkpoint_without_mtp_tensors_loads_with_mtp_off_and_warns(single, tmp_path, model, caplog):
    no_mtp = rewrite(single, tmp_path / "nomtp", lambda t: [t.pop(k) for k in list(t) if k.startswith("mtp.")])
    with caplog.at_level(logging.WARNING, logger="hybridserve.weights"):
        loaded = load_checkpoint(no_mtp)
    assert loaded.mtp is None and not loaded.cfg.has_mtp
    assert any("MTP off" in r.getMessage() for r in caplog.records)
    assert not read_config(no_mtp).has_mtp and read_config(single).has_mtp   # engines see the same
    backbone = {k: v for k, v in model.state_dict().items() if not k.startswith("mtp.")}
    assert loaded.state_dict().keys() == backbone.keys()
    with pytest.raises(CheckpointError, match="no mtp"):
        load_checkpoint(no_mtp, with_mtp=True)


def test_model_without_mtp_saves_a_config_without_mtp(tmp_path):
    m = HybridModel(CFG, with_mtp=False).init_random(seed=4)
    save_checkpoint(m, tmp_path)
    loaded = load_checkpoint(tmp_path)
    assert not loaded.cfg.has_mtp and loaded.mtp is None
    assert_same_tensors(m, loaded)
