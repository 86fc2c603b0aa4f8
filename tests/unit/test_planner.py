"""Planner and parallel degrees: pure arithmetic, no Ray, no torch (except the cross-checks against the
real modules, which build the small presets only)."""
from __future__ import annotations

import pytest

from cluster.parallel import ParallelConfig, ParallelConfigError
from cluster.planner import (DeviceSpec, PlanError, balanced_split, kv_block_bytes_per_layer, layer_cost,
                             mamba_slot_bytes_per_layer, plan_replica)
from model_shards.params import mtp_parameters
from model_shards.presets import get_preset

SUPER = "nemotron-3-super-120b-a12b"
# Balance bound: contiguous ranges cannot beat ideal + one indivisible unit; for the 120B config at pp 2
# and 4 we hold the plan to within 2% of the ideal (the unit is ~2% of a stage there).
BALANCE_FACTOR = 1.02


@pytest.fixture(scope="module")
def super_cfg():
    return get_preset(SUPER)


def _check_cover(plan, n_layers):
    bounds = plan.stage_bounds
    assert bounds[0][0] == 0 and bounds[-1][1] == n_layers
    assert all(a < b for a, b in bounds)                                  # non-empty
    assert all(bounds[i][1] == bounds[i + 1][0] for i in range(len(bounds) - 1))  # contiguous
    owners = [plan.stage_of_layer(i) for i in range(n_layers)]
    assert owners == sorted(owners) and len(set(owners)) == len(bounds)


@pytest.mark.parametrize("pp,ep", [(2, 4), (4, 2), (8, 1), (1, 8)])
def test_super_plan_on_8_h200(super_cfg, pp, ep):
    plan = plan_replica(super_cfg, ParallelConfig(pp, ep), DeviceSpec.h200(8))
    _check_cover(plan, super_cfg.num_hidden_layers)
    # Layer kinds add up, and only the ends carry the extras.
    for kind in "M*E-":
        assert sum(s.kind_counts[kind] for s in plan.stages) == super_cfg.hybrid_override_pattern.count(kind)
    assert plan.stages[0].has_embedding and plan.stages[-1].has_head and plan.stages[-1].has_mtp
    assert not any(s.has_head for s in plan.stages[:-1])
    # Balanced: within the indivisible-unit bound always, and within BALANCE_FACTOR for pp 2 and 4.
    unit = max(layer_cost(super_cfg, k, plan.context_len).flops + layer_cost(super_cfg, k, plan.context_len).expert_flops / ep
               for k in "M*E")
    worst = max(s.flops_per_token for s in plan.stages)
    assert worst <= plan.ideal_stage_flops + unit
    if pp in (2, 4):
        assert plan.imbalance <= BALANCE_FACTOR, plan.table()
    # Experts: every stage's shards cover 0..E-1 exactly once, in equal contiguous slices.
    for s in range(pp):
        covered = sorted(e for x in plan.shards_of_stage(s) for e in range(*x.experts))
        assert covered == list(range(super_cfg.n_routed_experts))
        assert len({x.experts[1] - x.experts[0] for x in plan.shards_of_stage(s)}) == 1
    # Capacity is positive and is the min over stages.
    assert plan.max_num_seqs > 0 and plan.num_kv_blocks > 0
    assert plan.num_kv_blocks == min(s.num_kv_blocks for s in plan.stages)
    assert all(s.max_seqs is None or s.max_seqs >= plan.max_num_seqs for s in plan.stages)
    usable = plan.devices.usable_bytes
    for s in plan.stages:
        used = s.weight_bytes + plan.max_num_seqs * s.slot_bytes + s.num_kv_blocks * s.kv_block_bytes
        assert used <= usable
    # Ranks and devices: distinct, within the replica.
    ranks = [s.rank for s in plan.stages] + [x.rank for x in plan.expert_shards]
    assert sorted(ranks) == list(range(ParallelConfig(pp, ep).actors_per_replica))
    assert sorted(x.device for x in plan.expert_shards) == list(range(pp * ep))


def test_super_plan_table_and_parameter_totals(super_cfg):
    plan = plan_replica(super_cfg, ParallelConfig(2, 4), DeviceSpec.h200(8))
    text = plan.table()
    print("\n" + text)
    assert "max_num_seqs" in text and "KV blocks" in text
    assert all(f"{st.start}-{st.stop - 1}" in text for st in plan.stages)
    mtp = mtp_parameters(super_cfg).total
    # MODEL.md: about 120.7B parameters without MTP, MTP about 2.9B, about 12.7B active.
    assert plan.total_params - mtp == pytest.approx(120.7e9, rel=0.005)
    assert mtp == pytest.approx(2.9e9, rel=0.05)


def test_super_does_not_fit_one_h200(super_cfg):
    with pytest.raises(PlanError) as e:
        plan_replica(super_cfg, ParallelConfig(), DeviceSpec.h200(1))
    msg = str(e.value)
    assert msg.startswith("stage 0 (layers 0-87)") and "weights need" in msg and "available" in msg
    assert "247222108160 bytes" in msg            # needed, exact (router biases in float32)
    assert str(DeviceSpec.h200(1).usable_bytes) in msg


def test_super_too_big_for_fewer_stages_names_the_stage(super_cfg):
    with pytest.raises(PlanError, match=r"^stage \d \(layers \d+-\d+\): weights need .* available"):
        plan_replica(super_cfg, ParallelConfig(2, 1), DeviceSpec.h100(2))


def test_super_minimum_bf16_is_4_h200(super_cfg):
    """MODEL.md: BF16 needs 4 x H100/H200. On 2 x H200 the weights (247 GB) fill all but a few GB: one
    stage has room for a single sequence's Mamba state, which is no deployment; 4 x H200 serve hundreds."""
    plan = plan_replica(super_cfg, ParallelConfig(4, 1), DeviceSpec.h200(4))
    assert plan.max_num_seqs >= 128 and plan.num_kv_blocks >= plan.max_num_seqs * 512
    assert plan_replica(super_cfg, ParallelConfig(2, 1), DeviceSpec.h200(2)).max_num_seqs <= 1


def test_memory_moves_the_split_off_the_cost_optimum(super_cfg):
    """With just too little memory for the FLOP-balanced split, the DP moves layers to the other stage."""
    free = plan_replica(super_cfg, ParallelConfig(2, 4), DeviceSpec.h200(8))
    usable = max(s.weight_bytes for s in free.stages) - 10 ** 9
    dev = DeviceSpec("cuda", 8, int(usable / 0.9) + 1, reserve_fraction=0.1)
    plan = plan_replica(super_cfg, ParallelConfig(2, 4), dev)
    assert plan.stage_bounds != free.stage_bounds
    assert max(s.weight_bytes for s in plan.stages) <= dev.usable_bytes
    assert plan.imbalance >= free.imbalance


def test_no_room_for_one_sequence_names_the_stage():
    cfg = get_preset("small")
    big = plan_replica(cfg, ParallelConfig(), DeviceSpec.cpu(1, 2 ** 30), context_len=512)
    dev = DeviceSpec.cpu(1, int((big.stages[0].weight_bytes + 1000) / 0.9) + 1)
    with pytest.raises(PlanError, match=r"^stage 0 \(layers 0-11\): after .* cannot hold one sequence of 512"):
        plan_replica(cfg, ParallelConfig(), dev, context_len=512)


def test_too_few_devices_names_the_field(super_cfg):
    with pytest.raises(PlanError, match="^devices: 4 .* num_replicas 1 x pipeline_parallel_size 2"):
        plan_replica(super_cfg, ParallelConfig(2, 4), DeviceSpec.h200(4))


@pytest.mark.parametrize("name,pp,ep", [("tiny", 1, 1), ("tiny", 2, 2), ("small", 2, 2), ("small", 3, 1)])
def test_small_presets_plan_on_cpu(name, pp, ep):
    cfg = get_preset(name)
    dev = DeviceSpec.cpu(pp * ep, 256 * 2 ** 20)
    plan = plan_replica(cfg, ParallelConfig(pp, ep), dev, context_len=512, max_num_seqs=8)
    _check_cover(plan, cfg.num_hidden_layers)
    assert plan.max_num_seqs == 8 and plan.num_kv_blocks > 0
    assert dev.weight_dtype_bytes == 4 and dev.kind == "cpu"
    assert "slots" in plan.table()


def test_cpu_default_budget_is_bounded():
    dev = DeviceSpec.cpu(2)
    assert 0 < dev.memory_bytes <= 2 * 2 ** 30


def test_cache_sizes_match_the_cache_module():
    torch = pytest.importorskip("torch")  # noqa: F841  (cache.py allocates with torch)
    from model_shards.cache import MambaStateCache, PagedKVCache
    for name in ("tiny", "small", SUPER):
        cfg = get_preset(name)
        assert kv_block_bytes_per_layer(cfg, 16, 2) == PagedKVCache.bytes_per_block(cfg, 16, 2)
        assert mamba_slot_bytes_per_layer(cfg, 4) == MambaStateCache.bytes_per_slot(cfg, 4)


@pytest.mark.parametrize("name,pp,ep", [("tiny", 1, 1), ("tiny", 2, 1), ("small", 2, 2)])
def test_parameter_counts_match_the_model(name, pp, ep):
    """Every stage's counted parameters (+ the router-bias buffer) equal the real stage module's."""
    pytest.importorskip("torch")
    from model_shards.model import HybridModel
    cfg = get_preset(name)
    plan = plan_replica(cfg, ParallelConfig(pp, ep), DeviceSpec.cpu(pp * ep, 2 ** 28), context_len=64)
    for s in plan.stages:
        m = HybridModel(cfg, s.layers)                          # all experts of its layers, in-process
        real = sum(p.numel() for p in m.parameters()) + sum(b.numel() for b in m.buffers())
        assert real == s.params + s.expert_params, (name, s.index)
        ep_slices = plan.shards_of_stage(s.index)
        assert sum(x.params for x in ep_slices) == s.expert_params


def test_parameter_totals_match_params_module():
    from model_shards.params import count_parameters
    for name in ("tiny", "small", SUPER):
        cfg = get_preset(name)
        plan = plan_replica(cfg, ParallelConfig(), DeviceSpec("cuda", 1, 10 ** 13), context_len=64)
        total, active = count_parameters(cfg, include_mtp=True)
        assert (total, active) == (plan.total_params, plan.active_params), name


def test_balanced_split_is_exact_on_a_toy_problem():
    costs = [5, 1, 1, 1, 5, 1, 1, 1, 5]
    pre = [0]
    for c in costs:
        pre.append(pre[-1] + c)
    key = lambda i, j: (pre[j] - pre[i],)  # noqa: E731
    best = balanced_split(len(costs), 3, key, lambda i, j: True)
    # Brute force over all cut pairs.
    brute = min(max(pre[a], pre[b] - pre[a], pre[-1] - pre[b]) for a in range(1, 8) for b in range(a + 1, 9))
    assert max(key(i, j)[0] for i, j in best) == brute
    assert balanced_split(3, 2, key, lambda i, j: j - i == 5) is None


def test_speculative_tokens_need_mtp_and_grow_the_slots():
    nano = get_preset("nemotron-3-nano-30b-a3b")
    with pytest.raises(PlanError, match="^num_speculative_tokens"):
        plan_replica(nano, ParallelConfig(1, 1), DeviceSpec.h200(1), num_speculative_tokens=2)
    cfg = get_preset(SUPER)
    a = plan_replica(cfg, ParallelConfig(2, 4), DeviceSpec.h200(8), num_speculative_tokens=1)
    b = plan_replica(cfg, ParallelConfig(2, 4), DeviceSpec.h200(8), num_speculative_tokens=5)
    assert b.stages[0].slot_bytes > a.stages[0].slot_bytes and b.max_num_seqs <= a.max_num_seqs


def test_kv_blocks_per_sequence_count_the_mtp_drafting_positions():
    """A sequence of context_len tokens needs KV for its last pass (context_len - 1 positions) plus the k
    positions MTP drafting writes past it: what the scheduler asks of the block manager (kv_positions)."""
    cfg, dev = get_preset("tiny"), DeviceSpec.cpu(1, 2 ** 28)
    plain = plan_replica(cfg, ParallelConfig(), dev, block_size=16, context_len=64, num_speculative_tokens=0)
    mtp = plan_replica(cfg, ParallelConfig(), dev, block_size=16, context_len=64, num_speculative_tokens=3)
    assert (plain.blocks_per_seq, mtp.blocks_per_seq) == (4, 5)          # ceil(63 / 16), ceil(66 / 16)
    for plan in (plain, mtp):
        st = plan.stages[0]
        assert st.max_seqs == st.free_bytes // (st.slot_bytes + plan.blocks_per_seq * st.kv_block_bytes)
        assert plan.num_kv_blocks >= plan.max_num_seqs * plan.blocks_per_seq
    # Memory for one sequence without the drafting positions is not memory for one sequence.
    one = mtp.stages[0].weight_bytes + mtp.stages[0].slot_bytes + 4 * mtp.stages[0].kv_block_bytes
    with pytest.raises(PlanError, match=r"cannot hold one sequence of 64 tokens .* \+ 5 KV blocks"):
        plan_replica(cfg, ParallelConfig(), DeviceSpec.cpu(1, int(one / 0.9) + 1), block_size=16, context_len=64,
                     num_speculative_tokens=3)


def test_the_planned_blocks_per_sequence_cover_the_schedulers_worst_case():
    """max_num_seqs x blocks_per_seq blocks (which num_kv_blocks covers) hold max_num_seqs sequences of
    context_len tokens at their worst case (drafts included) all at once, as the scheduler sizes them."""
    from model_shards.sampling_params import SamplingParams
    from router.block_manager import BlockManager
    from router.scheduler import Scheduler, SchedulerConfig
    from router.sequence import Sequence
    cfg = get_preset("tiny")
    plan = plan_replica(cfg, ParallelConfig(), DeviceSpec.cpu(1, 2 ** 24), block_size=16, context_len=64,
                        num_speculative_tokens=3, max_num_seqs=4)
    n = plan.max_num_seqs
    s = Scheduler(SchedulerConfig(max_num_seqs=n, max_num_batched_tokens=64 * n, max_model_len=64),
                  BlockManager(n * plan.blocks_per_seq, 16, n))
    for i in range(n):
        s.add(Sequence(i, f"r{i}", [5] * 60, SamplingParams(max_tokens=100), 0, 3))
    assert len(s.schedule().seqs) == n
    for q in s.running:
        s.blocks.grow(q, s.max_positions(q))              # each at its worst case, all at once


# ---- ParallelConfig ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("field", ["pipeline_parallel_size", "expert_parallel_size", "num_replicas"])
@pytest.mark.parametrize("bad", [0, -1, 1.5, True])
def test_parallel_degrees_must_be_positive_ints(field, bad):
    with pytest.raises(ParallelConfigError, match=f"^{field}:"):
        ParallelConfig(**{field: bad})


def test_parallel_errors_name_the_field(super_cfg):
    with pytest.raises(ParallelConfigError, match="^expert_parallel_size: 3 must divide n_routed_experts 512"):
        ParallelConfig(expert_parallel_size=3).check_model(super_cfg)
    with pytest.raises(ParallelConfigError, match="^pipeline_parallel_size: 89 stages for 88 layers"):
        ParallelConfig(pipeline_parallel_size=89).check_model(super_cfg)
    no_moe = get_preset("tiny").replace(hybrid_override_pattern="M*M-", num_nextn_predict_layers=0,
                                        mtp_hybrid_override_pattern="")
    with pytest.raises(ParallelConfigError, match="^expert_parallel_size: 2 > 1 but"):
        ParallelConfig(expert_parallel_size=2).check_model(no_moe)
    with pytest.raises(ParallelConfigError, match="^expert_parallel_size:"):  # through the planner too
        plan_replica(super_cfg, ParallelConfig(1, 3), DeviceSpec.h200(8))
    with pytest.raises(ParallelConfigError, match="^bogus:"):
        ParallelConfig.from_dict({"pp": 2, "bogus": 1})


def test_parallel_sizes_and_slices():
    p = ParallelConfig.from_dict({"pp": 2, "ep": 4, "replicas": 3})
    assert (p.devices_per_replica, p.world_size, p.actors_per_replica) == (8, 24, 10)
    assert ParallelConfig.from_dict(p.to_dict()) == p
    assert p.expert_ranges(512) == [(0, 128), (128, 256), (256, 384), (384, 512)]
    assert ParallelConfig(4, 2).expert_ranges(8) == [(0, 4), (4, 8)]
