"""Parallel degrees of a deployment: one validated dataclass (in the spirit of torchtitan's ParallelDims).

Why one object: the planner, the placement-group builder and the engine all derive their shapes from
the same three numbers; validating them once, with errors that name the field, keeps a bad degree from
surfacing later as an index error inside an actor.

Layout these degrees imply (the planner fills in the numbers):
    replica    = pipeline_parallel_size stages x expert_parallel_size expert shards per stage
    devices    = pipeline_parallel_size * expert_parallel_size per replica (stage s owns devices
                 s*ep .. s*ep+ep-1; its stage actor shares the first of them with expert shard 0)
    world      = devices_per_replica * num_replicas
Tensor parallelism is a later option and deliberately absent (no field that only accepts 1).
"""
from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the planner is pure arithmetic: no import of the model package at run time needed
    from model_shards.config import ModelConfig


class ParallelConfigError(ValueError):
    """A parallel degree is out of range; the message starts with the field's name."""


@dataclasses.dataclass(frozen=True)
class ParallelConfig:
    """Degrees of parallelism of one deployment.

    pipeline_parallel_size: contiguous layer ranges, one stage actor each (pipeline parallel).
    expert_parallel_size:   expert shards per stage; each holds an equal contiguous slice of the
                            routed experts of every MoE layer of its stage (and of the MTP block's).
    num_replicas:           whole copies of the model (data parallel), each its own placement group.
    """

    pipeline_parallel_size: int = 1
    expert_parallel_size: int = 1
    num_replicas: int = 1

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ParallelConfigError(f"{f.name}: must be a positive integer, found {v!r}")

    # ---- derived sizes ---------------------------------------------------------------------------
    @property
    def pp(self) -> int:
        return self.pipeline_parallel_size

    @property
    def ep(self) -> int:
        return self.expert_parallel_size

    @property
    def devices_per_replica(self) -> int:
        return self.pipeline_parallel_size * self.expert_parallel_size

    @property
    def world_size(self) -> int:
        """Devices over all replicas."""
        return self.devices_per_replica * self.num_replicas

    @property
    def actors_per_replica(self) -> int:
        """Transport ranks within one replica: stage actors plus logical expert shards. (Shard 0 of each
        stage runs inside its stage actor, so Ray starts pp * ep actors.)"""
        return self.pipeline_parallel_size * (1 + self.expert_parallel_size)

    # ---- checks against a model -----------------------------------------------------------------
    def check_model(self, cfg: "ModelConfig") -> None:
        """Raise ParallelConfigError (naming the field) when these degrees cannot split `cfg`."""
        n_layers = cfg.num_hidden_layers
        if self.pipeline_parallel_size > n_layers:
            raise ParallelConfigError(
                f"pipeline_parallel_size: {self.pipeline_parallel_size} stages for {n_layers} layers of "
                f"{cfg.name!r}; every stage needs at least one layer (use <= {n_layers})")
        uses_moe = "E" in cfg.hybrid_override_pattern or "E" in cfg.mtp_hybrid_override_pattern
        if self.expert_parallel_size > 1:
            if not uses_moe:
                raise ParallelConfigError(
                    f"expert_parallel_size: {self.expert_parallel_size} > 1 but {cfg.name!r} has no MoE layers")
            if cfg.n_routed_experts % self.expert_parallel_size:
                raise ParallelConfigError(
                    f"expert_parallel_size: {self.expert_parallel_size} must divide n_routed_experts "
                    f"{cfg.n_routed_experts} of {cfg.name!r} (equal contiguous expert slices)")

    def expert_ranges(self, n_routed_experts: int) -> list[tuple[int, int]]:
        """[first, stop) of each EP rank's experts: contiguous, equal, covering 0..E-1 once."""
        if n_routed_experts % self.expert_parallel_size:
            raise ParallelConfigError(f"expert_parallel_size: {self.expert_parallel_size} must divide "
                                      f"n_routed_experts {n_routed_experts}")
        per = n_routed_experts // self.expert_parallel_size
        return [(r * per, (r + 1) * per) for r in range(self.expert_parallel_size)]

    # ---- (de)serialisation ----------------------------------------------------------------------
    def to_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "ParallelConfig":
        """Accept the long names and the short ones (pp, ep, replicas); unknown keys are an error."""
        aliases = {"pp": "pipeline_parallel_size", "ep": "expert_parallel_size", "replicas": "num_replicas"}
        known = {f.name for f in dataclasses.fields(cls)}
        kw: dict[str, Any] = {}
        for k, v in raw.items():
            name = aliases.get(k, k)
            if name not in known:
                raise ParallelConfigError(f"{k}: unknown parallel setting; known: {sorted(known)}")
            kw[name] = v
        return cls(**kw)
