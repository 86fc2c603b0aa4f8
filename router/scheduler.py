"""Continuous batching: which sequences run in the next pass, and what each pass did to them.

No torch here. One `schedule()` builds one micro-batch (a StepPlan) from sequences that are not
already in flight, under a token budget; `update()` applies its StepResult. The engine keeps up to P
micro-batches in flight for pipeline degree P, each a disjoint group of sequences; their results may
come back in any order.

Correct by construction, not by care at each call:
- a sequence is in one place: `waiting` (no blocks, no slot, in arrival order), `running` (a slot
  and blocks) or finished (gone from `seqs`). It is in flight only while running: `seq.pending`
  names the plan's step, and only that step's result or failure lands on it. With look-ahead, a
  second plan may hold it too (`seq.ahead`, below).
- a plan re-checks each sequence when it reaches it, so one preempted to make room for an older one
  is not planned from a stale list.
- making room preempts only idle sequences that arrived after the one that needs it, and only when
  that is enough: nothing in flight is touched, and newer sequences never starve older ones.
- add() refuses a sequence whose worst case does not fit the whole cache alone. So with nothing in
  flight the oldest running sequence (or, none running, the first waiting one) can always be
  planned: work pending with nothing in flight and nothing plannable cannot happen.

Look-ahead (SchedulerConfig.look_ahead, router/look_ahead.py): with an executor that runs passes in
order, a sequence in a pass that samples one token and drafts nothing gets its next decode step planned
at once, its input the token that pass samples.

How many MTP drafts each sequence verifies and proposes is the speculation policy's choice
(router/spec_policy.py), made once per plan for the sequences it will likely hold; it only ever lowers
the counts below k, so none of the above depends on it.
"""
from __future__ import annotations

import collections
import dataclasses
import logging
from typing import Iterable

from cluster.contracts import SeqOutput, SeqStep, StepPlan, StepResult, kv_positions
from model_shards.sampling_params import check_stop, drafts_to_verify

from .block_manager import BlockManager
from .fork import Forker, OpenChoices, ready
from .look_ahead import LookAhead
from .outputs import RequestOutput
from .sequence import InFlight, SeqStatus, Sequence, priority as _priority
from .spec_policy import Choice, FixedPolicy, candidates, feed_mtp, pinned

log = logging.getLogger("hybridserve.scheduler")


class PlanningError(RuntimeError):
    """Planning `seq_id` raised (None: before any sequence); the engine fails that request alone."""

    def __init__(self, seq_id: int | None, cause: Exception):
        super().__init__(f"{type(cause).__name__}: {cause}")
        self.seq_id = seq_id


@dataclasses.dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 16                 # running sequences (<= Mamba slots)
    max_num_batched_tokens: int = 512      # tokens per pass, drafts included
    max_model_len: int = 2048
    max_queued_requests: int = 64          # waiting sequences before add() refuses
    eos_token_id: int | None = 2
    look_ahead: bool = False               # plan a decode step while the one before it is in flight (above)


class Scheduler:
    def __init__(self, config: SchedulerConfig, blocks: BlockManager, policy=None):
        self.config, self.blocks = config, blocks
        self.policy = policy or FixedPolicy()     # drafts per sequence per step (router/spec_policy.py)
        self._choice: Choice | None = None        # the adaptive policy's choice for the plan being built
        self.waiting: collections.deque[Sequence] = collections.deque()
        self.running: list[Sequence] = []
        self.seqs: dict[int, Sequence] = {}
        self.released: list[int] = []
        self.next_step = 0
        self.num_preemptions = 0
        self._plans: dict[int, StepPlan] = {}     # step id -> a plan in flight
        self.open_choices = OpenChoices()         # n > 1 (router/fork.py): choices per request not ended
        self.forker = Forker(self)
        self.num_prefilled = 0                    # prompt tokens computed, all passes together (n > 1: once)
        self.ahead = LookAhead(self)              # look-ahead steps (router/look_ahead.py)

    # ---- requests in and out -------------------------------------------------------------------
    def add(self, seq: Sequence) -> None:
        """Queue a sequence; ValueError (naming the field) if it could never run, even alone."""
        self._check_fits(seq)
        for s in self.forker.admit(seq):        # n > 1: its parent, or (a 1-token prompt) its n choices
            self.seqs[s.seq_id] = s
            self._enqueue(s)

    def max_positions(self, seq: Sequence) -> int:
        """The most KV positions `seq` can need: it ends by min(prompt + max_tokens, max_model_len)."""
        end = min(len(seq.prompt_ids) + max(1, seq.params.max_tokens), self.config.max_model_len)
        return kv_positions(end, seq.num_speculative)

    def _check_fits(self, seq: Sequence) -> None:
        p, limit, bm = len(seq.prompt_ids), self.config.max_model_len, self.blocks
        if seq.seq_id in self.seqs:
            raise ValueError(f"seq_id: {seq.seq_id} is already scheduled")
        if not p:
            raise ValueError("prompt: must contain at least one token")
        if p >= limit:
            raise ValueError(f"prompt: {p} tokens, but the context limit is {limit} tokens "
                             f"(prompt + at least 1 generated)")
        need, k = bm.blocks_for(self.max_positions(seq)), seq.num_speculative
        if need > bm.num_blocks:
            room = bm.num_blocks * bm.block_size
            most = room - kv_positions(p, k)            # the largest max_tokens that fits
            field, hint = ("max_tokens", f"max_tokens <= {most} fits") if most >= 1 else \
                ("prompt", "the prompt alone does not fit")
            raise ValueError(
                f"{field}: a prompt of {p} tokens + max_tokens {seq.params.max_tokens} + {k} drafting "
                f"positions needs {need} KV blocks of {bm.block_size} tokens but the cache has "
                f"{bm.num_blocks} ({room} tokens); {hint}")

    def abort(self, seq_id: int) -> RequestOutput | None:
        """Cancel; the caches are freed now, or when the pass in flight returns."""
        seq = self.seqs.get(seq_id)
        if seq is None:
            return None
        seq.aborted = True
        return None if seq.in_flight else self._finish(seq, "abort")

    def fail(self, seq_id: int, message: str) -> list[RequestOutput]:
        """End one request with an error: now, or when the pass it is in returns."""
        seq = self.seqs.get(seq_id)
        if seq is None:
            return []
        seq.error = seq.error or message
        return [] if seq.in_flight else [self._end(seq)]

    def fail_idle(self, message: str) -> list[RequestOutput]:
        """End every request not in a pass with an error (the engine's answer to a scheduler bug)."""
        return [out for seq in self.idle() for out in self.fail(seq.seq_id, message)]

    def fail_all(self, message: str, include_waiting: bool = False) -> list[RequestOutput]:
        """The pipeline died: its passes are gone and every admitted sequence fails (its caches are
        gone too); waiting ones stay unless the pipeline cannot be rebuilt either."""
        self._plans.clear()
        self.ahead.dropped.clear()
        outs = []
        for seq in list(self.running) + (list(self.waiting) if include_waiting else []):
            seq.pending = seq.ahead = None
            seq.error = seq.error or message
            outs.append(self._end(seq))
        return outs

    def idle(self) -> list[Sequence]:
        """Sequences not in a pass: running ones between passes, then the waiting ones."""
        return [s for s in self.running if not s.in_flight] + list(self.waiting)

    def stuck(self, awaited_steps: Iterable[int]) -> list[StepPlan]:
        """Plans in flight here that the engine no longer awaits (a lost pass): their sequences would
        never move again. Hand each to pass_failed(). Sequences between passes are never stuck: see
        add() and the module docstring."""
        awaited = set(awaited_steps)
        return [plan for step, plan in self._plans.items() if step not in awaited]

    @property
    def has_work(self) -> bool:
        return bool(self.waiting) or any(not s.in_flight for s in self.running)

    @property
    def num_in_flight(self) -> int:
        return sum(s.in_flight for s in self.running)

    @property
    def can_look_ahead(self) -> bool:
        """A sequence in flight may get its next step planned now (look-ahead)."""
        return self.ahead.on and any(self.ahead.eligible(s) for s in self.running)

    # ---- building a pass -----------------------------------------------------------------------
    def schedule(self, max_seqs: int | None = None, microbatch: int = 0) -> StepPlan | None:
        """A micro-batch of sequences not in flight, oldest first; None if none can run now.

        Raises PlanningError naming the sequence being planned if planning it raised; no sequence is
        left in flight in the plan that was not made (a bug, but one the engine can isolate)."""
        step_id, self._planning = self.next_step, None
        try:
            return self._schedule(max_seqs, microbatch)
        except Exception as e:
            for seq in self.running + list(self.waiting):
                if seq.pending is not None and seq.pending.step_id == step_id:
                    seq.pending = None
            raise PlanningError(self._planning, e) from e

    def _schedule(self, max_seqs: int | None, microbatch: int) -> StepPlan | None:
        budget, step_id = self.config.max_num_batched_tokens, self.next_step
        limit = max_seqs or self.config.max_num_seqs
        steps: list[SeqStep] = []
        preemptions, alone = self.num_preemptions, False

        def take(step: SeqStep | None, seq: Sequence) -> bool:
            nonlocal budget, alone
            if step is not None:
                steps.append(step)
                budget -= step.num_tokens
                alone = seq.suspect
            return step is not None

        def room() -> bool:
            return len(steps) < limit and budget > 0 and not alone

        idle = sorted((s for s in self.running if not s.in_flight), key=_priority)
        ahead = self.ahead.candidates()
        self._choice = self._choose_drafts(idle, ahead, limit, budget) if self.policy.adaptive else None
        # 0. A suspect waiting ahead of every idle running sequence has its turn first (alone).
        head = self.waiting[0] if self.waiting else None
        if head is not None and head.suspect and (not idle or _priority(head) < _priority(idle[0])):
            take(self._admit(head, budget, step_id), head)
        # 1. Running sequences between passes: decodes with their drafts, then prompt chunks.
        for seq in idle:
            if not room():
                break
            if seq.status is not SeqStatus.RUNNING or seq.in_flight or (seq.suspect and steps):
                continue
            if ready(seq):                      # a parent: its n choices' first steps, all or none
                for step in self.forker.plan(seq, budget, step_id, limit - len(steps) if steps else budget):
                    take(step, self.seqs[step.seq_id])
            else:
                take(self._plan_seq(seq, budget, step_id, may_preempt=True), seq)
        # 1b. Look-ahead: sequences in flight, their next decode step.
        for seq in ahead:
            if not room():
                break
            self._planning = seq.seq_id
            take(self.ahead.plan(seq, budget, step_id, self._choice), seq)
        # 2. Admit waiting ones in order while a slot, blocks and budget remain; never by preempting,
        #    nor in a plan that just preempted (that would undo it).
        while self.waiting and room() and self.num_preemptions == preemptions \
                and not (self.waiting[0].suspect and steps):
            seq = self.waiting[0]
            if not take(self._admit(seq, budget, step_id), seq):
                break
        if not steps:
            return None
        if self._choice is not None:
            feed_mtp(steps, self.seqs, self.policy)
        plan = StepPlan(step_id, microbatch, steps, self.released)
        self.released = []
        self.next_step += 1
        self._plans[step_id] = plan
        return plan

    def _choose_drafts(self, idle: list[Sequence], ahead: list[Sequence], limit: int, budget: int) -> Choice:
        """The policy's drafts for the sequences this plan will likely hold (spec_policy.candidates)."""
        room = max(0, self.config.max_num_seqs - len(self.running))
        likely = [s for s in idle + ahead + list(self.waiting)[:room] if not s.fork_ids]   # parents never sample
        cands, extra, extra_seqs = candidates(likely, limit, budget, self.config.max_model_len,
                                              ahead={s.seq_id for s in ahead})
        return self.policy.choose(cands, extra, self.config.max_num_batched_tokens, extra_seqs)

    def _admit(self, seq: Sequence, budget: int, step_id: int) -> SeqStep | None:
        """The first waiting sequence into `running`, if a slot and free blocks are there for its step."""
        if len(self.running) >= self.config.max_num_seqs:
            return None
        step = self._plan_seq(seq, budget, step_id, may_preempt=False)
        if step is not None:
            self.waiting.popleft()
            seq.status = SeqStatus.RUNNING
            self.running.append(seq)
        return step

    def _plan_seq(self, seq: Sequence, budget: int, step_id: int, may_preempt: bool) -> SeqStep | None:
        """Its next step within `budget`, with blocks for every position the pass may write."""
        self._planning = seq.seq_id
        remaining = seq.num_uncomputed          # >= 1: the newest token is always the next input
        n = min(remaining, budget)
        final = n == remaining and not seq.fork_ids          # a parent never samples
        propose = verify = 0 if seq.fork_ids else seq.num_speculative  # fixed: k every step
        if self._choice is not None:            # adaptive: the policy's counts (seeded random: always k)
            chosen = self._choice.get(seq.seq_id)
            if chosen is None:
                propose = verify = seq.num_speculative if pinned(seq) else 0
            else:
                propose, verify = chosen, self._choice.verify.get(seq.seq_id, 0)
            propose = propose if final else 0   # a prompt chunk that does not sample drafts nothing
        self.num_prefilled += max(0, min(len(seq.prompt_ids) - seq.num_computed, n))
        drafts: list[int] = []
        if remaining == 1:                      # decoding: verify the drafts that can still count
            drafts = drafts_to_verify(seq.drafts, len(seq.output_ids), seq.params)
            drafts = drafts[:max(0, min(self.config.max_model_len - seq.num_tokens - 1, budget - 1, verify))]
        ids = seq.tokens[seq.num_computed:seq.num_computed + n] + drafts
        positions = seq.num_computed + len(ids) + propose   # MTP drafting writes `propose` past it
        if not self._make_room(seq, positions, may_preempt):
            return None
        self.blocks.grow(seq, positions)
        step = SeqStep(
            seq_id=seq.seq_id, input_ids=ids, start_pos=seq.num_computed, mamba_slot=seq.mamba_slot,
            block_table=list(seq.block_table), drafts=drafts, sample=final,
            next_token=None if final else seq.tokens[seq.num_computed + n],
            commit_index=seq.commit_index, params=seq.params_dict, seed=seq.seed,
            num_drafts=propose, prompt_len=len(seq.prompt_ids), mtp_context=bool(seq.fork_ids and seq.num_speculative))
        seq.pending = InFlight(step_id, len(ids), len(drafts), final, propose)   # last: the step exists
        return step

    def _make_room(self, seq: Sequence, positions: int, may_preempt: bool) -> bool:
        """Blocks for `seq` to cover `positions`: free ones, else (if it may) preempt by recompute idle
        sequences that arrived after it, newest first, when that is enough. Never one in flight,
        never an older one: the oldest running sequence always gets room once passes return."""
        if self.blocks.can_hold(seq, positions):
            return True
        if not may_preempt:
            return False
        victims = sorted((s for s in self.running if not s.in_flight and _priority(s) > _priority(seq)),
                         key=_priority)
        short = self.blocks.blocks_for(positions) - len(seq.block_table) - len(self.blocks.free_blocks)
        if self.blocks.freed_by(victims) < short:
            return False
        while not self.blocks.can_hold(seq, positions):
            victim = victims.pop()
            log.info("preempting seq %d (request %s) for seq %d", victim.seq_id, victim.request_id, seq.seq_id)
            self._requeue(victim)
            self.num_preemptions += 1
        return True

    def _requeue(self, seq: Sequence) -> None:
        """Back to waiting with its caches dropped: it recomputes prompt + outputs from position 0."""
        self.ahead.leave(seq)
        self.blocks.free(seq)
        self.running.remove(seq)
        seq.reset_for_recompute()
        self._enqueue(seq)

    def _enqueue(self, seq: Sequence) -> None:
        at = next((i for i, w in enumerate(self.waiting) if _priority(w) > _priority(seq)), len(self.waiting))
        self.waiting.insert(at, seq)

    # ---- applying a result ---------------------------------------------------------------------
    def update(self, result: StepResult) -> list[RequestOutput]:
        """Apply a pass's result. Never raises on what it cannot use: a result for a step not in
        flight, or an output for a sequence not in that step, is ignored (logged); a sequence of the
        step with no output, or a malformed one, is handled as in a failed pass."""
        plan = self._plans.pop(result.step_id, None)
        if plan is None:
            log.warning("result of step %d, which is not in flight: ignored", result.step_id)
            return []
        outs, bad = [], []
        for o in result.outputs:
            if self.ahead.is_dropped(result.step_id, o.seq_id):
                continue
            landed = self._land(o.seq_id, result.step_id)
            if landed is None:
                log.warning("step %d: output for seq %d, not in that step: ignored", result.step_id, o.seq_id)
            elif self._malformed(landed[1], o):
                bad.append(landed[0])
            else:
                outs += self._apply(*landed, o)
        missing = [x[0] for x in (self._land(s.seq_id, plan.step_id) for s in plan.seqs) if x]
        if bad or missing:
            outs += self._failed(bad + missing, f"pass {plan.step_id} returned no valid output for it",
                                 alone=len(plan.seqs) == 1)
        self.ahead.landed(plan.step_id)
        return outs

    def pass_failed(self, plan: StepPlan, message: str) -> list[RequestOutput]:
        """A pass raised (an actor that died is fail_all's): its sequences' stage-side state may be
        half-updated. A plan of one sequence: that one ends with the error. Otherwise each is reset
        for recompute and runs alone until a pass of its own succeeds, so a repeated failure pins
        down the one responsible while the others continue. Aborted ones just end. Also safe after
        update() of the same plan (only sequences still in flight in it are touched)."""
        if self._plans.pop(plan.step_id, None) is not None:
            self.released += plan.released      # the stages may not have seen them
        self.ahead.landed(plan.step_id)
        seqs = [x[0] for x in (self._land(s.seq_id, plan.step_id) for s in plan.seqs) if x]
        return self._failed(seqs, message, alone=len(plan.seqs) == 1)

    def _failed(self, seqs: list[Sequence], message: str, alone: bool) -> list[RequestOutput]:
        outs = []
        for seq in seqs:
            if seq.aborted or seq.error or alone:
                seq.error = seq.error or message
                outs.append(self._end(seq))
            else:
                log.warning("seq %d (request %s) was in a failed pass: recomputing it alone", seq.seq_id,
                            seq.request_id)
                seq.suspect = True
                self._requeue(seq)
        return outs

    def _land(self, seq_id: int, step_id: int) -> tuple[Sequence, InFlight] | None:
        """The sequence and what its pass held, if it is in flight in `step_id`; it is no longer in that
        pass (its look-ahead pass, if any, is now the one it is in)."""
        seq = self.seqs.get(seq_id)
        if seq is None or seq.pending is None or seq.pending.step_id != step_id:
            return None
        pending, seq.pending, seq.ahead = seq.pending, seq.ahead, None
        return seq, pending

    @staticmethod
    def _malformed(p: InFlight, o: SeqOutput) -> bool:
        if not p.samples:
            return bool(o.new_tokens) or o.num_accepted != 0
        return not 0 <= o.num_accepted <= p.num_verified or len(o.new_tokens) != o.num_accepted + 1

    def _apply(self, seq: Sequence, p: InFlight, o: SeqOutput) -> list[RequestOutput]:
        if seq.aborted or seq.error:
            return [self._end(seq)]
        seq.suspect = False
        seq.note_logprobs(o)
        seq.commit_index = o.num_accepted if p.num_verified else -1
        if not p.samples:
            seq.num_computed += p.num_tokens
            return []
        seq.num_computed += p.num_tokens - p.num_verified + o.num_accepted
        seq.output_ids.extend(o.new_tokens)
        self.policy.observe_verified(seq.seq_id, p.num_verified, o.num_accepted)
        seq.num_verified_drafts += p.num_verified
        seq.num_accepted_drafts += o.num_accepted
        seq.num_verify_steps += p.num_verified > 0
        seq.drafts = list(o.drafts[:seq.num_speculative])   # the stages verify at most k
        keep, reason = check_stop(seq.output_ids, seq.params, self.config.eos_token_id)
        most = self.config.max_model_len - len(seq.prompt_ids)
        if keep > most or (keep == most and reason is None):
            keep, reason = most, "length"
        del seq.output_ids[keep:]
        return [self._finish(seq, reason) if reason else self._emit(seq)]

    def _emit(self, seq: Sequence, reason: str | None = None, error: str | None = None) -> RequestOutput:
        new, logprobs = seq.output_ids[seq.num_emitted:], seq.logprobs_since(seq.num_emitted)
        seq.num_emitted = len(seq.output_ids)
        return RequestOutput(seq.request_id, new, reason, len(seq.prompt_ids), len(seq.output_ids), error,
                             seq.num_verified_drafts, seq.num_accepted_drafts, seq.num_verify_steps, *logprobs,
                             index=seq.index, open_choices=self.open_choices.update(seq, reason))

    def _end(self, seq: Sequence) -> RequestOutput:
        """An aborted or failed sequence, out of flight: finish it as such."""
        return self._finish(seq, "abort") if seq.aborted else self._finish(seq, "error", error=seq.error)

    def _finish(self, seq: Sequence, reason: str, error: str | None = None) -> RequestOutput:
        self.ahead.leave(seq)
        self.blocks.free(seq)
        if seq in self.running:
            self.running.remove(seq)
        if seq in self.waiting:
            self.waiting.remove(seq)
        seq.status, seq.finish_reason = SeqStatus.FINISHED, reason
        self.released.append(seq.seq_id)
        self.seqs.pop(seq.seq_id, None)
        self.policy.release(seq.seq_id)
        return self._emit(seq, reason, error)
