"""The Ray actors of a replica: one per pipeline stage and one per expert-parallel rank of each stage.

Plans and results cross the process boundary as msgpack bytes; hidden states as tensors through the
object store (the engine passes each stage's output ObjectRef straight to the next stage).
"""
from __future__ import annotations

import logging
import os

import ray
import torch


def _setup(threads: int) -> str:
    """Cap torch's threads (actors share the cores) and pick this actor's device."""
    torch.set_num_threads(threads)
    logging.basicConfig(level=os.environ.get("HYBRIDSERVE_LOG_LEVEL", "INFO"),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return "cuda" if torch.cuda.is_available() else "cpu"


@ray.remote(max_restarts=0)
class ExpertShardActor:
    def __init__(self, folder: str, layers: tuple[int, int], expert_range: tuple[int, int], threads: int = 1,
                 dtype: str = "auto"):
        self.device = _setup(threads)
        from model_shards.weights import read_config, resolve_dtype

        from .expert_shard import ExpertShard

        self.shard = ExpertShard.load(read_config(folder), folder, range(*layers), expert_range,
                                      resolve_dtype(dtype, self.device, folder)).to(self.device)

    @ray.method(enable_task_events=False)    # hot path: one call per MoE layer per pass (see run)
    def compute(self, layer: int, x_lat, topk_weights, topk_ids):
        d = self.device
        return self.shard.compute(layer, x_lat.to(d), topk_weights.to(d), topk_ids.to(d)).cpu()

    def ping(self) -> str:
        return ray.get_runtime_context().get_node_id()


@ray.remote(max_restarts=0)
class StageActor:
    def __init__(self, folder: str, layers: tuple[int, int], *, shards: list | None,
                 shard_ranges: list[tuple[int, int]] | None, num_blocks: int, block_size: int, num_slots: int,
                 max_verify_positions: int, draft_dtype: str = "auto", draft_vocab: bool = True,
                 dtype: str = "auto", threads: int = 1):
        device = _setup(threads)
        from model_shards.config import MOE
        from model_shards.weights import load_checkpoint

        from .remote_experts import RemoteExperts
        from .worker import StageWorker

        rng = range(*layers)
        # With expert parallelism the stage itself holds rank 0's experts; shard actors hold the rest.
        model = load_checkpoint(folder, layers=rng, expert_range=shard_ranges[0] if shards else None, device=device,
                                dtype=dtype)
        if shards:
            for i, block in model.backbone.layers.items():
                if block.kind == MOE:
                    block.mixer.experts = RemoteExperts(int(i), block.mixer.experts, shards, shard_ranges[1:])
        self.worker = StageWorker(model, num_blocks=num_blocks, block_size=block_size, num_slots=num_slots,
                                  max_verify_positions=max_verify_positions, device=device, draft_dtype=draft_dtype,
                                  draft_vocab=draft_vocab)
        self.transport, self.rank = None, 0

    def node_ip(self) -> str:
        return ray.util.get_node_ip_address()

    def init_transport(self, kind: str, rank: int, world_size: int, master_addr: str, master_port: int) -> None:
        """Join the replica's torch.distributed group (gloo on CPU, nccl on GPU) for stage-to-stage
        hidden states; every stage calls this at once (the rendezvous is collective)."""
        from .transport import make_transport

        self.rank = rank
        self.transport = make_transport(kind, rank, world_size, master_port=master_port, master_addr=master_addr)

    @ray.method(enable_task_events=False)
    def run(self, plan_bytes: bytes, hidden=None):
        """One pass: hidden states out (not last) or msgpack StepResult bytes (last stage).

        With a torch.distributed transport the hidden states go straight to the next stage's `run`,
        which the engine started at the same time, and this returns None. No task events: Ray's GCS
        keeps up to 100k of them for the dashboard, and a pass per few milliseconds made the GCS
        process grow by ~30 MiB a minute under load (benchmarks/soak.py).
        """
        from cluster.contracts import decode_plan, encode

        plan = decode_plan(plan_bytes)
        if self.transport is not None and not self.worker.model.first:
            hidden = self.transport.recv(self.rank - 1, plan.step_id)
        out = self.worker.execute(plan, hidden)
        if not isinstance(out, torch.Tensor):
            return encode(out)
        if self.transport is not None:
            self.transport.send(out, self.rank + 1, plan.step_id)
            return None
        return out.cpu()

    def stats(self) -> dict:
        return {"busy_s": self.worker.busy_s, "steps": self.worker.num_steps, "drafts_kept": len(self.worker.store),
                "node_id": ray.get_runtime_context().get_node_id(), "pid": os.getpid()}
