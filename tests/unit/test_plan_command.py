"""`hybridserve plan`: the Super figures, the refusals, the Helm values, and the plan's memory figures
against what a real engine allocates for the shipped small models."""
from __future__ import annotations

import json
import math
import re
import shlex

import pytest

from cluster.contracts import kv_positions

from cluster.parallel import ParallelConfig
from cluster.plan_report import Hardware, plan_deployment
from cluster.planner import PlanError, plan_replica
from model_shards.presets import get_preset
from router.cli import main
from tests.engine_helpers import storage_bytes, weight_bytes

SUPER = "nemotron-3-super-120b-a12b"
H200 = ["--gpus", "8", "--gpu-memory-gb", "141"]
GB = 10 ** 9


def run(capsys, *argv) -> tuple[int, str, str]:
    rc = main(["plan", *argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


def plan_json(capsys, *argv) -> dict:
    rc, out, err = run(capsys, *argv, "--output", "json")
    assert rc == 0, err
    return json.loads(out)


# ---- Super on 8 x H200 ---------------------------------------------------------------------------------
def test_super_on_8_h200_table_reports_the_model_card_parameters_and_a_layout(capsys):
    rc, out, err = run(capsys, "--model", SUPER, *H200)
    assert rc == 0, err
    total, active = map(float, re.search(r"parameters: ([\d.]+)B total, ([\d.]+)B active", out).groups())
    assert total == pytest.approx(120.7, rel=0.005)          # MODEL.md: about 120.7B (MTP block apart)
    assert active == pytest.approx(12.7, rel=0.01)           # about 12.7B active per token
    assert "MTP block 2.94B" in out
    for heading in ("stages (layers by kind)", "devices of one replica", "KV cache:", "Mamba state:",
                    "largest batch:", "helm values", "float32"):
        assert heading in out


def test_super_on_8_h200_json_layout_fits(capsys):
    d = plan_json(capsys, "--model", SUPER, *H200)
    cfg = get_preset(SUPER)
    par = d["parameters"]
    assert par["total"] == pytest.approx(120.7e9, rel=0.005) and par["active"] == pytest.approx(12.7e9, rel=0.01)
    assert par["mtp_total"] == pytest.approx(2.9e9, rel=0.05)
    lay = d["layout"]
    pp, ep = lay["pipeline_parallel_size"], lay["expert_parallel_size"]
    assert pp * ep <= 8 and 512 % ep == 0 and d["max_batch"] >= 1
    assert d["dtype"] == {"weights": "bfloat16", "kv_cache": "bfloat16", "mamba_state": "float32"}
    # Stages cover the 88 layers contiguously; kinds add up to 40 Mamba, 8 attention, 40 MoE.
    bounds = [s["layers"] for s in d["stages"]]
    assert bounds[0][0] == 0 and bounds[-1][1] == 87
    assert all(a[1] + 1 == b[0] for a, b in zip(bounds, bounds[1:]))
    assert (sum(s["mamba"] for s in d["stages"]), sum(s["attention"] for s in d["stages"]),
            sum(s["moe"] for s in d["stages"])) == (40, 8, 40)
    # Every GPU holds its weights and caches at the largest batch; each stage's experts cover 0..511 once.
    assert len(d["gpus"]) == pp * ep
    for g in d["gpus"]:
        assert g["weight_bytes"] + g["cache_bytes"] <= g["usable_bytes"] == int(141 * GB * 0.9)
    for s in range(pp):
        got = sorted(e for g in d["gpus"] if g["stage"] == s for e in range(*g["expert_range"]))
        assert got == list(range(cfg.n_routed_experts))
    # Per-sequence figures: 9 attention layers (8 + MTP's) of 2 KV heads x 128 in bf16, 40 Mamba layers in fp32.
    seq = d["per_sequence"]
    assert seq["kv_block_bytes"] == 9 * 2 * 16 * 2 * 128 * 2
    assert seq["kv_blocks"] == math.ceil(kv_positions(2048, 3) / 16)     # auto: 3 MTP drafting positions
    assert d["num_speculative_tokens"] == 3
    assert seq["mamba_state_bytes"] == 40 * 4 * (10240 * 3 + 128 * 64 * 128)


def test_auto_picks_the_smallest_layout_that_fits():
    """No layout with fewer GPUs fits weights plus one sequence; at the model card's minimum (BF16 on
    4 x 80 GB) auto finds a 4-GPU layout, and on 2-GPU nodes it keeps ep within a node."""
    cfg = get_preset(SUPER)
    hw = Hardware(8, 1, 141 * GB)
    plan = plan_deployment(cfg, hw)
    size = plan.pp * plan.ep
    for p in range(1, size + 1):
        for e in (1, 2, 4, 8):
            if p * e < size:
                with pytest.raises(PlanError):
                    plan_replica(cfg, ParallelConfig(p, e), hw.devices(p * e), context_len=2048,
                                 num_speculative_tokens=0)
    assert any("passed over" in w for w in plan.why) and plan.larger          # why, and what bigger ones hold
    four = plan_deployment(cfg, Hardware(4, 1, 80 * GB))
    assert four.pp * four.ep == 4
    per_node = plan_deployment(cfg, Hardware(2, 2, 80 * GB))
    assert per_node.pp * per_node.ep == 4 and per_node.ep <= 2 and per_node.nodes_per_replica == 2


def test_auto_with_min_batch_passes_over_replicas_that_hold_too_few_sequences(capsys):
    """The smallest Super replica on H200s holds a sequence or two; `--min-batch` asks for a useful one."""
    cfg = get_preset(SUPER)
    hw = Hardware(8, 1, 141 * GB)
    smallest = plan_deployment(cfg, hw)
    useful = plan_deployment(cfg, hw, min_batch=32)
    assert smallest.max_batch < 32 <= useful.max_batch
    assert useful.pp * useful.ep > smallest.pp * smallest.ep
    assert any(f"pp={smallest.pp} ep={smallest.ep}: fits, but only" in w for w in useful.why)
    code, out, _ = run(capsys, "--model", SUPER, "--gpus", "8", "--gpu-memory-gb", "141")   # the CLI asks for 32
    assert code == 0
    assert f"layout: pp={useful.pp} x ep={useful.ep}" in out


# ---- refusals --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("argv,reasons", [
    (["--gpus", "1", "--gpu-memory-gb", "24"], ["weights alone exceed memory", "247.2 GB", "short by 225.6 GB"]),
    ([*H200, "-ep", "3"], ["expert_parallel_size: 3 does not divide the 512 routed experts"]),
    (["-pp", "2", "-ep", "8", "--gpus", "8", "--nodes", "1", "--gpu-memory-gb", "141"],
     ["2 x 8 = 16 GPUs per replica, but 8 GPUs x 1 node(s) = 8"]),
    ([*H200, "-pp", "89", "--nodes", "12"], ["89 stages for the 88 layers"]),
    ([*H200, "-pp", "1", "-ep", "2"], ["weights do not fit pp=1 ep=2", "short by 7.6 GB"]),
    ([*H200, "-pp", "3", "-ep", "1"], ["3 GPUs per replica must divide the 8 GPUs of a node"]),
])
def test_impossible_layouts_are_refused_with_the_reason(capsys, argv, reasons):
    rc, out, err = run(capsys, "--model", SUPER, *argv)
    assert rc == 2 and out == ""
    assert err.startswith("hybridserve plan: refused: ")
    for r in reasons:
        assert r in err, err


def test_a_negative_draft_count_is_refused_by_the_parser(capsys):
    with pytest.raises(SystemExit) as e:
        main(["plan", "--model", SUPER, *H200, "--num-speculative-tokens", "-1"])
    assert e.value.code == 2 and "--num-speculative-tokens: must be >= 0" in capsys.readouterr().err


def test_bad_model_is_refused(capsys):
    rc, _, err = run(capsys, "--model", "no-such-model")
    assert rc == 2 and "neither a checkpoint folder" in err


# ---- Helm values -----------------------------------------------------------------------------------------
def test_values_file_has_exactly_the_charts_keys_and_agrees_with_the_plan(capsys, tmp_path):
    yaml = pytest.importorskip("yaml")
    argv = ["--model", SUPER, *H200, "--nodes", "2", "--max-model-len", "8192", "--num-speculative-tokens", "3"]
    d = plan_json(capsys, *argv)
    path = tmp_path / "values.yaml"
    rc, out, err = run(capsys, *argv, "--output", "values", "--output-file", str(path))
    assert rc == 0 and out == "", err
    text = path.read_text()
    header = text.splitlines()[0]
    assert header.startswith("# hybridserve plan ")
    v = yaml.safe_load(text)
    assert list(v) == ["serve", "workerGroups", "replicas"]
    assert list(v["serve"]) == ["model", "pipelineParallelSize", "expertParallelSize", "numSpeculativeTokens",
                                "maxModelLen", "maxNumSeqs", "gpuMemoryUtilization"]
    assert list(v["workerGroups"]) == ["gpu"]
    assert list(v["workerGroups"]["gpu"]) == ["gpusPerWorker", "minWorkers", "maxWorkers"]
    assert list(v["replicas"]) == ["min", "max"]
    lay = d["layout"]
    assert v["serve"] == {"model": SUPER, "pipelineParallelSize": lay["pipeline_parallel_size"],
                          "expertParallelSize": lay["expert_parallel_size"], "numSpeculativeTokens": 3,
                          "maxModelLen": 8192, "maxNumSeqs": min(d["max_batch"], 256), "gpuMemoryUtilization": 0.9}
    assert v["workerGroups"]["gpu"] == {"gpusPerWorker": 8, "minWorkers": lay["nodes_per_replica"], "maxWorkers": 2}
    assert v["replicas"] == {"min": 1, "max": lay["max_replicas"]} and v["replicas"]["max"] >= 1
    assert v == d["helm_values"]
    # The header is the command that produced the file: run again, the same file.
    rc, out, _ = run(capsys, *shlex.split(header[2:])[2:])
    assert rc == 0 and out == text


def test_cpu_plan_values(capsys):
    yaml = pytest.importorskip("yaml")
    rc, out, err = run(capsys, "--model", "small", "--output", "values")
    assert rc == 0, err
    v = yaml.safe_load(out)
    assert v["workerGroups"] == {"cpu": {"gpusPerWorker": 0, "minWorkers": 1, "maxWorkers": 1}, "gpu": None}
    assert v["replicas"] == {"min": 1, "max": 1}
    assert v["serve"]["pipelineParallelSize"] == v["serve"]["expertParallelSize"] == 1


# ---- the plan's memory figures against a real engine's allocations ------------------------------------
def _caches(cache) -> tuple[int, int]:
    ms = cache.mamba_states
    kv = storage_bytes([t for c in cache.kv.values() for t in (c.k, c.v)])
    return kv, storage_bytes([ms.conv, ms.ssm, ms.scratch_conv, ms.scratch_cum, ms.scratch_dtx, ms.scratch_B])


@pytest.mark.parametrize("model,k", [("default", 0), ("default", 3), ("small", 2)])
def test_cpu_plan_matches_what_the_engine_allocates(capsys, preset_cache, model, k):
    pytest.importorskip("torch")
    from router.engine import AsyncEngine
    from router.engine_config import EngineConfig

    d = plan_json(capsys, "--model", model, "--max-model-len", "512", "--num-speculative-tokens", str(k))
    engine = AsyncEngine(EngineConfig(model=model, use_ray=False, model_process=False, num_speculative_tokens=k,
                                      max_model_len=512, max_num_seqs=4))
    try:
        worker = engine.executor.worker
        weights = weight_bytes(worker.model)
        kv, mamba = _caches(worker.cache)
        blocks, slots = engine.blocks.num_blocks, engine.blocks.num_slots
    finally:
        engine.executor.shutdown()
    seq, gpu = d["per_sequence"], d["gpus"][0]
    print(f"\n{model} k={k}: weights {weights} vs plan {gpu['weight_bytes']}; KV/block {kv / blocks} vs "
          f"{seq['kv_block_bytes']}; Mamba/slot {mamba / slots} vs {seq['mamba_slot_bytes']}")
    assert gpu["weight_bytes"] == pytest.approx(weights, rel=0.10)
    assert seq["kv_block_bytes"] == pytest.approx(kv / blocks, rel=0.10)
    assert seq["mamba_slot_bytes"] == pytest.approx(mamba / slots, rel=0.10)
    assert blocks == slots * seq["kv_blocks"]                   # room for max_num_seqs sequences of 512 tokens
    assert seq["kv_bytes"] == pytest.approx(kv / slots, rel=0.10)
    assert d["stages"][0]["weight_bytes"] == gpu["weight_bytes"]


def test_cpu_plan_per_device_weights_match_real_stages_and_expert_shards(capsys, preset_cache):
    """-pp 2 -ep 2 built as the Ray actors build it (stage actor with expert rank 0 and the MTP block whole,
    expert-shard modules for the other ranks), without Ray."""
    pytest.importorskip("torch")
    from cluster.expert_shard import ExpertShard
    from cluster.worker import StageWorker
    from model_shards.weights import load_checkpoint, read_config
    from router.engine_config import resolve_checkpoint

    d = plan_json(capsys, "--model", "small", "-pp", "2", "-ep", "2", "--max-model-len", "256",
                  "--num-speculative-tokens", "1")
    folder = resolve_checkpoint("small")
    cfg = read_config(folder)
    for g in d["gpus"]:
        lo, hi = d["stages"][g["stage"]]["layers"]
        if g["role"].startswith("stage actor"):
            model = load_checkpoint(folder, layers=range(lo, hi + 1), expert_range=tuple(g["expert_range"]))
            worker = StageWorker(model, num_blocks=4, block_size=16, num_slots=2, max_verify_positions=2)
            real = weight_bytes(worker.model)
            kv, mamba = _caches(worker.cache)
            st = d["stages"][g["stage"]]
            assert st["kv_block_bytes"] == pytest.approx(kv / 4, rel=0.10)
            assert st["mamba_slot_bytes"] == pytest.approx(mamba / 2, rel=0.10)
        else:
            shard = ExpertShard.load(cfg, folder, range(lo, hi + 1), tuple(g["expert_range"]))
            real = storage_bytes([*shard.parameters()])
        assert g["weight_bytes"] == pytest.approx(real, rel=0.10), g
