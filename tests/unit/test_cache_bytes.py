"""The planner's byte counts are what the stage worker really allocates, in float32 and in bfloat16.

Why: the planner sizes KV blocks and Mamba slots from arithmetic alone (cluster/cost_model.py); if its
bytes per element differ from the caches' (a float32 KV cache under a 2-byte plan, say), a GPU replica
over-commits its memory or wastes it. Here the caches and weights of a small preset are built on the CPU
in each dtype (allocation only: no bf16 compute) and compared byte for byte with `plan_replica` and
with what `hybridserve plan` prints (cluster/plan_report.py). The KV cache follows the model's dtype;
Mamba states (conv and SSM) and their verification scratch stay float32 (the model card's SSM state).
"""
from __future__ import annotations

import pytest
import torch

from cluster.cost_model import DTYPE_BYTES, kv_block_bytes_per_layer, mamba_slot_bytes_per_layer
from cluster.plan_report import Hardware, plan_deployment
from cluster.worker import StageWorker
from model_shards.config import ATTENTION, MAMBA
from model_shards.model import HybridModel
from model_shards.presets import get_preset
from model_shards.weights import checkpoint_dtype, load_checkpoint, resolve_dtype, save_checkpoint
from tests.engine_helpers import storage_bytes, weight_bytes

BLOCK, BLOCKS, SLOTS, K = 16, 6, 3, 2
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
GB = 10 ** 9


@pytest.fixture(scope="module", params=[(p, d) for p in ("tiny", "small") for d in DTYPES],
                ids=lambda v: f"{v[0]}-{v[1]}")
def built(request, preset_cache):
    """(cfg, k, dtype name, worker): the whole model of a preset loaded in that dtype, with its caches."""
    from router.engine_config import resolve_checkpoint

    name, dtype = request.param
    model = load_checkpoint(resolve_checkpoint(name), dtype=DTYPES[dtype])
    k = K if model.cfg.has_mtp else 0
    worker = StageWorker(model, num_blocks=BLOCKS, block_size=BLOCK, num_slots=SLOTS, max_verify_positions=k + 1)
    return model.cfg, k, dtype, worker


def _plan(cfg, k: int, dtype: str, gpus: int):
    hw = Hardware(gpus_per_node=gpus, memory_bytes=4 * GB, dtype=dtype)
    return plan_deployment(cfg, hw, pp=1, ep=1, max_model_len=256, num_speculative_tokens=k, block_size=BLOCK)


def test_kv_cache_in_the_model_dtype_and_mamba_states_float32(built):
    _, _, dtype, worker = built
    cache = worker.cache
    assert worker.model.dtype == DTYPES[dtype]
    assert cache.kv and all(c.k.dtype == c.v.dtype == DTYPES[dtype] for c in cache.kv.values())
    ms = cache.mamba_states
    for t in (ms.conv, ms.ssm, ms.scratch_conv, ms.scratch_cum, ms.scratch_dtx, ms.scratch_B):
        assert t.dtype == torch.float32


@pytest.mark.parametrize("gpus", [0, 1], ids=["cpu-plan", "gpu-plan"])
def test_planned_cache_bytes_equal_the_allocated_ones(built, gpus):
    cfg, k, dtype, worker = built
    cache, ms = worker.cache, worker.cache.mamba_states
    kv = storage_bytes([t for c in cache.kv.values() for t in (c.k, c.v)])                  # BLOCKS blocks
    mamba = storage_bytes([ms.conv, ms.ssm, ms.scratch_conv, ms.scratch_cum, ms.scratch_dtx, ms.scratch_B])  # SLOTS slots
    state = storage_bytes([ms.conv, ms.ssm])
    b = DTYPE_BYTES[dtype]
    n_attn = len(cache.kv)                                   # backbone attention layers + the MTP block's
    n_mamba = cfg.hybrid_override_pattern.count(MAMBA)
    assert n_attn == cfg.hybrid_override_pattern.count(ATTENTION) + (
        cfg.mtp_hybrid_override_pattern.count(ATTENTION) if cfg.has_mtp else 0)
    # cost model, per layer
    assert kv == BLOCKS * n_attn * kv_block_bytes_per_layer(cfg, BLOCK, b)
    assert mamba == SLOTS * n_mamba * mamba_slot_bytes_per_layer(cfg, k + 1)
    # the plan, and what `hybridserve plan` prints
    plan = _plan(cfg, k, dtype, gpus)
    d = plan.to_dict()
    assert plan.replica.devices.kv_dtype_bytes == plan.replica.devices.weight_dtype_bytes == b
    assert d["dtype"] == {"weights": dtype, "kv_cache": dtype, "mamba_state": "float32"}
    seq, stage = d["per_sequence"], d["stages"][0]
    assert kv == BLOCKS * seq["kv_block_bytes"] == BLOCKS * stage["kv_block_bytes"]
    assert mamba == SLOTS * seq["mamba_slot_bytes"] == SLOTS * stage["mamba_slot_bytes"]
    assert state == SLOTS * seq["mamba_state_bytes"] == SLOTS * (seq["mamba_conv_bytes"] + seq["mamba_ssm_bytes"])
    assert seq["kv_bytes"] == seq["kv_blocks"] * seq["kv_block_bytes"]


@pytest.mark.parametrize("gpus", [0, 1], ids=["cpu-plan", "gpu-plan"])
def test_planned_weight_bytes_equal_the_loaded_ones(built, gpus):
    cfg, k, dtype, worker = built
    model = worker.model
    # On a GPU the drafter keeps no float16 copies ("auto" drafts in the model's dtype there): this
    # CPU-built worker's copies count only against the CPU plan.
    real = weight_bytes(model) if gpus == 0 else storage_bytes([*model.parameters(), *model.buffers()])
    d = _plan(cfg, k, dtype, gpus).to_dict()
    assert d["stages"][0]["weight_bytes"] == d["gpus"][0]["weight_bytes"] == real


def test_auto_dtype_is_float32_on_cpu_and_the_checkpoint_dtype_on_gpu(tmp_path):
    with torch.no_grad():
        model = HybridModel(get_preset("tiny")).init_random(0)
    save_checkpoint(model.to(torch.bfloat16), tmp_path)
    assert checkpoint_dtype(tmp_path) == torch.bfloat16          # the float32 router bias does not count
    assert resolve_dtype("auto", "cpu", tmp_path) == torch.float32
    assert resolve_dtype("auto", "cuda", tmp_path) == torch.bfloat16
    assert resolve_dtype("float16", "cuda") == torch.float16
    with pytest.raises(ValueError, match="dtype"):
        resolve_dtype("int8", "cpu")
    loaded = load_checkpoint(tmp_path)                           # auto on the CPU: float32, as always
    assert loaded.dtype == torch.float32
    assert loaded.make_cache(num_blocks=2, block_size=4, num_slots=1).kv[2].k.dtype == torch.float32
    assert load_checkpoint(tmp_path, dtype="bfloat16").dtype == torch.bfloat16


def test_engine_plans_and_allocates_in_its_dtype(preset_cache):
    """EngineConfig.dtype reaches the loader, the caches and the plan (allocation only; nothing runs)."""
    from router.engine import AsyncEngine
    from router.engine_config import EngineConfig

    with pytest.raises(ValueError, match="dtype"):
        EngineConfig(dtype="int8").validate()
    for name, expected in (("auto", torch.float32), ("bfloat16", torch.bfloat16)):
        engine = AsyncEngine(EngineConfig(model="tiny", dtype=name, max_model_len=64, max_num_seqs=2))
        try:
            worker = engine.executor.worker
            assert engine.config.dtype == str(expected).removeprefix("torch.")
            assert worker.model.dtype == expected
            assert all(c.k.dtype == expected for c in worker.cache.kv.values())
            assert engine.plan.devices.kv_dtype_bytes == engine.plan.devices.weight_dtype_bytes == \
                expected.itemsize
            kv = storage_bytes([t for c in worker.cache.kv.values() for t in (c.k, c.v)])
            assert kv == engine.blocks.num_blocks * sum(s.kv_block_bytes for s in engine.plan.stages)
        finally:
            engine.executor.shutdown()
