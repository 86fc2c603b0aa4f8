"""The Ray actors of a replica: one per pipeline stage and one per expert-parallel rank of each stage.

Plans and results cross the process boundary as msgpack bytes. Hidden states and expert tokens move
over the replica's carrier (cluster/replica_comm.py): gloo, NCCL or nccl4py, joined by `init_comm`;
or, with transport "ray", through the object store (the engine passes each stage's output ObjectRef
straight to the next stage) and one `compute` call per MoE layer per shard.
"""
from __future__ import annotations

import logging
import os

import ray
import torch


def _setup(threads: int, niceness: int = 0) -> str:
    """Cap torch's threads (actors share the cores), ask for the model's priority, pick the device."""
    torch.set_num_threads(threads)
    if niceness:
        from .os_priority import set_niceness
        set_niceness(niceness)
    logging.basicConfig(level=os.environ.get("HYBRIDSERVE_LOG_LEVEL", "INFO"),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return "cuda" if torch.cuda.is_available() else "cpu"


@ray.remote(max_restarts=0)
class ExpertShardActor:
    def __init__(self, folder: str, layers: tuple[int, int], expert_range: tuple[int, int], threads: int = 1,
                 dtype: str = "auto", niceness: int = 0):
        self.device = _setup(threads, niceness)
        from model_shards.weights import read_config, resolve_dtype

        from .expert_shard import ExpertShard

        self.shard = ExpertShard.load(read_config(folder), folder, range(*layers), expert_range,
                                      resolve_dtype(dtype, self.device, folder)).to(self.device)
        self.comm = None
        self.layers_served = 0                 # MoE layer exchanges answered over the expert group

    @ray.method(enable_task_events=False)    # transport "ray": one call per MoE layer per pass (RemoteExperts)
    def compute(self, layer: int, x_lat, topk_weights, topk_ids):
        d = self.device
        return self.shard.compute(layer, x_lat.to(d), topk_weights.to(d), topk_ids.to(d)).cpu()

    def init_comm(self, kind: str, rank: int, pp: int, ep: int, master_addr: str, master_port: int,
                  timeout_s: float) -> None:
        """Join the replica's world (every actor at once)."""
        from .replica_comm import ReplicaLayout, join_replica

        self.comm = join_replica(kind, rank, ReplicaLayout(pp, ep), master_addr=master_addr,
                                 master_port=master_port, timeout_s=timeout_s)

    @ray.method(enable_task_events=False)    # one call per pass, from the stage's `run`
    def serve_pass(self, step_id: int) -> int:
        """Answer the stage's MoE layers of pass `step_id` over the expert group. -> layers served."""
        from .expert_dispatch import serve_pass

        n = serve_pass(self.comm.experts, step_id, self.shard.moe_layers, self.shard.compute, self.device)
        self.layers_served += n
        return n

    def stats(self) -> dict:
        return {"layers_served": self.layers_served, "pid": os.getpid()}

    def ping(self) -> str:
        return ray.get_runtime_context().get_node_id()


@ray.remote(max_restarts=0)
class StageActor:
    def __init__(self, folder: str, layers: tuple[int, int], *, shards: list | None,
                 shard_ranges: list[tuple[int, int]] | None, num_blocks: int, block_size: int, num_slots: int,
                 max_verify_positions: int, draft_dtype: str = "auto", draft_vocab: bool = True,
                 dtype: str = "auto", threads: int = 1, per_layer_calls: bool = True, niceness: int = 0,
                 cuda_graphs: bool = True):
        device = _setup(threads, niceness)
        from model_shards.config import MOE
        from model_shards.weights import load_checkpoint

        from .remote_experts import RemoteExperts
        from .worker import StageWorker

        rng = range(*layers)
        # With expert parallelism the stage itself holds rank 0's experts; shard actors hold the rest.
        model = load_checkpoint(folder, layers=rng, expert_range=shard_ranges[0] if shard_ranges else None,
                                device=device, dtype=dtype)
        if shards and per_layer_calls:         # transport "ray": a Ray call per shard per MoE layer
            for i, block in model.backbone.layers.items():
                if block.kind == MOE:
                    block.mixer.experts = RemoteExperts(int(i), block.mixer.experts, shards, shard_ranges[1:])
        self.worker = StageWorker(model, num_blocks=num_blocks, block_size=block_size, num_slots=num_slots,
                                  max_verify_positions=max_verify_positions, device=device, draft_dtype=draft_dtype,
                                  draft_vocab=draft_vocab, cuda_graphs=cuda_graphs)
        self.shard_ranges, self.shards = shard_ranges, shards or []
        self.has_moe = any(block.kind == MOE for block in model.backbone.layers.values())
        self.transport, self.dispatch, self.rank = None, None, 0

    def node_ip(self) -> str:
        return ray.util.get_node_ip_address()

    def init_comm(self, kind: str, rank: int, pp: int, ep: int, master_addr: str, master_port: int,
                  timeout_s: float) -> None:
        """Join the replica's world (every actor at once: the rendezvous is collective): the stage link
        for hidden states, and with expert shards the expert group its MoE layers dispatch over."""
        from model_shards.config import MOE

        from .expert_dispatch import CollectiveExperts, ExpertDispatch
        from .replica_comm import ReplicaLayout, join_replica

        self.rank = rank
        self.comm = join_replica(kind, rank, ReplicaLayout(pp, ep), master_addr=master_addr, master_port=master_port,
                                 timeout_s=timeout_s)
        self.transport = self.comm.stage_link
        if self.comm.experts is not None:
            self.dispatch = ExpertDispatch(self.comm.experts, self.shard_ranges[1:])
            for i, block in self.worker.model.backbone.layers.items():
                if block.kind == MOE:
                    block.mixer.experts = CollectiveExperts(int(i), block.mixer.experts, self.dispatch)

    @ray.method(enable_task_events=False)
    def run(self, plan_bytes: bytes, hidden=None):
        """One pass: hidden states out (not last) or msgpack StepResult bytes (last stage).

        Over a collective carrier the hidden states go straight to the next stage's `run`, which the
        engine started at the same time, and this returns None; so do the MoE layers' tokens, to the
        shards' `serve_pass`. No task events: Ray's GCS
        keeps up to 100k of them for the dashboard, and a pass per few milliseconds made the GCS
        process grow by ~30 MiB a minute under load (benchmarks/soak.py).
        """
        from cluster.contracts import decode_plan, encode

        plan = decode_plan(plan_bytes)
        if self.transport is not None and not self.worker.model.first:
            hidden = self.transport.recv(self.rank - 1, plan.step_id)
        followers = []
        if self.dispatch is not None and self.has_moe:
            # The shards follow this pass's MoE layers. Started here, not by the engine: one Ray call
            # per pass from the engine's process instead of 1 + shards (measured: the difference
            # between collectives slower than per-layer Ray calls on a small CPU machine and not).
            self.dispatch.step_id = plan.step_id
            followers = [x.serve_pass.remote(plan.step_id) for x in self.shards]
        out = self.worker.execute(plan, hidden)
        if followers:
            ray.get(followers)                 # a shard's own error is this pass's error
        if not isinstance(out, torch.Tensor):
            return encode(out)
        if self.transport is not None:
            self.transport.send(out, self.rank + 1, plan.step_id)
            return None
        return out.cpu()

    def stats(self) -> dict:
        return {"busy_s": self.worker.busy_s, "steps": self.worker.num_steps, "drafts_kept": len(self.worker.store),
                "expert_exchanges": self.dispatch.layers_sent if self.dispatch is not None else 0,
                "node_id": ray.get_runtime_context().get_node_id(), "pid": os.getpid()}
