"""`hybridserve plan`'s arithmetic: choose the parallel degrees for some hardware, plan the replica with
`cluster.planner.plan_replica`, and derive what a deployment needs to know (memory per GPU, per-sequence
cache bytes, the largest batch, parameter counts, Helm values). No torch here; the CLI formats it
(router/plan_command.py).

Dtypes: weights and KV caches take `dtype` ("auto": float32 on a CPU, where the engine computes in
float32; bfloat16 on GPUs, the planner's 2 bytes per weight); Mamba states (conv + SSM) and their
verification scratch are float32 whatever it is, as the Super model card asks.

Auto degrees: the smallest pp x ep (pp * ep <= the GPUs, ep dividing the routed experts, pp at most the
layers, pp * ep dividing the GPUs of a node or a multiple of them, so that replicas tile the nodes as the
Helm chart requires) whose replica holds its weights plus one sequence of max_model_len tokens; among
layouts of one size, ep within a node first (the all-to-all of latent vectors stays on the node's links),
then the largest ep (fewer pipeline stages, so fewer bubbles); pipeline stages are what crosses nodes.
"""
from __future__ import annotations

import dataclasses

from model_shards.config import ATTENTION, MAMBA, MOE, ModelConfig
from model_shards.params import count_parameters, mtp_parameters

from .parallel import ParallelConfig, ParallelConfigError
from .planner import DTYPE_BYTES, DeviceSpec, PlanError, ReplicaPlan, mamba_slot_bytes_per_layer, plan_replica

GB = 10 ** 9
MAX_NUM_SEQS_CAP = 256           # the Helm values' maxNumSeqs: what fits, at most this
DEFAULT_GPU_MEMORY_GB = 80.0     # --gpus without --gpu-memory-gb (an 80 GB H100/A100)
_UNBOUNDED = 1 << 40             # max_num_seqs for the planner: report what memory allows
DTYPES = ("auto", *DTYPE_BYTES)


@dataclasses.dataclass(frozen=True)
class Hardware:
    """What a deployment may use. gpus_per_node 0: this host's CPU, one device with a host-memory budget
    (memory_bytes, or the engine's default: DeviceSpec.cpu), as `hybridserve serve` plans without GPUs."""

    gpus_per_node: int = 0
    nodes: int = 1
    memory_bytes: int | None = None      # per GPU (per CPU device: its budget)
    utilization: float = 0.9             # --gpu-memory-utilization: share for weights and caches
    dtype: str = "auto"                  # weights and KV

    def __post_init__(self) -> None:
        def need(cond, field, msg):
            if not cond:
                raise PlanError(f"{field}: {msg}")
        need(self.gpus_per_node >= 0, "gpus", f"must be >= 1, found {self.gpus_per_node}")
        need(self.nodes >= 1, "nodes", f"must be >= 1, found {self.nodes}")
        need(self.memory_bytes is None or self.memory_bytes > 0, "gpu_memory_gb", "must be > 0")
        need(0.0 < self.utilization <= 1.0, "gpu_memory_utilization", f"must be in (0, 1], found {self.utilization}")
        need(self.dtype in DTYPES, "dtype", f"expected one of {', '.join(DTYPES)}, found {self.dtype!r}")

    @property
    def cpu(self) -> bool:
        return self.gpus_per_node == 0

    @property
    def num_gpus(self) -> int:
        return self.gpus_per_node * self.nodes

    @property
    def dtype_name(self) -> str:
        if self.dtype != "auto":
            return self.dtype
        return "float32" if self.cpu else "bfloat16"

    @property
    def dtype_bytes(self) -> int:
        return DTYPE_BYTES[self.dtype_name]

    def devices(self, count: int) -> DeviceSpec:
        """The DeviceSpec a replica of `count` devices plans against (as EngineConfig.device_spec builds it)."""
        b, reserve = self.dtype_bytes, 1.0 - self.utilization
        if self.cpu:
            return DeviceSpec.cpu(count, self.memory_bytes, reserve_fraction=reserve, weight_dtype_bytes=b,
                                  kv_dtype_bytes=b)
        mem = self.memory_bytes or int(DEFAULT_GPU_MEMORY_GB * GB)
        return DeviceSpec("cuda", self.num_gpus, mem, weight_dtype_bytes=b, kv_dtype_bytes=b,
                          reserve_fraction=reserve, name=f"{mem / GB:g}GB GPU")


def uses_moe(cfg: ModelConfig) -> bool:
    return MOE in cfg.hybrid_override_pattern or MOE in cfg.mtp_hybrid_override_pattern


def degree_errors(cfg: ModelConfig, hw: Hardware, pp: int | None, ep: int | None) -> list[str]:
    """Why given degrees (None: auto) cannot work, before any memory is looked at; empty when they can."""
    errors = []
    for name, v in (("pipeline_parallel_size", pp), ("expert_parallel_size", ep)):
        if v is not None and v < 1:
            errors.append(f"{name}: must be a positive integer or auto, found {v}")
    if errors:
        return errors
    n, E = cfg.num_hidden_layers, cfg.n_routed_experts
    if pp is not None and pp > n:
        errors.append(f"pipeline_parallel_size: {pp} stages for the {n} layers of {cfg.name!r}; every stage "
                      f"needs at least one layer (use <= {n})")
    if ep is not None and ep > 1 and not uses_moe(cfg):
        errors.append(f"expert_parallel_size: {ep} > 1 but {cfg.name!r} has no MoE layers")
    elif ep is not None and E and E % ep:
        divisors = [d for d in range(1, E + 1) if E % d == 0 and (hw.cpu or d <= hw.num_gpus)]
        errors.append(f"expert_parallel_size: {ep} does not divide the {E} routed experts of {cfg.name!r} "
                      f"(each shard holds an equal contiguous slice); possible: {', '.join(map(str, divisors))}")
    size = (pp or 1) * (ep or 1)
    if not hw.cpu and size > hw.num_gpus:
        errors.append(f"pipeline_parallel_size x expert_parallel_size: {pp or 1} x {ep or 1} = {size} "
                      f"GPUs per replica, but {hw.gpus_per_node} GPUs x {hw.nodes} node(s) = {hw.num_gpus}")
    elif not hw.cpu and pp and ep and not tiles(hw, size):
        errors.append(f"pipeline_parallel_size x expert_parallel_size: {pp} x {ep} = {size} GPUs per replica must "
                      f"divide the {hw.gpus_per_node} GPUs of a node or be a multiple of them, so that replicas "
                      f"tile the nodes (the Helm chart checks the same)")
    return errors


def tiles(hw: Hardware, size: int) -> bool:
    """Replicas of `size` GPUs tile nodes of gpus_per_node GPUs (as the Helm chart requires)."""
    return hw.gpus_per_node % size == 0 or size % hw.gpus_per_node == 0


def candidates(cfg: ModelConfig, hw: Hardware, pp: int | None, ep: int | None) -> list[tuple[int, int]]:
    """(pp, ep) layouts to try, best first: fewest devices, ep within a node, then the largest ep."""
    if hw.cpu:                                 # one device unless degrees are given (the engine then uses pp*ep)
        return [(pp or 1, ep or 1)]
    E = cfg.n_routed_experts if uses_moe(cfg) else 1
    pps = [pp] if pp else range(1, min(cfg.num_hidden_layers, hw.num_gpus) + 1)
    eps = [ep] if ep else [d for d in range(1, min(E, hw.num_gpus) + 1) if E % d == 0]
    out = [(p, e) for p in pps for e in eps if p * e <= hw.num_gpus and tiles(hw, p * e)]
    return sorted(out, key=lambda pe: (pe[0] * pe[1], pe[1] > hw.gpus_per_node, -pe[1]))


@dataclasses.dataclass(frozen=True)
class DeploymentPlan:
    """A replica plan on some hardware, with what `hybridserve plan` reports about it."""

    model: str                       # as given (--model): what the Helm values serve
    cfg: ModelConfig
    hardware: Hardware
    replica: ReplicaPlan             # max_num_seqs: what memory allows (not capped)
    why: tuple[str, ...]             # how the degrees were chosen
    notes: tuple[str, ...] = ()
    larger: tuple[tuple[int, int, int], ...] = ()   # auto: (pp, ep, largest batch) of bigger replica sizes

    @property
    def pp(self) -> int:
        return self.replica.parallel.pp

    @property
    def ep(self) -> int:
        return self.replica.parallel.ep

    @property
    def devices_per_replica(self) -> int:
        return self.pp * self.ep

    @property
    def nodes_per_replica(self) -> int:
        return 1 if self.hardware.cpu else -(-self.devices_per_replica // self.hardware.gpus_per_node)

    @property
    def max_replicas(self) -> int:
        """Replicas the hardware holds: several per node when one fits in part of a node, else whole nodes each."""
        hw = self.hardware
        if hw.cpu:
            return 1
        if self.devices_per_replica <= hw.gpus_per_node:
            return hw.nodes * (hw.gpus_per_node // self.devices_per_replica)
        return max(1, hw.nodes // self.nodes_per_replica)

    @property
    def max_batch(self) -> int:
        """Concurrent sequences of max_model_len tokens (each a Mamba slot and its KV blocks) that fit."""
        return self.replica.max_num_seqs

    @property
    def max_num_seqs(self) -> int:
        return min(self.max_batch, MAX_NUM_SEQS_CAP)

    def parameters(self) -> dict:
        total, active = count_parameters(self.cfg)
        mtp = mtp_parameters(self.cfg)
        return {"total": total, "active": active, "mtp_total": mtp.total, "mtp_active": mtp.active,
                "counted": "all checkpoint tensors (router correction bias included), MTP block apart; active "
                           f"per token: embedding, lm_head, every Mamba / attention / norm weight, and per MoE "
                           f"layer the router, latent projections, shared expert and {self.cfg.num_experts_per_tok} "
                           f"of {self.cfg.n_routed_experts} routed experts"}

    def per_sequence(self) -> dict:
        """Cache bytes one sequence of max_model_len tokens takes, over the whole replica."""
        cfg, r = self.cfg, self.replica
        H, P, N = cfg.mamba_num_heads, cfg.mamba_head_dim, cfg.ssm_state_size
        n_mamba = cfg.hybrid_override_pattern.count(MAMBA)
        conv, ssm = 4 * cfg.conv_dim * (cfg.conv_kernel - 1), 4 * H * P * N          # float32, per layer
        slot = n_mamba * mamba_slot_bytes_per_layer(cfg, r.num_speculative_tokens + 1)
        block = sum(s.kv_block_bytes for s in r.stages)
        return {"kv_block_bytes": block, "kv_blocks": r.blocks_per_seq, "kv_bytes": r.blocks_per_seq * block,
                "attention_layers": cfg.hybrid_override_pattern.count(ATTENTION)
                + (cfg.mtp_hybrid_override_pattern.count(ATTENTION) if cfg.has_mtp else 0),
                "mamba_layers": n_mamba, "mamba_conv_bytes": n_mamba * conv, "mamba_ssm_bytes": n_mamba * ssm,
                "mamba_state_bytes": n_mamba * (conv + ssm), "mamba_scratch_bytes": slot - n_mamba * (conv + ssm),
                "mamba_slot_bytes": slot, "total_bytes": r.blocks_per_seq * block + slot}

    def gpus(self) -> list[dict]:
        """Every device of one replica: where it is, what it holds, its memory at the largest batch."""
        r, out = self.replica, []
        gpn = self.hardware.gpus_per_node or 1
        mtp_e = self.cfg.n_routed_experts if MOE in self.cfg.mtp_hybrid_override_pattern else 0
        for st in r.stages:
            n_moe = st.kind_counts[MOE]
            for x in r.shards_of_stage(st.index):
                first = x.ep_rank == 0
                caches = self.max_batch * (st.slot_bytes + r.blocks_per_seq * st.kv_block_bytes) if first else 0
                weights = st.weight_bytes if first else x.weight_bytes
                experts = (f"{x.experts[0]}-{x.experts[1] - 1} of {n_moe} MoE layer(s)" if n_moe and x.experts[1]
                           else "-")
                if first and st.has_mtp and mtp_e:
                    experts += f"; MTP block's 0-{mtp_e - 1}"
                out.append({"device": x.device, "node": x.device // gpn, "local": x.device % gpn, "stage": st.index,
                            "role": "stage actor + expert shard 0" if first else f"expert shard {x.ep_rank}",
                            "experts": experts, "expert_range": list(x.experts), "weight_bytes": weights,
                            "draft_bytes": st.draft_bytes if first else 0, "cache_bytes": caches,
                            "usable_bytes": r.devices.usable_bytes})
        return out

    def helm_values(self) -> dict:
        hw = self.hardware
        # A CPU plan drops the chart's default `gpu` group (Helm merges maps: null removes a key).
        group = ({"cpu": {"gpusPerWorker": 0, "minWorkers": 1, "maxWorkers": 1}, "gpu": None} if hw.cpu else
                 {"gpu": {"gpusPerWorker": hw.gpus_per_node, "minWorkers": self.nodes_per_replica,
                          "maxWorkers": hw.nodes}})
        return {"serve": {"model": self.model, "pipelineParallelSize": self.pp, "expertParallelSize": self.ep,
                          "numSpeculativeTokens": self.replica.num_speculative_tokens,
                          "maxModelLen": self.replica.context_len, "maxNumSeqs": self.max_num_seqs,
                          "gpuMemoryUtilization": hw.utilization},
                "workerGroups": group, "replicas": {"min": 1, "max": self.max_replicas}}

    def to_dict(self) -> dict:
        r, hw = self.replica, self.hardware
        return {
            "model": self.model, "config_name": self.cfg.name,
            "hardware": {"kind": "cpu" if hw.cpu else "gpu", "gpus_per_node": hw.gpus_per_node, "nodes": hw.nodes,
                         "memory_bytes": r.devices.memory_bytes, "usable_bytes": r.devices.usable_bytes,
                         "gpu_memory_utilization": hw.utilization},
            "dtype": {"weights": hw.dtype_name, "kv_cache": hw.dtype_name, "mamba_state": "float32"},
            "max_model_len": r.context_len, "num_speculative_tokens": r.num_speculative_tokens,
            "block_size": r.block_size,
            "layout": {"pipeline_parallel_size": self.pp, "expert_parallel_size": self.ep,
                       "gpus_per_replica": 0 if hw.cpu else self.devices_per_replica,
                       "nodes_per_replica": self.nodes_per_replica, "max_replicas": self.max_replicas,
                       "why": list(self.why),
                       "larger": [{"pipeline_parallel_size": p, "expert_parallel_size": e, "max_batch": b}
                                  for p, e, b in self.larger]},
            "stages": [{"stage": s.index, "layers": [s.start, s.stop - 1], "mamba": s.kind_counts[MAMBA],
                        "attention": s.kind_counts["*"], "moe": s.kind_counts[MOE], "mlp": s.kind_counts["-"],
                        "embedding": s.has_embedding, "head": s.has_head, "mtp": s.has_mtp,
                        "weight_bytes": s.weight_bytes, "kv_block_bytes": s.kv_block_bytes,
                        "mamba_slot_bytes": s.slot_bytes, "max_seqs": s.max_seqs} for s in r.stages],
            "gpus": self.gpus(), "per_sequence": self.per_sequence(),
            "max_batch": self.max_batch, "max_num_seqs": self.max_num_seqs, "parameters": self.parameters(),
            "helm_values": self.helm_values(), "notes": list(self.notes)}


def _failure(cfg: ModelConfig, hw: Hardware, pp: int, ep: int, kw: dict, err: Exception) -> tuple[str, int]:
    """One line on why (pp, ep) does not fit, and by how many bytes its fullest device's weights overflow
    (0: the weights fit but one sequence does not)."""
    devices = hw.devices(pp * ep)
    roomy = dataclasses.replace(devices, memory_bytes=1 << 62)
    try:
        ideal = plan_replica(cfg, ParallelConfig(pp, ep), roomy, **kw)
    except (PlanError, ParallelConfigError):
        return f"pp={pp} ep={ep}: {err}", 0
    st = max(ideal.stages, key=lambda s: s.weight_bytes)
    over = st.weight_bytes - devices.usable_bytes
    if over > 0:
        return (f"pp={pp} ep={ep}: weights need {st.weight_bytes / GB:.1f} GB on device {st.device} (stage "
                f"{st.index}), {devices.usable_bytes / GB:.1f} GB usable", over)
    return f"pp={pp} ep={ep}: weights fit, but not one sequence of {kw['context_len']} tokens beside them", 0


def plan_deployment(cfg: ModelConfig, hw: Hardware, *, model: str | None = None, pp: int | None = None,
                    ep: int | None = None, max_model_len: int = 2048, num_speculative_tokens: int = 0,
                    block_size: int = 16, draft_vocab: bool = False, min_batch: int = 1) -> DeploymentPlan:
    """Plan `cfg` on `hw`; pp / ep None: auto. Raises PlanError (with every reason) when nothing fits.

    Auto takes the smallest replica that holds `min_batch` sequences (a replica that fits one sequence
    beside its weights is correct but serves nobody well); if none does, the smallest that fits one."""
    errors = degree_errors(cfg, hw, pp, ep)
    if max_model_len < 2:
        errors.append(f"max_model_len: must be >= 2, found {max_model_len}")
    if num_speculative_tokens < 0 or (num_speculative_tokens and not cfg.has_mtp):
        errors.append(f"num_speculative_tokens: {num_speculative_tokens} needs an MTP block and >= 0 "
                      f"({cfg.name!r} has_mtp={cfg.has_mtp})")
    if errors:
        raise PlanError("\n".join(errors))
    notes = []
    if max_model_len > cfg.max_position_embeddings:
        notes.append(f"max_model_len {max_model_len} lowered to the model's max_position_embeddings "
                     f"{cfg.max_position_embeddings} (as the engine does)")
        max_model_len = cfg.max_position_embeddings
    if hw.cpu and hw.nodes > 1:
        notes.append("nodes: ignored without GPUs (a CPU plan is one replica on this host)")
    if hw.cpu and hw.dtype_name != "float32":
        notes.append(f"the CPU engine loads weights and KV in float32; this plan assumes {hw.dtype_name}")
    kw = dict(block_size=block_size, num_speculative_tokens=num_speculative_tokens, context_len=max_model_len,
              max_num_seqs=_UNBOUNDED, draft_vocab=draft_vocab)
    tried, overflow = [], []
    order = candidates(cfg, hw, pp, ep)
    if not order:
        given = f"pp={pp}" if pp else f"ep={ep}"
        raise PlanError(f"no layout with {given} gives a replica size that divides the {hw.gpus_per_node} GPUs "
                        f"of a node or is a multiple of them, within {hw.num_gpus} GPUs")
    fits_one = None
    for p, e in order:
        try:
            replica = plan_replica(cfg, ParallelConfig(p, e), hw.devices(p * e), **kw)
        except (PlanError, ParallelConfigError) as err:
            line, over = _failure(cfg, hw, p, e, kw, err)
            tried.append(line)
            overflow.append(over)
            continue
        if replica.max_num_seqs < min_batch and not (pp and ep):
            tried.append(f"pp={p} ep={e}: fits, but only {replica.max_num_seqs} sequence(s) (--min-batch {min_batch})")
            fits_one = fits_one or (p, e, replica, len(tried) - 1)
            continue
        return _deployment(cfg, hw, model, p, e, pp, ep, replica, tried, order, kw, notes, max_model_len, min_batch)
    if fits_one:
        p, e, replica, n_tried = fits_one
        notes.append(f"no layout holds --min-batch {min_batch} sequences; the smallest that holds one is shown")
        return _deployment(cfg, hw, model, p, e, pp, ep, replica, tried[:n_tried], order, kw, notes,
                           max_model_len, min_batch)
    raise PlanError(_refusal(cfg, hw, tried, overflow, pp, ep))


def _deployment(cfg, hw, model, p, e, pp, ep, replica, tried, order, kw, notes, max_model_len, min_batch):
    why = _why(hw, p, e, pp, ep, tried, max_model_len, min_batch)
    larger = () if hw.cpu or (pp and ep) else _larger(cfg, hw, order, p * e, kw)
    return DeploymentPlan(model or cfg.name, cfg, hw, replica, tuple(why), tuple(notes), larger)


def _larger(cfg: ModelConfig, hw: Hardware, order: list[tuple[int, int]], size: int, kw: dict
            ) -> tuple[tuple[int, int, int], ...]:
    """What bigger replicas would hold: the preferred layout of each size above `size` (sizes that tile the
    nodes), with its largest batch."""
    out, done = [], set()
    for p, e in order:
        n = p * e
        if n <= size or n in done:
            continue
        try:
            out.append((p, e, plan_replica(cfg, ParallelConfig(p, e), hw.devices(n), **kw).max_num_seqs))
            done.add(n)
        except (PlanError, ParallelConfigError):
            continue
    return tuple(out)


def _why(hw: Hardware, p: int, e: int, pp: int | None, ep: int | None, tried: list[str], length: int,
         min_batch: int = 1) -> list[str]:
    if pp and ep:
        return [f"pp={p} ep={e}: given"]
    where = "the CPU (one device)" if hw.cpu else f"{hw.num_gpus} GPU(s), {hw.gpus_per_node} per node"
    fixed = f" (pp={pp} given)" if pp else f" (ep={ep} given)" if ep else ""
    out = [f"auto{fixed} on {where}: the smallest pp x ep that holds the weights plus {min_batch} sequence(s) "
           f"of {length} tokens"]
    out += [f"  passed over: {t}" for t in tried[:8]] + ([f"  ... {len(tried) - 8} more"] if len(tried) > 8 else [])
    if not hw.cpu:
        out.append(f"  chose pp={p} ep={e} ({p * e} GPU(s)): the first of that size that fits, trying ep within "
                   f"a node first (the latent all-to-all stays on the node's links), then the largest ep (fewer "
                   f"pipeline stages); pipeline stages are what may cross nodes"
                   + ("" if e <= hw.gpus_per_node else f"; no layout of that size keeps ep <= {hw.gpus_per_node}"))
    return out


def _refusal(cfg: ModelConfig, hw: Hardware, tried: list[str], overflow: list[int], pp, ep) -> str:
    wb = hw.dtype_bytes
    total, _ = count_parameters(cfg, include_mtp=True)
    count = hw.num_gpus if not hw.cpu else (pp or 1) * (ep or 1)
    devices = hw.devices(count)
    have = devices.usable_bytes * count
    where = (f"{hw.gpus_per_node} GPU(s) x {hw.nodes} node(s) x {devices.memory_bytes / GB:.1f} GB"
             if not hw.cpu else f"{count} CPU device(s) x {devices.memory_bytes / GB:.2f} GB budget")
    lines = []
    if total * wb > have:
        lines.append(f"weights alone exceed memory: {cfg.name!r} has {total / 1e9:.2f}B parameters (MTP block "
                     f"included) = {total * wb / GB:.1f} GB in {hw.dtype_name}, but {where} at "
                     f"gpu_memory_utilization {hw.utilization:g} give {have / GB:.1f} GB: short by "
                     f"{(total * wb - have) / GB:.1f} GB")
    elif any(overflow):
        layouts = f"pp={pp} ep={ep}" if pp and ep else "any layout"
        lines.append(f"weights do not fit {layouts} on {where}: the fullest device of the best one tried is "
                     f"short by {min(o for o in overflow if o) / GB:.1f} GB (use more GPUs, bigger GPUs or a "
                     f"smaller --dtype)")
    else:
        lines.append(f"no layout on {where} leaves room for one sequence beside the weights: lower "
                     f"--max-model-len or --num-speculative-tokens, or add memory")
    lines += [f"  {t}" for t in tried[:8]] + ([f"  ... {len(tried) - 8} more"] if len(tried) > 8 else [])
    return "\n".join(lines)
