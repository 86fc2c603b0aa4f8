"""Which carrier a replica's actors talk over, and the groups they form on it.

`--transport` picks it: "auto" is NCCL on GPUs (nccl4py where torch has no NCCL) and Ray on CPUs;
"ray" keeps everything on Ray (hidden states through the object store, one actor call per MoE layer
per shard); "gloo" runs the GPU's protocol (collectives) on CPUs, which is how the tests check it.
Why not gloo by default on CPUs: measured on the 2-core CI machine it is no faster than Ray there
(slower at -pp 2), and a Python error in a pass over collectives must rebuild the replica (the peers
wait inside a collective), where over Ray it fails only the plan's requests. Over gloo, NCCL or nccl4py every actor of the replica joins one world:

    rank s                         stage actor s (0 <= s < pp): stage links to s-1 and s+1
    rank pp + s*(ep-1) + r - 1     expert shard r (1 <= r < ep) of stage s
    expert group of stage s        [s, its shards]: the stage is group rank 0 (cluster/expert_dispatch.py)
"""
from __future__ import annotations

import dataclasses
import datetime

TRANSPORTS = ("auto", "ray", "gloo", "nccl", "nccl4py")


@dataclasses.dataclass(frozen=True)
class ReplicaLayout:
    pp: int
    ep: int

    @property
    def world_size(self) -> int:
        return self.pp * self.ep

    def shard_rank(self, stage: int, r: int) -> int:
        """World rank of expert shard r (>= 1) of `stage`."""
        return self.pp + stage * (self.ep - 1) + r - 1

    def expert_group(self, stage: int) -> list[int]:
        return [stage] + [self.shard_rank(stage, r) for r in range(1, self.ep)]

    def stage_of(self, rank: int) -> int:
        return rank if rank < self.pp else (rank - self.pp) // (self.ep - 1)


def resolve_transport(kind: str, *, gpus: bool, pp: int, ep: int, torch_nccl: bool, nccl4py: bool) -> str:
    """`--transport` for this deployment: "auto" made concrete; a choice the machines cannot run is a
    ValueError naming the flag. Single-actor replicas need no carrier: "ray"."""
    if kind not in TRANSPORTS:
        raise ValueError(f"--transport: expected one of {', '.join(TRANSPORTS)}, got {kind!r}")
    if pp * ep == 1:
        return "ray"
    if kind == "auto":
        if not gpus:
            return "ray"
        if nccl4py:                  # the design's carrier (the 'gpu' extra); torch's own NCCL otherwise
            return "nccl4py"
        if torch_nccl:
            return "nccl"
        raise ValueError("--transport auto: the Ray cluster has GPUs but neither torch's NCCL nor nccl4py is "
                         "available here; install the 'gpu' extra or pass --transport gloo")
    if kind in ("nccl", "nccl4py") and not gpus:
        raise ValueError(f"--transport {kind}: needs GPUs and the Ray cluster has none; use --transport gloo "
                         f"(or auto) on CPUs")
    if kind == "nccl" and not torch_nccl:
        raise ValueError("--transport nccl: this torch has no NCCL (torch.distributed.is_nccl_available() is "
                         "False); try --transport nccl4py")
    if kind == "nccl4py" and not nccl4py:
        from .transport import NCCL4PY_IMPORT_ERROR
        raise ValueError(f"--transport nccl4py: nccl4py is not importable here ({NCCL4PY_IMPORT_ERROR}); "
                         f"install the 'gpu' extra or use --transport nccl")
    return kind


def transport_here(kind: str, *, gpus: bool, pp: int, ep: int) -> str:
    """resolve_transport with what this process's torch and nccl4py offer."""
    import torch.distributed as dist

    from .transport import NCCL4PY_AVAILABLE

    return resolve_transport(kind, gpus=gpus, pp=pp, ep=ep, torch_nccl=dist.is_available() and dist.is_nccl_available(),
                             nccl4py=NCCL4PY_AVAILABLE)


@dataclasses.dataclass
class ReplicaComm:
    """One actor's part of the replica's world: its stage link and its expert group (None if unused)."""

    stage_link: object | None          # cluster.transport.Transport, stage actors of a pp > 1 replica
    experts: object | None             # cluster.expert_dispatch.AllToAll, every actor of an ep > 1 replica
    _close: object = None

    def close(self) -> None:
        if self._close is not None:
            self._close()


def join_replica(kind: str, rank: int, layout: ReplicaLayout, *, master_addr: str, master_port: int,
                 timeout_s: float = 60.0) -> ReplicaComm:
    """Join the replica's world as `rank` (every actor at once: the rendezvous is collective)."""
    import torch

    from .expert_dispatch import AllToAll, Nccl4pyAllToAll
    from .transport import (Nccl4pyTransport, TorchDistTransport, cuda_device, init_torch_dist, nccl4py_communicator,
                            nccl4py_store, require_nccl4py)

    pp, ep, world = layout.pp, layout.ep, layout.world_size
    stage = layout.stage_of(rank)
    is_stage = rank < pp
    if kind in ("gloo", "nccl"):
        import torch.distributed as dist

        device = init_torch_dist(kind, rank, world, master_port=master_port, master_addr=master_addr,
                                 timeout_s=timeout_s)
        experts = None
        if ep > 1:
            for s in range(pp):                     # every rank creates every group, in the same order
                ranks = layout.expert_group(s)
                group = dist.new_group(ranks, backend=kind, timeout=datetime.timedelta(seconds=timeout_s))
                if rank in ranks:
                    experts = AllToAll(group, ranks.index(rank), ep, device)
        link = TorchDistTransport(rank, world, device=device, backend=kind) if is_stage and pp > 1 else None
        return ReplicaComm(link, experts, dist.destroy_process_group)
    if kind == "nccl4py":
        require_nccl4py()
        device = cuda_device()
        torch.cuda.set_device(device)
        store = nccl4py_store(rank, world, master_port=master_port, master_addr=master_addr, timeout_s=timeout_s)
        link = experts = None
        comms = []
        if is_stage and pp > 1:                     # all stages first, then each expert group: no cycle
            comms.append(nccl4py_communicator(store, "stages", rank, pp, device))
            link = Nccl4pyTransport(rank, pp, comm=comms[-1], device=device)
        if ep > 1:
            ranks = layout.expert_group(stage)
            comms.append(nccl4py_communicator(store, f"experts{stage}", ranks.index(rank), ep, device))
            experts = Nccl4pyAllToAll(comms[-1], ranks.index(rank), ep, device)

        def close():
            for c in comms:
                getattr(c, "destroy", lambda: None)()
        comm = ReplicaComm(link, experts, close)
        comm._store = store                         # rank 0 hosts it: keep it alive
        return comm
    raise ValueError(f"--transport: {kind!r} is not a collective carrier (gloo, nccl, nccl4py)")
