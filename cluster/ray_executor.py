"""A model replica on Ray: one placement group, a stage actor per pipeline stage (holding expert-parallel
rank 0 of its MoE layers), an expert-shard actor per further expert-parallel rank of each stage.

Over a collective carrier (gloo, NCCL, nccl4py: cluster/replica_comm.py) a pass is one `run` call per
stage, all started at once (each stage starts its expert shards' `serve_pass` itself, off the engine's
process); the actors hand hidden states and expert tokens to each other directly. With transport "ray"
the stages' ObjectRefs are chained instead and each shard gets a Ray call per MoE layer.

Micro-batches pipeline for free: each actor runs its calls in order, so while stage k works on one
micro-batch, stage k-1 already works on the next one the engine submitted.
"""
from __future__ import annotations

import logging

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from model_shards.weights import read_config
from cluster.contracts import StepPlan, StepResult, decode_result, encode

from .actors import ExpertShardActor, StageActor
from .planner import format_plan

log = logging.getLogger("hybridserve.cluster")


class RayExecutor:
    def __init__(self, folder, plan, *, num_blocks: int, block_size: int, num_slots: int,
                 max_verify_positions: int, draft_dtype: str = "auto", draft_vocab: bool = True,
                 dtype: str = "auto", actor_num_cpus: float = 0.25,
                 torch_threads: int = 1, placement_strategy: str = "PACK", stage_resources: list[dict] | None = None,
                 transport: str = "auto", comm_timeout_s: float = 60.0, niceness: int = 0, cuda_graphs: bool = True):
        """transport: how hidden states and expert tokens move (cluster/replica_comm.py): "auto", "ray"
        (object store and a Ray call per MoE layer), "gloo", "nccl" or "nccl4py" (collectives).
        comm_timeout_s: how long a collective waits for a peer before it raises (a dead actor)."""
        from .replica_comm import transport_here

        self.transport = transport_here(transport, gpus=ray.cluster_resources().get("GPU", 0) > 0,
                                        pp=plan.parallel.pp, ep=plan.parallel.ep)
        self.comm_timeout_s = comm_timeout_s
        self.niceness = niceness                              # the actors' nice value (cluster/os_priority.py)
        self.folder = str(folder)
        self.cfg = read_config(folder)
        self.plan = plan                                      # cluster.planner.ReplicaPlan
        self.pp, self.ep = plan.parallel.pp, plan.parallel.ep
        self.stages_layers = plan.stage_bounds
        self.shard_ranges = plan.parallel.expert_ranges(self.cfg.n_routed_experts) if self.ep > 1 else None
        self.cache_kw = dict(num_blocks=num_blocks, block_size=block_size, num_slots=num_slots,
                             max_verify_positions=max_verify_positions, draft_dtype=draft_dtype,
                             draft_vocab=draft_vocab, dtype=dtype, cuda_graphs=cuda_graphs)
        self.actor_num_cpus, self.torch_threads = actor_num_cpus, torch_threads
        self.placement_strategy, self.stage_resources = placement_strategy, stage_resources
        self.num_stages = self.pp
        self.pg = None
        self.stages: list = []
        self.shards: list[list] = []
        self._build()

    # ---- lifecycle -----------------------------------------------------------------------------
    def _bundle(self) -> dict:
        use_gpu = ray.cluster_resources().get("GPU", 0) > 0
        return {"CPU": self.actor_num_cpus, **({"GPU": 1} if use_gpu else {})}

    def _build(self) -> None:
        n_shards = self.ep - 1                         # expert rank 0 lives in the stage actor
        bundles = []
        for s in range(self.pp):                       # per stage: the stage actor, then its expert shards
            extra = (self.stage_resources or [{}] * self.pp)[s]
            bundles += [{**self._bundle(), **extra}] * (1 + n_shards)
        self.pg = placement_group(bundles, strategy=self.placement_strategy)
        ray.get(self.pg.ready(), timeout=120)
        log.info("replica plan (placement %s):\n%s", self.placement_strategy, format_plan(self.plan))
        b = 0
        self.stages, self.shards = [], []
        for s, (lo, hi) in enumerate(self.stages_layers):
            stage_bundle = b
            b += 1
            shards = []
            for r in range(n_shards):
                shards.append(ExpertShardActor.options(**self._opts(b)).remote(
                    self.folder, (lo, hi), self.shard_ranges[r + 1], self.torch_threads, dtype=self.cache_kw["dtype"],
                    niceness=self.niceness))
                b += 1
            self.shards.append(shards)
            self.stages.append(StageActor.options(**self._opts(stage_bundle)).remote(
                self.folder, (lo, hi), shards=shards or None, shard_ranges=self.shard_ranges,
                threads=self.torch_threads, per_layer_calls=self.transport == "ray", niceness=self.niceness,
                **self.cache_kw))
        ray.get([a.stats.remote() for a in self.stages])   # wait for weights to load; surfaces load errors
        if self.collective:
            from .transport import free_port

            addr = ray.get(self.stages[0].node_ip.remote())
            port = free_port("127.0.0.1") if addr.startswith("127.") else free_port("0.0.0.0")
            from .replica_comm import ReplicaLayout

            layout, args = ReplicaLayout(self.pp, self.ep), (self.pp, self.ep, addr, port, self.comm_timeout_s)
            joins = [a.init_comm.remote(self.transport, s, *args) for s, a in enumerate(self.stages)]
            joins += [x.init_comm.remote(self.transport, layout.shard_rank(s, r + 1), *args)
                      for s, group in enumerate(self.shards) for r, x in enumerate(group)]
            ray.get(joins, timeout=180)

    @property
    def collective(self) -> bool:
        """Whether the actors talk over a collective carrier (they then start every pass together)."""
        return self.transport != "ray" and self.pp * self.ep > 1

    def _opts(self, bundle: int) -> dict:
        res = {"num_cpus": self.actor_num_cpus}
        if "GPU" in self._bundle():
            res["num_gpus"] = 1
        return dict(res, scheduling_strategy=PlacementGroupSchedulingStrategy(
            placement_group=self.pg, placement_group_bundle_index=bundle))

    def shutdown(self) -> None:
        for a in self.stages + [s for group in self.shards for s in group]:
            ray.kill(a, no_restart=True)
        if self.pg is not None:
            remove_placement_group(self.pg)
            self.pg = None
        self.stages, self.shards = [], []

    def rebuild(self) -> None:
        """After an actor died: new actors, empty caches. The engine fails the requests that were in flight."""
        log.warning("rebuilding the replica's actors")
        self.shutdown()
        self._build()

    # ---- passes --------------------------------------------------------------------------------
    def _chain(self, plan: StepPlan):
        data = encode(plan)
        ref = None
        for stage in self.stages:
            # Object store: each stage's output ref is the next stage's input. Collectives: all stages
            # start at once and hand hidden states over directly (each starts its own expert shards).
            ref = stage.run.remote(data, ref if self.transport == "ray" else None)
        return ref

    def submit(self, plan: StepPlan):
        """Sends the pass to the stages now and returns an awaitable of its result."""
        return self._result(self._chain(plan))

    @staticmethod
    async def _result(ref) -> StepResult:
        return decode_result(await ref)

    def is_fatal(self, err: BaseException) -> bool:
        """An actor (or an object it owned) is gone: the replica must be rebuilt. A Python error inside
        a stage's pass (RayTaskError) leaves the actors alive; only that plan's requests are affected."""
        if self.collective:
            return True              # peers already wait in this pass's collectives: only a rebuild frees them
        fatal = (ray.exceptions.RayActorError, ray.exceptions.ObjectLostError, ray.exceptions.OwnerDiedError,
                 ray.exceptions.ActorUnavailableError, ray.exceptions.WorkerCrashedError,
                 ray.exceptions.NodeDiedError)
        seen = set()
        while err is not None and id(err) not in seen:
            if isinstance(err, fatal):
                return True
            seen.add(id(err))
            err = getattr(err, "cause", None) or err.__cause__
        return False

    def stats(self) -> list[dict]:
        return ray.get([a.stats.remote() for a in self.stages])

    def shard_stats(self) -> list[list[dict]]:
        """Per stage, its expert shards' counters (layers served over the expert group)."""
        return [ray.get([x.stats.remote() for x in group]) for group in self.shards]
