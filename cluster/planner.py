"""Replica planner: stage split, expert slices, weight memory and cache capacity, by arithmetic alone.

Why a planner: a Mamba layer, an attention layer and a latent-MoE layer cost very different amounts,
the first and last stages carry the embedding and the head (+ MTP block), and what is left of each
device after its weights decides how many sequences (Mamba slots) and tokens (KV blocks) a replica can
admit. Computing all of it from the config alone lets us plan the real 120B model on a laptop and the
small models for real on CPU. No torch here: this is imported by the engine loop and the CLI.

Cost model: per-token FLOPs and parameters of each layer kind, in `cluster/cost_model.py`
(re-exported here).

The stage split minimises the maximum stage cost over contiguous ranges exactly (dynamic programme,
O(pp * n^2)), subject to every stage device holding its weights plus one sequence's caches (weights
alone when no split allows that, and then the capacity check names the stage); ties go to the split
with less weight memory on the fullest stage device.

Placement: stage s owns devices s*ep .. s*ep+ep-1 of the replica; expert shard r sits on device s*ep+r,
and the stage actor shares the device of shard 0, so that device also holds the stage's caches. The last
stage's device also holds the MTP block whole (its routed experts are not sharded) and the drafter's copies.
Transport ranks: stage actors 0..pp-1, then expert shard (s, r) at pp + s*ep + r.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Callable

from model_shards.config import ATTENTION, MAMBA, MLP, MOE, ModelConfig
from cluster.contracts import kv_positions

from .cost_model import (DTYPE_BYTES, LayerCost, PlanError, _embedding, _head, _mtp,  # noqa: F401
                         draft_dtype_bytes, drafter_bytes, kv_block_bytes_per_layer, layer_cost, layer_costs,
                         mamba_slot_bytes_per_layer, router_bias_extra_bytes)
from .parallel import ParallelConfig

GiB = 1024 ** 3
_KINDS = (MAMBA, ATTENTION, MOE, MLP)


@dataclasses.dataclass(frozen=True)
class DeviceSpec:
    """The devices a deployment may use: `count` alike, `memory_bytes` each.

    "cpu" devices are budgets carved out of host RAM (all actors share it); weights and KV default to
    float32 there because that is what the CPU path computes in.
    """

    kind: str
    count: int
    memory_bytes: int
    weight_dtype_bytes: int = 2
    kv_dtype_bytes: int = 2
    reserve_fraction: float = 0.10  # activations, CUDA context, allocator slack (vLLM's 0.9 utilisation)
    name: str = ""

    def __post_init__(self) -> None:
        if self.kind not in ("cuda", "cpu"):
            raise PlanError(f"kind: expected 'cuda' or 'cpu', found {self.kind!r}")
        if self.count < 1:
            raise PlanError(f"count: must be >= 1, found {self.count}")
        if self.memory_bytes <= 0:
            raise PlanError(f"memory_bytes: must be > 0, found {self.memory_bytes}")
        for f in ("weight_dtype_bytes", "kv_dtype_bytes"):
            if getattr(self, f) not in (1, 2, 4, 8):
                raise PlanError(f"{f}: must be 1, 2, 4 or 8, found {getattr(self, f)}")
        if not 0.0 <= self.reserve_fraction < 1.0:
            raise PlanError(f"reserve_fraction: must be in [0, 1), found {self.reserve_fraction}")

    @property
    def usable_bytes(self) -> int:
        """What weights and caches may use on one device."""
        return int(self.memory_bytes * (1.0 - self.reserve_fraction))

    @classmethod
    def h200(cls, count: int = 8, **kw) -> "DeviceSpec":
        return cls("cuda", count, 141 * 10 ** 9, name="H200 141GB", **kw)

    @classmethod
    def h100(cls, count: int = 8, **kw) -> "DeviceSpec":
        return cls("cuda", count, 80 * 10 ** 9, name="H100 80GB", **kw)

    @classmethod
    def cpu(cls, count: int = 1, memory_bytes: int | None = None, **kw) -> "DeviceSpec":
        """Local CPU 'devices'. Default budget: half the RAM available now split evenly, at most 2 GiB each
        (caches are allocated up front; a local run should not take the whole machine)."""
        if memory_bytes is None:
            import psutil
            memory_bytes = min(int(psutil.virtual_memory().available * 0.5) // count, 2 * GiB)
        kw.setdefault("weight_dtype_bytes", 4)
        kw.setdefault("kv_dtype_bytes", 4)
        return cls("cpu", count, memory_bytes, name=kw.pop("name", "cpu"), **kw)


# ---- the plan ----------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class StagePlan:
    """One pipeline stage: layers [start, stop), what it carries, what its device holds and can cache."""

    index: int
    start: int
    stop: int
    kind_counts: dict            # {"M": 22, "*": 4, "E": 18, "-": 0}
    has_embedding: bool          # first stage, or the last when MTP / tied weights need a copy
    has_head: bool               # norm_f + lm_head
    has_mtp: bool
    rank: int                    # transport rank of the stage actor
    device: int                  # device index within the replica (shared with expert shard 0)
    params: int                  # non-expert parameters (the stage actor's)
    expert_params: int           # routed-expert parameters of the stage, all EP shards together
    active_params: int           # per token: non-expert + k of E experts
    flops_per_token: float       # cost model: non-expert + routed/ep
    weight_bytes: int            # on `device`: stage actor + expert shard 0 (+ the drafter's copies)
    free_bytes: int              # on `device` after the reserve and the weights
    kv_block_bytes: int          # one block id over all attention layers of the stage (+ MTP's)
    slot_bytes: int              # one sequence slot over all Mamba layers of the stage (+ scratch)
    max_seqs: int | None         # slots this stage alone could give at context_len (None: no constraint)
    num_kv_blocks: int | None    # blocks left after the replica's max_num_seqs slots (None: no attention)
    draft_bytes: int = 0         # of weight_bytes: the drafter's copies of MTP block / lm_head (last stage)

    @property
    def layers(self) -> range:
        return range(self.start, self.stop)


@dataclasses.dataclass(frozen=True)
class ExpertShardPlan:
    """Expert shard `ep_rank` of stage `stage`: experts [first, stop) of each MoE layer of the stage."""

    stage: int
    ep_rank: int
    experts: tuple[int, int]
    rank: int
    device: int
    params: int
    weight_bytes: int


@dataclasses.dataclass(frozen=True)
class ReplicaPlan:
    """Everything the engine needs to place one replica and size its caches."""

    model: str
    parallel: ParallelConfig
    devices: DeviceSpec
    block_size: int
    num_speculative_tokens: int
    context_len: int
    stages: tuple[StagePlan, ...]
    expert_shards: tuple[ExpertShardPlan, ...]
    max_num_seqs: int            # Mamba slots per stage = live sequences the replica admits
    num_kv_blocks: int           # KV block ids per attention layer (0: the model has no attention)
    blocks_per_seq: int          # KV blocks one sequence of context_len tokens needs, k drafting positions included
    ideal_stage_flops: float     # total cost / pp: the lower bound of the max stage cost
    total_params: int            # every parameter once (an embedding copy on the last stage not twice)
    active_params: int           # per token, MTP block included

    @property
    def stage_bounds(self) -> list[tuple[int, int]]:
        return [(s.start, s.stop) for s in self.stages]

    @property
    def imbalance(self) -> float:
        """max stage cost / ideal (1.0 = perfect)."""
        return max(s.flops_per_token for s in self.stages) / self.ideal_stage_flops

    def stage_of_layer(self, layer: int) -> int:
        for s in self.stages:
            if s.start <= layer < s.stop:
                return s.index
        raise IndexError(f"layer {layer} is in no stage")

    def shards_of_stage(self, stage: int) -> list[ExpertShardPlan]:
        return [x for x in self.expert_shards if x.stage == stage]

    def table(self) -> str:
        return format_plan(self)


def balanced_split(n: int, parts: int, key: Callable[[int, int], tuple], fits: Callable[[int, int], bool]
                   ) -> list[tuple[int, int]] | None:
    """Contiguous split of n items into `parts` non-empty ranges minimising max key(range), exactly.

    key(i, j) is the comparable cost of range [i, j) (tuples compare lexicographically: cost first,
    tie-breakers after); ranges where fits(i, j) is False are not allowed. None when nothing fits.
    """
    inf = (math.inf,)
    best = [[inf] * (n + 1) for _ in range(parts + 1)]
    arg = [[-1] * (n + 1) for _ in range(parts + 1)]
    best[0][0] = (-math.inf,)
    for p in range(1, parts + 1):
        for j in range(p, n - (parts - p) + 1):        # leave one item for each later part
            for i in range(p - 1, j):
                prev = best[p - 1][i]
                if prev == inf or not fits(i, j):
                    continue
                v = max(prev, key(i, j))
                if v < best[p][j]:
                    best[p][j], arg[p][j] = v, i
    if best[parts][n] == inf:
        return None
    out, j = [], n
    for p in range(parts, 0, -1):
        i = arg[p][j]
        out.append((i, j))
        j = i
    return out[::-1]


# ---- planning ----------------------------------------------------------------------------------------------
def plan_replica(cfg: ModelConfig, parallel: ParallelConfig, devices: DeviceSpec, *, block_size: int = 16,
                 num_speculative_tokens: int | None = None, context_len: int = 8192,
                 max_num_seqs: int = 256, draft_dtype: str = "auto", draft_vocab: bool = False) -> ReplicaPlan:
    """Plan one replica of `cfg` on `parallel.devices_per_replica` of `devices`.

    num_speculative_tokens: MTP drafts k per step (default 3 with an MTP block, else 0); the Mamba
        verification scratch holds k+1 positions.
    context_len: the average context of a sequence; it prices attention in the cost model and sets how
        memory is split between Mamba slots and KV blocks (room for sequences of that length, with the
        k positions MTP drafting writes past a pass, as the scheduler counts them: kv_positions).
    max_num_seqs: upper bound on the slots; the memory a bound leaves over goes to KV blocks.
    draft_dtype, draft_vocab: serving's drafter on the last stage (EngineConfig.draft_dtype; whether the
        checkpoint has a draft_vocab.json that is used): the copies it keeps count as that device's weights.
    """
    parallel.check_model(cfg)
    pp, ep = parallel.pp, parallel.ep
    if devices.count < parallel.world_size:
        raise PlanError(f"devices: {devices.count} {devices.name or devices.kind} device(s) cannot host "
                        f"num_replicas {parallel.num_replicas} x pipeline_parallel_size {pp} x "
                        f"expert_parallel_size {ep} = {parallel.world_size}")
    for name, v in (("block_size", block_size), ("context_len", context_len), ("max_num_seqs", max_num_seqs)):
        if v < 1:
            raise PlanError(f"{name}: must be >= 1, found {v}")
    k = (3 if cfg.has_mtp else 0) if num_speculative_tokens is None else num_speculative_tokens
    if k < 0 or (k > 0 and not cfg.has_mtp):
        raise PlanError(f"num_speculative_tokens: {k} needs an MTP block ({cfg.name!r} has_mtp={cfg.has_mtp})")

    n, pattern = cfg.num_hidden_layers, cfg.hybrid_override_pattern
    pre = [LayerCost()]
    for i in range(n):
        pre.append(pre[-1] + layer_cost(cfg, pattern[i], context_len))
    emb, head = _embedding(cfg), _head(cfg)
    mtp = _mtp(cfg, context_len) if cfg.has_mtp else LayerCost()
    last_needs_emb = cfg.has_mtp or cfg.tie_word_embeddings  # the MTP block / tied head read the embedding

    # The MTP block's routed experts stay whole in the last stage actor (MTPBlock takes no expert range,
    # expert shards load backbone layers only): the actor's parameters and work, not the shards'.
    mtp_whole = LayerCost(flops=mtp.expert_flops, params=mtp.expert_params) - LayerCost(
        expert_flops=mtp.expert_flops, expert_params=mtp.expert_params)

    @functools.lru_cache(maxsize=None)
    def stage_cost(i: int, j: int) -> LayerCost:
        c = pre[j] - pre[i]
        if i == 0 or (j == n and last_needs_emb):
            c = c + emb
        return c + head + mtp + mtp_whole if j == n else c

    wb, usable = devices.weight_dtype_bytes, devices.usable_bytes

    draft = drafter_bytes(cfg, wb, draft_dtype_bytes(draft_dtype, wb, devices.kind == "cpu"), draft_vocab)

    mtp_moe = cfg.mtp_hybrid_override_pattern.count(MOE) if cfg.has_mtp else 0

    def stage_bytes(i: int, j: int) -> int:  # the stage's device: stage actor + expert shard 0 (+ drafter)
        c = stage_cost(i, j)
        bias = router_bias_extra_bytes(cfg, pattern.count(MOE, i, j) + (mtp_moe if j == n else 0), wb)
        return (c.params + c.expert_params // ep) * wb + bias + (draft if j == n else 0)

    def work(c: LayerCost) -> int:  # ep x (non-expert + routed/ep): an exact integer, same order
        return c.flops * ep + c.expert_flops

    def key(i: int, j: int) -> tuple:
        return (work(stage_cost(i, j)), stage_bytes(i, j))

    kv_layer = kv_block_bytes_per_layer(cfg, block_size, devices.kv_dtype_bytes)
    slot_layer = mamba_slot_bytes_per_layer(cfg, k + 1)
    blocks_per_seq = -(-kv_positions(context_len, k) // block_size)
    mtp_attn = cfg.mtp_hybrid_override_pattern.count(ATTENTION) if cfg.has_mtp else 0

    def cache_bytes(i: int, j: int) -> tuple[int, int]:  # (one KV block id, one Mamba slot) over [i, j)
        n_attn = pattern.count(ATTENTION, i, j) + (mtp_attn if j == n else 0)
        return n_attn * kv_layer, pattern.count(MAMBA, i, j) * slot_layer

    def room_for_one(i: int, j: int) -> bool:  # weights and one sequence of context_len tokens
        kvb, slotb = cache_bytes(i, j)
        return stage_bytes(i, j) + slotb + blocks_per_seq * kvb <= usable

    bounds = balanced_split(n, pp, key, room_for_one)
    if bounds is None:  # no split leaves room for a sequence: say whether the weights alone fit
        bounds = balanced_split(n, pp, key, lambda i, j: stage_bytes(i, j) <= usable)
    if bounds is None:
        best = balanced_split(n, pp, key, lambda i, j: True)
        s, (i, j) = max(enumerate(best), key=lambda t: stage_bytes(*t[1]))
        need = stage_bytes(i, j)
        raise PlanError(
            f"stage {s} (layers {i}-{j - 1}): weights need {need / GiB:.1f} GiB ({need} bytes) on device {s * ep}, "
            f"available {usable / GiB:.1f} GiB ({usable} bytes = {devices.memory_bytes} x (1 - reserve "
            f"{devices.reserve_fraction:g})); {cfg.name!r} does not fit with pipeline_parallel_size={pp} "
            f"expert_parallel_size={ep} at {wb} bytes per weight: use more stages or expert shards, "
            f"bigger devices or a smaller weight dtype")

    # ---- caches: one slot count for the replica, then KV blocks from what is left -------------------------
    rows = []
    for s, (i, j) in enumerate(bounds):
        c = stage_cost(i, j)
        counts = {kind: pattern.count(kind, i, j) for kind in _KINDS}
        kvb, slotb = cache_bytes(i, j)
        free = usable - stage_bytes(i, j)
        per_seq = slotb + blocks_per_seq * kvb
        rows.append((s, i, j, c, counts, kvb, slotb, free, per_seq, free // per_seq if per_seq else None))
    for s, i, j, c, _, kvb, slotb, free, per_seq, seqs in rows:
        if seqs is not None and seqs < 1:
            raise PlanError(
                f"stage {s} (layers {i}-{j - 1}): after {stage_bytes(i, j) / GiB:.2f} GiB of weights, "
                f"{free / GiB:.2f} GiB ({free} bytes) free on device {s * ep} cannot hold one sequence of "
                f"{context_len} tokens ({per_seq} bytes: a Mamba slot of {slotb} + {blocks_per_seq} KV blocks "
                f"of {kvb}); lower context_len or num_speculative_tokens, or add memory")
    num_seqs = min([r[-1] for r in rows if r[-1] is not None] + [max_num_seqs])

    stages, shards = [], []
    ranges = parallel.expert_ranges(cfg.n_routed_experts) if cfg.n_routed_experts else [(0, 0)] * ep
    for s, i, j, c, counts, kvb, slotb, free, _, seqs in rows:
        stages.append(StagePlan(
            index=s, start=i, stop=j, kind_counts=counts, has_embedding=i == 0 or (j == n and last_needs_emb),
            has_head=j == n, has_mtp=j == n and cfg.has_mtp, rank=s, device=s * ep, params=c.params,
            expert_params=c.expert_params, flops_per_token=work(c) / ep, weight_bytes=stage_bytes(i, j),
            active_params=c.params + c.active_expert_params - (mtp.expert_params if j == n else 0),  # k of E
            free_bytes=free, kv_block_bytes=kvb, slot_bytes=slotb, max_seqs=seqs,
            num_kv_blocks=(free - num_seqs * slotb) // kvb if kvb else None, draft_bytes=draft if j == n else 0))
        for r, rng in enumerate(ranges):
            p = c.expert_params // ep
            shards.append(ExpertShardPlan(stage=s, ep_rank=r, experts=rng, rank=pp + s * ep + r,
                                          device=s * ep + r, params=p, weight_bytes=p * wb))
    whole = stage_cost(0, n)
    copy = emb.params if pp > 1 and last_needs_emb else 0
    blocks = [st.num_kv_blocks for st in stages if st.num_kv_blocks is not None]
    return ReplicaPlan(
        model=cfg.name, parallel=parallel, devices=devices, block_size=block_size, num_speculative_tokens=k,
        context_len=context_len, stages=tuple(stages), expert_shards=tuple(shards), max_num_seqs=num_seqs,
        num_kv_blocks=min(blocks) if blocks else 0, blocks_per_seq=blocks_per_seq,
        ideal_stage_flops=work(whole) / ep / pp,
        total_params=sum(st.params + st.expert_params for st in stages) - copy,
        active_params=sum(st.active_params for st in stages) - copy)


def _num(x: float, units=(("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3))) -> str:
    return next((f"{x / div:.2f}{u}" for u, div in units if abs(x) >= div), f"{x:.0f}")


_FLOP = (("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6), ("KFLOP", 1e3))


def _gib(x: float) -> str:
    return f"{x / GiB:.2f}GiB" if x >= GiB / 10 else f"{x / 2 ** 20:.2f}MiB"


def format_plan(plan: ReplicaPlan) -> str:
    """A readable table of the plan: one row per stage, then expert slices and the replica's capacity.

    params: the stage actor's (non-expert); expert/shard: one EP shard's experts; dev0: bytes of weights
    on the stage's device (stage actor + shard 0); shard: on each other shard's device; free: on dev0
    after the reserve and the weights, for the stage's caches.
    """
    d, par = plan.devices, plan.parallel
    cols = ("stage", "layers", "M/*/E/-", "carries", "params", "expert/shard", "weights dev0", "weights shard",
            "FLOP/token", "free dev0", "KV blocks", "slots")
    table = [cols]
    for s in plan.stages:
        k, shard = s.kind_counts, plan.shards_of_stage(s.index)
        extras = "+".join(x for x, on in (("emb", s.has_embedding), ("head", s.has_head), ("mtp", s.has_mtp)) if on)
        table.append((str(s.index), f"{s.start}-{s.stop - 1}", f"{k['M']}/{k['*']}/{k['E']}/{k['-']}", extras or "-",
                      _num(s.params), _num(shard[0].params), _gib(s.weight_bytes), _gib(shard[-1].weight_bytes),
                      _num(s.flops_per_token, _FLOP), _gib(s.free_bytes),
                      "-" if s.num_kv_blocks is None else str(s.num_kv_blocks),
                      "-" if s.max_seqs is None else str(min(s.max_seqs, plan.max_num_seqs))))
    widths = [max(len(r[c]) for r in table) for c in range(len(cols))]
    ranges = [x.experts for x in plan.shards_of_stage(0)]
    return "\n".join([
        f"{plan.model}: pp={par.pp} ep={par.ep} on {par.devices_per_replica} of {d.count} x {d.name or d.kind} "
        f"({_gib(d.memory_bytes)}, reserve {d.reserve_fraction:.0%}, {d.weight_dtype_bytes} B/weight, "
        f"{d.kv_dtype_bytes} B/KV), block_size={plan.block_size}, k={plan.num_speculative_tokens}, "
        f"context_len={plan.context_len}", "",
        *("  ".join(v.rjust(w) for v, w in zip(r, widths)) for r in table), "",
        "expert slices of every stage (ep rank: first-last): "
        + ", ".join(f"{r}: {a}-{b - 1}" for r, (a, b) in enumerate(ranges)),
        f"params: {_num(plan.total_params)} total, {_num(plan.active_params)} active per token (MTP included)",
        f"balance: max stage {_num(max(s.flops_per_token for s in plan.stages), _FLOP)}/token, ideal "
        f"{_num(plan.ideal_stage_flops, _FLOP)} ({plan.imbalance:.3f}x)",
        f"capacity: max_num_seqs={plan.max_num_seqs} (Mamba slots), num_kv_blocks={plan.num_kv_blocks} "
        f"(= {plan.num_kv_blocks * plan.block_size} tokens per attention layer)"])
