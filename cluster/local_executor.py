"""The whole model in this process: the single-process engine (and the oracle's setup)."""
from __future__ import annotations

import asyncio
import concurrent.futures

import torch

from model_shards.weights import load_checkpoint
from cluster.contracts import StepPlan, StepResult

from .worker import StageWorker


class LocalExecutor:
    num_stages = 1
    runs_in_order = True      # passes one after another, in the order sent: look-ahead may follow a pass

    def __init__(self, folder, *, num_blocks: int, block_size: int, num_slots: int, max_verify_positions: int,
                 torch_threads: int | None = None, draft_dtype: str = "auto",
                 draft_vocab: bool = True, dtype: str = "auto", device: str = "cpu", cuda_graphs: bool = True):
        """dtype: the weights' and KV cache's (model_shards.weights.resolve_dtype: "auto" is float32 on a
        CPU, the checkpoint's dtype on a GPU); the engine passes the one its plan budgeted."""
        if torch_threads:
            torch.set_num_threads(torch_threads)
        self.worker = StageWorker(load_checkpoint(folder, dtype=dtype, device=device), num_blocks=num_blocks,
                                  block_size=block_size, num_slots=num_slots,
                                  max_verify_positions=max_verify_positions, device=device,
                                  draft_dtype=draft_dtype, draft_vocab=draft_vocab, cuda_graphs=cuda_graphs)
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="hybridserve-worker")

    def submit(self, plan: StepPlan) -> "asyncio.Future[StepResult]":
        """Starts the pass now (not when the event loop next runs a task: outputs of the last pass are
        being streamed then) and returns its future."""
        return asyncio.get_running_loop().run_in_executor(self._pool, self.worker.execute, plan)

    def is_fatal(self, err: BaseException) -> bool:
        """In one process a failed pass leaves the model intact: only the plan's requests are affected."""
        return False

    def rebuild(self) -> None:
        """Nothing to rebuild in-process; caches are overwritten as sequences restart."""

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False)
