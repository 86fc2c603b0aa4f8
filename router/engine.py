"""The engine loop: continuous batching over an executor (one process, or a pipeline of Ray actors).

Each turn it fills up to P micro-batches (P = pipeline degree) with disjoint groups of sequences,
awaits whichever pass returns first, applies its result (accepted tokens, new drafts) and streams the
new tokens to their requests. Accepted counts ride in the sequences' next plans, so stages commit
Mamba states without an extra round trip.
"""
from __future__ import annotations

import asyncio
import collections
import dataclasses
import itertools
import logging
import math
import random
import time
from typing import AsyncIterator

from cluster.executor import Executor
from model_shards.sampling_params import SamplingParams
from model_shards.weights import read_config

from .block_manager import BlockManager
from .engine_config import EngineConfig, resolve_checkpoint
from .outputs import EngineDeadError, EngineStats, QueueFullError, RequestOutput
from .request_stream import RequestStream
from .scheduler import PlanningError, Scheduler, SchedulerConfig
from .sequence import Sequence
from .spec_policy import AdaptivePolicy, FixedPolicy
from .spec_policy import observe as observe_pass

log = logging.getLogger("hybridserve.engine")


def make_executor(config: EngineConfig, folder, plan, num_blocks: int, num_slots: int) -> Executor:
    kw = dict(num_blocks=num_blocks, block_size=config.block_size, num_slots=num_slots,
              max_verify_positions=config.num_speculative_tokens + 1, draft_dtype=config.draft_dtype,
              draft_vocab=config.draft_vocab, dtype=config.dtype, cuda_graphs=config.cuda_graphs)
    if not config.use_ray:
        kw["device"] = config.local_device()
    if not config.use_ray and config.model_process:
        from cluster.process_executor import ProcessExecutor
        return ProcessExecutor(folder, torch_threads=config.torch_threads, niceness=config.model_niceness, **kw)
    if not config.use_ray:
        from cluster.local_executor import LocalExecutor
        return LocalExecutor(folder, torch_threads=config.torch_threads, **kw)
    from cluster.ray_executor import RayExecutor
    return RayExecutor(folder, plan, actor_num_cpus=config.actor_num_cpus,
                       torch_threads=config.torch_threads, placement_strategy=config.placement_strategy,
                       stage_resources=config.stage_resources, transport=config.transport,
                       niceness=config.model_niceness, **kw)


def _pass(executor: Executor, plan):
    """The pass's awaitable, its work started now: executors send the plan (to a thread, a child process,
    the stage actors) when called, so the model computes while this loop streams the last pass's
    tokens. A synchronous failure to send is that pass's failure, like any other."""
    try:
        work = executor.submit(plan)
    except Exception as e:  # noqa: BLE001 - handled where the pass's result is applied
        err = e

        async def failed():
            raise err
        return failed()

    async def result():
        return await work
    return result()


class AsyncEngine:
    def __init__(self, config: EngineConfig, executor: Executor | None = None):
        config.validate()
        self.folder = resolve_checkpoint(config.model, config.seed)
        self.model_config = read_config(self.folder)
        # "auto" becomes the checkpoint's k here; from now on config.num_speculative_tokens is an int, and
        # config.dtype the one dtype the executors load in and the planner budgets.
        config = self.config = dataclasses.replace(
            config, num_speculative_tokens=config.speculative_tokens_for(self.model_config.has_mtp),
            dtype=config.model_dtype(self.folder))
        if config.num_speculative_tokens and not self.model_config.has_mtp:
            raise ValueError(f"num_speculative_tokens: {self.model_config.name} has no MTP block; use 0")
        self.max_model_len = min(config.max_model_len, self.model_config.max_position_embeddings)
        self.plan = self._plan()
        num_slots = self.plan.max_num_seqs
        num_blocks = self._num_kv_blocks()
        self.blocks = BlockManager(num_blocks, config.block_size, num_slots)
        # The adaptive policy learns this deployment's pass costs from every pass, whichever policy plans.
        k = config.num_speculative_tokens
        self.adaptive_policy = AdaptivePolicy(k, microbatches=config.microbatches) if k else None
        self.scheduler = Scheduler(SchedulerConfig(
            max_num_seqs=num_slots, max_num_batched_tokens=config.max_num_batched_tokens,
            max_model_len=self.max_model_len, max_queued_requests=config.max_queued_requests,
            eos_token_id=self.model_config.eos_token_id), self.blocks)
        self.set_speculative_policy(config.speculative_policy)
        t0 = time.perf_counter()
        self.executor = executor or make_executor(config, self.folder, self.plan, num_blocks, num_slots)
        # Look-ahead (router/scheduler.py) needs passes run in order on one model, one micro-batch at a time.
        self.look_ahead = (config.async_scheduling and config.microbatches == 1
                           and getattr(self.executor, "runs_in_order", False))
        self.scheduler.config = dataclasses.replace(self.scheduler.config, look_ahead=self.look_ahead)
        log.info("engine ready: model %s (%s), pp=%d ep=%d mtp k=%d (%s), %d KV blocks x %d, %d Mamba slots (%.1fs)",
                 self.model_config.name, self.folder, config.pipeline_parallel_size, config.expert_parallel_size,
                 config.num_speculative_tokens, config.speculative_policy, num_blocks, config.block_size, num_slots,
                 time.perf_counter() - t0)
        self._streams: dict[str, asyncio.Queue] = {}
        self._seq_of: dict[str, int] = {}
        self._choice_ids: dict[str, tuple[int, ...]] = {}   # n > 1: its choices' seq ids (router/fork.py)
        self._ids = itertools.count()
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._in_flight: set[asyncio.Future] = set()
        self.stats_ = EngineStats(kv_blocks_total=num_blocks, mamba_slots_total=num_slots,
                                  drafted_per_position=[0] * config.num_speculative_tokens,
                                  accepted_per_position=[0] * config.num_speculative_tokens,
                                  drafts_per_seq=[0] * (k + 1) if k else [])
        self.step_times: collections.deque[float] = collections.deque(maxlen=4096)  # pass wall times
        self.loop_overhead_s = 0.0             # engine-loop time spent scheduling and applying results
        self._finish_times: collections.deque[float] = collections.deque(maxlen=32)
        self._last_progress = time.monotonic()  # when a pass last returned (or the loop last idled)
        self._last_return = 0.0                 # perf_counter of the last pass back: a queued pass starts then
        self.broken = False                     # the executor could not be rebuilt: restart the replica

    def _plan(self):
        """The planner's replica plan: the stage split, and the slots and KV blocks memory allows
        (the engine uses the smaller of those and its own settings)."""
        from cluster.parallel import ParallelConfig
        from cluster.planner import DTYPE_BYTES, plan_replica

        c = self.config
        parallel = ParallelConfig(pipeline_parallel_size=c.pipeline_parallel_size,
                                  expert_parallel_size=c.expert_parallel_size)
        devices = c.device_spec(parallel.devices_per_replica, DTYPE_BYTES[c.dtype])
        return plan_replica(self.model_config, parallel, devices,
                            block_size=c.block_size, num_speculative_tokens=c.num_speculative_tokens,
                            context_len=self.max_model_len, max_num_seqs=c.max_num_seqs, draft_dtype=c.draft_dtype,
                            draft_vocab=c.draft_vocab and (self.folder / "draft_vocab.json").exists())

    def _num_kv_blocks(self) -> int:
        """--num-gpu-blocks-override if given, else what the plan's memory and max_num_seqs allow; the
        context limit shrinks (with a warning) to what the whole cache can hold for one sequence."""
        c = self.config
        num_blocks = c.num_kv_blocks or min(c.kv_blocks(), self.plan.num_kv_blocks or c.kv_blocks())
        if c.num_kv_blocks and self.plan.num_kv_blocks and c.num_kv_blocks > self.plan.num_kv_blocks:
            log.warning("num_kv_blocks: override %d is above the %d blocks memory allows on this replica",
                        c.num_kv_blocks, self.plan.num_kv_blocks)
        room = num_blocks * c.block_size - c.num_speculative_tokens + 1   # kv_positions(room, k) == capacity
        if room < self.max_model_len:
            if room < 2:
                raise ValueError(f"num_kv_blocks: {num_blocks} blocks of {c.block_size} tokens cannot hold a "
                                 f"sequence of 2 tokens plus {c.num_speculative_tokens} draft positions")
            log.warning("max_model_len: lowered from %d to %d, what %d KV blocks of %d tokens hold",
                        self.max_model_len, room, num_blocks, c.block_size)
            self.max_model_len = room
        return num_blocks

    def set_speculative_policy(self, name: str) -> None:
        """adaptive (router/spec_policy.py) or fixed (k drafts every step); outputs never depend on it.
        Switching forgets the adaptive policy's per-sequence estimates, not what it measured of passes."""
        if name not in ("adaptive", "fixed"):
            raise ValueError(f"speculative_policy: must be adaptive or fixed, got {name!r}")
        self.config.speculative_policy = name
        if self.adaptive_policy is not None:
            self.adaptive_policy.forget_sequences()
        adaptive = name == "adaptive" and self.adaptive_policy is not None
        self.scheduler.policy = self.adaptive_policy if adaptive else FixedPolicy()

    # ---- lifecycle -----------------------------------------------------------------------------
    async def start(self) -> None:
        if self._task is None:
            self._wake = asyncio.Event()
            self._task = asyncio.create_task(self._loop(), name="hybridserve-engine")
            self._task.add_done_callback(self._loop_ended)

    async def shutdown(self) -> None:
        """Stop the loop and the executor; every request still open ends with an error (none hangs)."""
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        self._deliver(self.scheduler.fail_all("engine shut down", include_waiting=True))
        self.executor.shutdown()

    def _loop_ended(self, task: asyncio.Task) -> None:
        """The loop never ends but by shutdown; if it crashed anyway, say so and end every request."""
        if task.cancelled() or task.exception() is None:
            return
        err = task.exception()
        log.error("engine loop crashed: %s: %s", type(err).__name__, err, exc_info=err)
        self.stats_.healthy = False
        self._deliver(self.scheduler.fail_all(f"engine loop crashed: {type(err).__name__}: {err}",
                                              include_waiting=True))

    # ---- requests ------------------------------------------------------------------------------
    def add_request(self, request_id: str, prompt_ids: list[int], params: SamplingParams,
                    num_speculative_tokens: int | None = None) -> RequestStream:
        """Queue a request; iterate the returned stream for its RequestOutputs, close it to abort.

        Raises ValueError (a bad field: the message starts with its name), QueueFullError, EngineDeadError.
        num_speculative_tokens: MTP drafts for this request (default: the engine's; at most that).
        """
        if (not self.is_running and self._task is not None) or self.broken:
            raise EngineDeadError("the engine loop is not running" if not self.broken
                                  else "the replica's actors could not be rebuilt")
        params.validate()
        k = self.config.num_speculative_tokens if num_speculative_tokens is None else num_speculative_tokens
        if not 0 <= k <= self.config.num_speculative_tokens:
            raise ValueError(f"num_speculative_tokens: must be in 0..{self.config.num_speculative_tokens}, got {k}")
        if not prompt_ids:
            raise ValueError("prompt: must contain at least one token")
        if len(prompt_ids) >= self.max_model_len:
            raise ValueError(f"prompt: {len(prompt_ids)} tokens, but the context limit is {self.max_model_len} "
                             f"tokens (prompt + at least 1 generated)")
        vocab = self.model_config.vocab_size
        bad = next((t for t in prompt_ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise ValueError(f"prompt: token id {bad} is outside the vocabulary [0, {vocab})")
        if request_id in self._streams:
            raise ValueError(f"request_id: {request_id!r} is already running")
        if len(self.scheduler.waiting) >= self.config.max_queued_requests:
            raise QueueFullError(self.config.max_queued_requests, self._retry_after_s())
        seed = params.seed if params.seed is not None else random.getrandbits(62)
        seq = Sequence(next(self._ids), request_id, list(prompt_ids), params, seed, k,
                       fork_ids=tuple(next(self._ids) for _ in range(params.n)) if params.n > 1 else ())
        if not self._in_flight and not self.scheduler.has_work:
            self._last_progress = time.monotonic()  # an idle spell is not a stall
        self.scheduler.add(seq)                     # raises ValueError if it can never fit the cache
        q: asyncio.Queue = asyncio.Queue()
        self._streams[request_id] = q
        self._seq_of[request_id], self._choice_ids[request_id] = seq.seq_id, seq.fork_ids
        if self._wake:
            self._wake.set()
        return RequestStream(request_id, q.get, lambda: self.abort(request_id),
                             lambda: None if q.empty() else q.get_nowait())

    async def generate(self, request_id: str, prompt_ids: list[int], params: SamplingParams,
                       num_speculative_tokens: int | None = None) -> AsyncIterator[RequestOutput]:
        """Stream a request's outputs. Closing the iterator early (client gone) aborts the request."""
        async with self.add_request(request_id, prompt_ids, params, num_speculative_tokens) as stream:
            async for out in stream:
                yield out

    def abort(self, request_id: str) -> None:
        """End a request now: freed at once, or when the pass it is in returns (within one step)."""
        seq_id = self._seq_of.get(request_id)
        if seq_id is None:
            return
        for i in (seq_id, *self._choice_ids.get(request_id, ())):   # n > 1: its parent, or its choices
            out = self.scheduler.abort(i)
            if out is not None:
                self._deliver([out])
        if self._wake:
            self._wake.set()

    @property
    def is_running(self) -> bool:
        """The engine loop is alive (started and not crashed)."""
        return self._task is not None and not self._task.done()

    @property
    def stall_seconds(self) -> float:
        """How long the engine has had work but no pass back (0 when idle)."""
        busy = bool(self._in_flight) or self.scheduler.has_work
        return time.monotonic() - self._last_progress if busy else 0.0

    @property
    def is_stepping(self) -> bool:
        """Alive, healthy, and either idle or finishing passes (not stuck on one for `stall_timeout_s`)."""
        return self.is_running and self.stats_.healthy and self.stall_seconds < self.config.stall_timeout_s

    def stats(self) -> EngineStats:
        """A snapshot (a copy): safe to keep or serialise."""
        s = self.stats_
        s.waiting, s.running = len(self.scheduler.waiting), len(self.scheduler.running)
        s.kv_blocks_used, s.mamba_slots_used = self.blocks.used_blocks, self.blocks.used_slots
        s.prompt_tokens_computed = self.scheduler.num_prefilled
        s.stepping = self.is_stepping
        return dataclasses.replace(s, drafted_per_position=list(s.drafted_per_position),
                                   accepted_per_position=list(s.accepted_per_position),
                                   drafts_per_seq=list(s.drafts_per_seq))

    def _retry_after_s(self) -> float:
        """When a refused request may find room: the time to drain the queue at the recent finish rate."""
        if not self._finish_times or len(self._finish_times) < 2:
            return 1.0
        span = self._finish_times[-1] - self._finish_times[0]
        rate = (len(self._finish_times) - 1) / span if span > 0 else 0.0
        return float(min(60.0, max(1.0, len(self.scheduler.waiting) / rate))) if rate else 1.0

    # ---- the loop ------------------------------------------------------------------------------
    async def _loop(self) -> None:
        """Fill the pipeline, await the first pass back, apply it. Nothing here may end the loop: a
        failure fails the requests it concerns and the loop goes on."""
        while True:
            self._fill_pipeline()
            if not self._in_flight:
                self._wake.clear()
                if self.scheduler.has_work:     # nothing in flight, work pending, nothing plannable
                    self._fail_stuck()
                    await asyncio.sleep(0)      # never spin without yielding to the event loop
                else:
                    await self._wake.wait()
                    self._last_progress = time.monotonic()
                continue
            done, _ = await asyncio.wait(self._in_flight, return_when=asyncio.FIRST_COMPLETED)
            for fut in sorted(done, key=lambda f: f.plan.step_id):    # look-ahead: a pass after the one before it
                self._in_flight.discard(fut)
                if not await self._apply(fut):
                    break
                if self.look_ahead:             # the next step out before the loop applies a later pass
                    self._fill_pipeline()

    def _fill_pipeline(self) -> None:
        """P micro-batches of disjoint sequences; with look-ahead, one pass and the next queued behind it."""
        P, sched = self.config.microbatches, self.scheduler
        most = 2 if self.look_ahead else P
        while len(self._in_flight) < most and (sched.has_work or (self._in_flight and sched.can_look_ahead)):
            idle = sum(not s.in_flight for s in sched.running) + len(sched.waiting)
            per_mb = None if self.look_ahead else max(1, math.ceil(idle / (P - len(self._in_flight))))
            t0 = time.perf_counter()
            try:
                plan = self.scheduler.schedule(max_seqs=per_mb, microbatch=len(self._in_flight))
            except PlanningError as e:      # a scheduler bug: fail the request it concerns, keep serving
                log.exception("scheduling failed")
                msg = f"scheduler error: {e}"
                self._deliver(self.scheduler.fail(e.seq_id, msg) if e.seq_id is not None
                              else self.scheduler.fail_idle(msg))
                continue                    # plan the others without it
            finally:
                self.loop_overhead_s += time.perf_counter() - t0
            if plan is None:
                return
            if not self._in_flight:
                self._last_progress = time.monotonic()     # a stall is counted from the first pass out
            fut = asyncio.ensure_future(_pass(self.executor, plan))
            fut.plan, fut.t0 = plan, time.perf_counter()
            self._in_flight.add(fut)

    def _fail_stuck(self) -> None:
        """No pass in flight and none can be planned: waiting would be forever. The scheduler's
        admission check makes this unreachable; if it happens, fail the oldest idle request and say why."""
        idle = self.scheduler.idle()
        if not idle:                                    # only in-flight sequences, but no pass out
            self._deliver(self.scheduler.fail_all("scheduler deadlock: sequences in a pass that was never "
                                                  "submitted", include_waiting=True))
            return
        seq = min(idle, key=lambda s: s.arrival_time)
        msg = (f"scheduler deadlock: request {seq.request_id} cannot be planned ({self.blocks.used_blocks}/"
               f"{self.blocks.num_blocks} KV blocks and {self.blocks.used_slots}/{self.blocks.num_slots} "
               f"slots in use, nothing in flight)")
        log.error(msg)
        self._deliver(self.scheduler.fail(seq.seq_id, msg))

    async def _apply(self, fut) -> bool:
        """Apply one finished pass; False when the pipeline was rebuilt (other futures are gone)."""
        plan = fut.plan
        try:
            result = fut.result()
        except Exception as e:  # noqa: BLE001
            if self.executor.is_fatal(e):          # an actor died: its caches are gone for everyone (503)
                await self._recover(f"engine failure: {type(e).__name__}: {e}".splitlines()[0][:500])
                return False
            msg = f"the request's pass failed: {type(e).__name__}: {e}".splitlines()[0][:500]    # 500
            log.error("pass %d failed (%s); failing or retrying its %d sequence(s) alone", plan.step_id, msg,
                      len(plan.seqs))
            self._deliver(self.scheduler.pass_failed(plan, msg))
            return True
        t0 = time.perf_counter()
        self._last_progress = time.monotonic()
        seconds = t0 - max(fut.t0, self._last_return)      # a pass queued behind another starts when that ends
        self._last_return = t0
        self.step_times.append(seconds)
        if self.adaptive_policy is not None:
            observe_pass(self.adaptive_policy, plan, result, seconds)
        try:
            self._account_mtp(plan, result)
            self._deliver(self.scheduler.update(result))
        except Exception as e:  # noqa: BLE001 - a bad result fails the plan's requests, not the loop
            log.exception("applying pass %d failed", plan.step_id)
            self._deliver(self.scheduler.pass_failed(plan, f"applying the request's pass failed: "
                                                                   f"{type(e).__name__}: {e}"))
        self.loop_overhead_s += time.perf_counter() - t0
        return True

    async def _recover(self, msg: str) -> None:
        log.error("%s; failing %d admitted requests and rebuilding", msg, len(self.scheduler.running))
        for fut in self._in_flight:              # other passes of the dead pipeline cannot complete
            fut.cancel()
        self._in_flight.clear()
        self._deliver(self.scheduler.fail_all(msg))
        self.stats_.healthy = False
        try:
            await asyncio.get_running_loop().run_in_executor(None, self.executor.rebuild)
            self.stats_.healthy = True
            self._last_progress = time.monotonic()
            log.info("replica rebuilt; serving again")
        except Exception as e:  # noqa: BLE001
            log.error("rebuild failed: %s; failing the waiting requests too", e)
            self.broken = True
            self._deliver(self.scheduler.fail_all(msg, include_waiting=True))

    def _account_mtp(self, plan, result) -> None:
        self.stats_.steps += 1
        by_id = {s.seq_id: s for s in plan.seqs}
        for s in plan.seqs:                     # what the policy chose, for sequences with MTP on
            seq = self.scheduler.seqs.get(s.seq_id)
            if s.sample and seq is not None and seq.num_speculative and self.stats_.drafts_per_seq:
                self.stats_.drafts_per_seq[min(s.num_drafts, len(self.stats_.drafts_per_seq) - 1)] += 1
        for o in result.outputs:
            step = by_id.get(o.seq_id)
            for i in range(len(step.drafts) if step else 0):
                self.stats_.drafted_per_position[i] += 1
                if i < o.num_accepted:
                    self.stats_.accepted_per_position[i] += 1

    def _deliver(self, outs: list[RequestOutput]) -> None:
        for out in outs:
            q = self._streams.get(out.request_id)
            if q is None:
                continue
            q.put_nowait(out)
            self.stats_.tokens_generated += len(out.new_token_ids)
            if out.finished:
                self.stats_.requests_aborted += out.finish_reason == "abort"
                self.stats_.requests_failed += out.finish_reason == "error"
                self._finish_times.append(time.monotonic())
                self._streams.pop(out.request_id, None)
                self._seq_of.pop(out.request_id, None)
                self._choice_ids.pop(out.request_id, None)
