"""The whole model in a child process of the replica: one pipe, msgpack plans in, results out.

Why: in one process the model's compute thread and the replica's event loop (Ray Serve streaming every
token of every request, the engine loop) share one GIL, so the replica runs on about one core however
many the machine has. In a child process the model computes while the parent streams. A pass costs
one pipe round trip (tens of microseconds), not a Ray actor call (LocalExecutor stays the in-process
choice for tests and the oracle; RayExecutor for pipeline and expert parallelism).

Failure: an error inside a pass comes back as that pass's error (the model is intact: only the plan's
requests fail). A child that died (killed, out of memory) makes every later pass fatal until the
engine rebuilds it: a new child, empty caches. A child whose parent died sees the pipe close and exits.
"""
from __future__ import annotations

import asyncio
import collections
import json
import logging
import os
import socket
import subprocess
import sys
import time
from multiprocessing.connection import Connection
from pathlib import Path

from cluster.contracts import StepPlan, StepResult, decode_plan, decode_result, encode

log = logging.getLogger("hybridserve.worker")
REPO = Path(__file__).resolve().parent.parent


class ChildDied(RuntimeError):
    """The model process is gone (its caches with it)."""


def _child_main(conn, folder: str, torch_threads: int | None, worker_kw: dict, dtype: str = "auto",
                niceness: int = 0) -> None:
    """The child: load the checkpoint, say ready (or why not), then run plans until the pipe closes."""
    try:
        import torch

        from .os_priority import set_niceness

        from model_shards.weights import load_checkpoint

        from .worker import StageWorker

        if torch_threads:
            torch.set_num_threads(torch_threads)
        if niceness:
            set_niceness(niceness)
        worker = StageWorker(load_checkpoint(folder, dtype=dtype, device=worker_kw.get("device", "cpu")), **worker_kw)
    except BaseException as e:  # noqa: BLE001 - reported to the parent, which raises it
        conn.send(("error", f"{type(e).__name__}: {e}"))
        return
    conn.send(("ready", os.getpid()))
    while True:
        try:
            data = conn.recv_bytes()
        except (EOFError, OSError):                    # the parent is gone
            return
        try:
            out = ("ok", encode(worker.execute(decode_plan(data))), worker.busy_s)
        except Exception as e:  # noqa: BLE001 - one failed pass, not a dead model
            out = ("error", f"{type(e).__name__}: {e}", worker.busy_s)
        try:
            conn.send(out)
        except (EOFError, OSError):
            return


class ProcessExecutor:
    num_stages = 1
    runs_in_order = True      # passes one after another, in the order sent: look-ahead may follow a pass

    def __init__(self, folder, *, num_blocks: int, block_size: int, num_slots: int, max_verify_positions: int,
                 torch_threads: int | None = None, draft_dtype: str = "auto", draft_vocab: bool = True,
                 dtype: str = "auto", device: str = "cpu", startup_timeout_s: float = 600.0, niceness: int = 0,
                 cuda_graphs: bool = True):
        """niceness: the child's nice value where the OS allows it (cluster/os_priority.py; 0: unchanged)."""
        self.folder, self.torch_threads, self.dtype, self.niceness = str(folder), torch_threads, dtype, niceness
        self.worker_kw = dict(num_blocks=num_blocks, block_size=block_size, num_slots=num_slots,
                              max_verify_positions=max_verify_positions, draft_dtype=draft_dtype,
                              draft_vocab=draft_vocab, device=device, cuda_graphs=cuda_graphs)
        self.startup_timeout_s = startup_timeout_s
        self.busy_s = 0.0                              # the child's compute time, as of the last result
        self._pending: collections.deque[asyncio.Future] = collections.deque()
        self._reading = None                           # the loop whose reader watches the pipe
        self._start()

    # ---- the child ----------------------------------------------------------------------------------
    def _start(self) -> None:
        """`python -m cluster.process_executor FD ARGS`: a fresh interpreter (not a fork of a process with
        Ray's and asyncio's threads, nor multiprocessing's spawn, which re-imports the parent's main
        module: Ray's worker script), talking over one end of a socket pair."""
        ours, theirs = socket.socketpair()
        args = json.dumps({"folder": self.folder, "torch_threads": self.torch_threads, "worker": self.worker_kw,
                           "dtype": self.dtype, "niceness": self.niceness})
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]))
        t0 = time.perf_counter()
        self.proc = subprocess.Popen([sys.executable, "-m", "cluster.process_executor", str(theirs.fileno()), args],
                                     pass_fds=[theirs.fileno()], env=env, cwd=str(REPO))
        theirs.close()
        self._conn = Connection(ours.detach())
        if not self._conn.poll(self.startup_timeout_s):
            self._kill()
            raise RuntimeError(f"the model process did not load {self.folder} in {self.startup_timeout_s:g}s")
        try:
            kind, detail = self._conn.recv()
        except EOFError:
            self._kill()
            raise RuntimeError(f"the model process died while loading {self.folder} "
                               f"(exit code {self.proc.poll()})") from None
        if kind != "ready":
            self._kill()
            raise RuntimeError(f"the model process could not load {self.folder}: {detail}")
        log.info("model process %d ready (%.1fs)", detail, time.perf_counter() - t0)

    def _kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        self._conn.close()

    # ---- passes -------------------------------------------------------------------------------------
    def submit(self, plan: StepPlan) -> "asyncio.Future[StepResult]":
        """Sends the plan now (the child computes while this loop streams the last pass's tokens) and
        returns the future of its result."""
        loop = asyncio.get_running_loop()
        if self._reading is not loop:                  # results are read when the pipe is readable
            loop.add_reader(self._conn.fileno(), self._on_readable)
            self._reading = loop
        fut = loop.create_future()
        try:
            self._conn.send_bytes(encode(plan))
        except (OSError, ValueError) as e:
            self._child_gone()
            fut.set_exception(ChildDied(f"the model process is gone (exit code {self.proc.poll()}): {e}"))
            return fut
        self._pending.append(fut)
        return fut

    def _on_readable(self) -> None:
        """Results come back in the order plans went out."""
        try:
            while self._conn.poll():
                msg = self._conn.recv()
                fut = self._pending.popleft()
                self.busy_s = msg[-1]
                if not fut.done():
                    if msg[0] == "ok":
                        fut.set_result(decode_result(msg[1]))
                    else:
                        fut.set_exception(RuntimeError(f"the pass failed in the model process: {msg[1]}"))
        except (EOFError, OSError):
            self._child_gone()

    def _child_gone(self) -> None:
        if self._reading is not None:
            self._reading.remove_reader(self._conn.fileno())
            self._reading = None
        err = ChildDied(f"the model process died (exit code {self.proc.poll()})")
        while self._pending:
            fut = self._pending.popleft()
            if not fut.done():
                fut.set_exception(err)

    def is_fatal(self, err: BaseException) -> bool:
        return isinstance(err, ChildDied)

    def rebuild(self) -> None:
        """After the child died: a new one, empty caches. The engine fails the requests that were in flight."""
        log.warning("restarting the model process")
        self.shutdown()
        self._start()

    def stats(self) -> list[dict]:
        return [{"busy_s": self.busy_s, "pid": self.proc.pid}]

    def shutdown(self) -> None:
        if self._reading is not None:
            try:
                self._reading.remove_reader(self._conn.fileno())
            except (ValueError, OSError):
                pass
            self._reading = None
        self._kill()


if __name__ == "__main__":                         # the child: FD JSON (see ProcessExecutor._start)
    _cfg = json.loads(sys.argv[2])
    _child_main(Connection(int(sys.argv[1])), _cfg["folder"], _cfg["torch_threads"], _cfg["worker"],
                _cfg.get("dtype", "auto"), _cfg.get("niceness", 0))
