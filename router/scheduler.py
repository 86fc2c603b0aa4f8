"""Continuous batching: which sequences run in the next pass, and what each pass did to them.

No torch here. One `schedule()` builds one micro-batch (a StepPlan) from sequences that are not
already in flight, under a token budget; `update()` applies a StepResult. The engine keeps up to P
micro-batches in flight for pipeline degree P, each a disjoint group of sequences.
"""
from __future__ import annotations

import collections
import dataclasses
import logging

from model_shards.sampling_params import check_stop, drafts_to_verify

from .block_manager import BlockManager
from .contracts import SeqStep, StepPlan, StepResult
from .outputs import RequestOutput
from .sequence import SeqStatus, Sequence

log = logging.getLogger("hybridserve.scheduler")


@dataclasses.dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 16                 # running sequences (<= Mamba slots)
    max_num_batched_tokens: int = 512      # tokens per pass, drafts included
    max_model_len: int = 2048
    max_queued_requests: int = 64          # waiting sequences before add() refuses
    eos_token_id: int | None = 2


class Scheduler:
    def __init__(self, config: SchedulerConfig, blocks: BlockManager):
        self.config, self.blocks = config, blocks
        self.waiting: collections.deque[Sequence] = collections.deque()
        self.running: list[Sequence] = []
        self.seqs: dict[int, Sequence] = {}
        self.released: list[int] = []
        self.next_step = 0
        self.num_preemptions = 0

    # ---- requests in and out -------------------------------------------------------------------
    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)
        self.seqs[seq.seq_id] = seq

    def abort(self, seq_id: int) -> RequestOutput | None:
        """Cancel; the caches are freed now, or when the pass in flight returns."""
        seq = self.seqs.get(seq_id)
        if seq is None or seq.finished:
            return None
        seq.aborted = True
        if seq.in_flight:
            return None
        return self._finish(seq, "abort")

    def fail_all(self, message: str, include_waiting: bool = False) -> list[RequestOutput]:
        """The pipeline died: every admitted sequence fails (its caches are gone); waiting ones stay
        unless the pipeline cannot be rebuilt either."""
        victims = list(self.running) + (list(self.waiting) if include_waiting else [])
        outs = []
        for seq in victims:
            seq.in_flight = False
            outs.append(self._finish(seq, "error", error=message))
        return outs

    @property
    def has_work(self) -> bool:
        return bool(self.waiting) or any(not s.in_flight for s in self.running)

    @property
    def num_in_flight(self) -> int:
        return sum(s.in_flight for s in self.running)

    # ---- building a pass -----------------------------------------------------------------------
    def schedule(self, max_seqs: int | None = None, microbatch: int = 0) -> StepPlan | None:
        budget = self.config.max_num_batched_tokens
        limit = max_seqs or self.config.max_num_seqs
        steps: list[SeqStep] = []
        # 1. Running sequences first (decodes with their drafts, then unfinished prompt chunks).
        for seq in sorted((s for s in self.running if not s.in_flight), key=lambda s: s.arrival_time):
            if len(steps) >= limit or budget <= 0:
                break
            step = self._plan_seq(seq, budget)
            if step is not None:
                steps.append(step)
                budget -= step.num_tokens
        # 2. Admit waiting sequences while a slot, blocks and budget remain.
        while self.waiting and len(steps) < limit and budget > 0 and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[0]
            step = self._plan_seq(seq, budget, admit=True)
            if step is None:
                break
            self.waiting.popleft()
            seq.status = SeqStatus.RUNNING
            self.running.append(seq)
            steps.append(step)
            budget -= step.num_tokens
        if not steps:
            return None
        plan = StepPlan(self.next_step, microbatch, steps, self.released)
        self.released = []
        self.next_step += 1
        return plan

    def _plan_seq(self, seq: Sequence, budget: int, admit: bool = False) -> SeqStep | None:
        k = seq.num_speculative
        drafts = drafts_to_verify(seq.drafts, len(seq.output_ids), seq.params)
        drafts = drafts[:max(0, self.config.max_model_len - seq.num_tokens - 1)]
        remaining = seq.num_uncomputed
        n = min(remaining, budget) if remaining > 1 else 1
        final = n == remaining
        if final and drafts and n + len(drafts) > budget:
            drafts = drafts[:max(0, budget - n)]
        ids = seq.tokens[seq.num_computed:seq.num_computed + n] + (drafts if final else [])
        positions = seq.num_computed + len(ids) + k            # MTP drafting writes up to k past the pass
        if not self._make_room(seq, positions, admit):
            return None
        self.blocks.grow(seq, positions)
        seq.in_flight = True
        seq.pending = (len(ids), len(drafts) if final else 0, final)
        return SeqStep(
            seq_id=seq.seq_id, input_ids=ids, start_pos=seq.num_computed, mamba_slot=seq.mamba_slot,
            block_table=list(seq.block_table), drafts=drafts if final else [], sample=final,
            next_token=None if final else seq.tokens[seq.num_computed + n],
            commit_index=seq.commit_index, params=seq.params.to_dict(), seed=seq.seed, num_drafts=k)

    def _make_room(self, seq: Sequence, positions: int, admit: bool) -> bool:
        """Preempt (by recompute) the newest idle running sequences until `seq` fits; never in-flight ones."""
        while not self.blocks.can_hold(seq, positions):
            if admit:
                return False                                    # new work never evicts running work
            victims = [s for s in self.running if not s.in_flight and s is not seq]
            if not victims:
                return False
            victim = max(victims, key=lambda s: s.arrival_time)
            log.info("preempting seq %d (request %s) to make room", victim.seq_id, victim.request_id)
            self.blocks.free(victim)
            self.running.remove(victim)
            victim.reset_for_recompute()
            self.waiting.appendleft(victim)
            self.num_preemptions += 1
        return True

    # ---- applying a result ---------------------------------------------------------------------
    def update(self, result: StepResult) -> list[RequestOutput]:
        outs = []
        for o in result.outputs:
            seq = self.seqs.get(o.seq_id)
            if seq is None or seq.finished:
                continue
            seq.in_flight = False
            n, n_verified, sampled = seq.pending
            seq.pending = None
            if seq.aborted:
                outs.append(self._finish(seq, "abort"))
                continue
            seq.commit_index = o.num_accepted if n_verified else -1
            seq.num_computed += (n - n_verified + o.num_accepted) if sampled else n
            if not sampled:
                continue
            seq.output_ids.extend(o.new_tokens)
            seq.drafts = o.drafts
            keep, reason = check_stop(seq.output_ids, seq.params, self.config.eos_token_id)
            if reason is None and seq.num_tokens >= self.config.max_model_len:
                keep, reason = len(seq.output_ids), "length"
            del seq.output_ids[keep:]
            if reason:
                outs.append(self._finish(seq, reason))
            else:
                outs.append(self._emit(seq))
        return outs

    def _emit(self, seq: Sequence, reason: str | None = None, error: str | None = None) -> RequestOutput:
        new = seq.output_ids[seq.num_emitted:]
        seq.num_emitted = len(seq.output_ids)
        return RequestOutput(seq.request_id, new, reason, len(seq.prompt_ids), len(seq.output_ids), error)

    def _finish(self, seq: Sequence, reason: str, error: str | None = None) -> RequestOutput:
        self.blocks.free(seq)
        if seq in self.running:
            self.running.remove(seq)
        if seq in self.waiting:
            self.waiting.remove(seq)
        seq.status, seq.finish_reason = SeqStatus.FINISHED, reason
        self.released.append(seq.seq_id)
        del self.seqs[seq.seq_id]
        return self._emit(seq, reason, error)
