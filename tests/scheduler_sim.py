"""The engine loop and the pipeline stages in plain Python, driving the real Scheduler and BlockManager.

Why: the scheduler's bugs show up only in interleavings (a preemption while a plan is built, results
back out of order, an abort while in flight, a pass that raises), which a model run rarely hits and
never shrinks. This simulation replays router/engine.py's loop: up to P micro-batches in flight,
results back in any order, aborts at any turn, a failed pass handed to `Scheduler.pass_failed`. The
stages are modelled by what they hold (per sequence: its Mamba slot, position, pending commit; per
KV block: who wrote it last), so a plan that reads state the stages do not have fails the run too.

`Sim.run()` raises `SchedulerBug` naming the broken invariant; the scheduler's own exceptions pass
through unchanged.
"""
from __future__ import annotations

import dataclasses
import math
import random

from model_shards.sampling_params import SamplingParams
from router.block_manager import BlockManager
from cluster.contracts import SAMPLED_TOKEN, SeqOutput, StepPlan, StepResult
from router.scheduler import Scheduler, SchedulerConfig
from router.sequence import Sequence, SeqStatus, priority
from router.spec_policy import AdaptivePolicy, draft_rows

EOS = 2


class SchedulerBug(AssertionError):
    """An invariant of the scheduler does not hold."""


@dataclasses.dataclass(frozen=True)
class Request:
    arrival: int                 # loop turn it comes in
    prompt_len: int
    max_tokens: int
    k: int = 0                   # MTP drafts
    abort_at: int | None = None  # loop turn its client goes away (None: never)
    poison: bool = False         # every pass that holds it raises
    seeded: bool = False         # seeded random sampling: the adaptive policy keeps its k drafts
    n: int = 1                   # choices (router/fork.py): one prefill, then n sequences sharing its caches


@dataclasses.dataclass(frozen=True)
class Workload:
    num_blocks: int
    block_size: int
    num_slots: int
    max_num_seqs: int
    budget: int                  # max_num_batched_tokens
    max_model_len: int
    microbatches: int            # P
    requests: tuple[Request, ...]
    seed: int = 0                # results' order, acceptance, EOS, failures
    p_eos: float = 0.0           # a sampled token is EOS
    p_fail: float = 0.0          # any pass raises (Scheduler.pass_failed)
    adaptive: bool = False       # the adaptive speculation policy chooses the drafts (else k every step)
    cost: tuple[float, float, float] = (0.01, 0.001, 0.001)   # simulated pass seconds: fixed, per token, per MTP row
    look_ahead: bool = False     # the scheduler's look-ahead: one micro-batch and the next queued behind it, results
                                 # back in order (an in-order executor), stage reads checked when a pass runs


def worst_positions(r: Request, max_model_len: int) -> int:
    """KV positions a request may need at most (its last pass, plus k drafting positions)."""
    return min(r.prompt_len + r.max_tokens, max_model_len) - 1 + r.k


def fits_alone(r: Request, w: Workload) -> bool:
    """Its worst case fits the cache alone; n > 1: its n choices' first passes fit together (the shared
    prompt blocks once) and n sequences can run at once."""
    shared = (r.prompt_len - 1) // w.block_size
    fork = shared + r.n * (math.ceil((r.prompt_len + r.k) / w.block_size) - shared)
    return r.prompt_len < w.max_model_len and \
        math.ceil(worst_positions(r, w.max_model_len) / w.block_size) <= w.num_blocks and \
        (r.n == 1 or (r.n <= min(w.max_num_seqs, w.budget, w.num_slots)
                      and (r.prompt_len == 1 or fork <= w.num_blocks)))


def _age(seq: Sequence) -> tuple:
    return priority(seq)


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise SchedulerBug(msg)


class Sim:
    """checks=False: only what the engine itself would notice (exceptions, deadlock, the end state)."""

    def __init__(self, w: Workload, checks: bool = True):
        self.w, self.checks = w, checks
        self.blocks = BlockManager(w.num_blocks, w.block_size, w.num_slots)
        k = max((r.k for r in w.requests), default=0)
        # Probing and exploring often, so that short runs go through those paths too.
        self.policy = AdaptivePolicy(k, probe_every=2, explore_every=3) if w.adaptive and k else None
        self.sched = Scheduler(SchedulerConfig(max_num_seqs=w.max_num_seqs, max_num_batched_tokens=w.budget,
                                               max_model_len=w.max_model_len, eos_token_id=EOS,
                                               look_ahead=w.look_ahead), self.blocks,
                               self.policy)
        self.rng = random.Random(w.seed)
        self.turn = 0
        self.in_flight: list[StepPlan] = []
        self.reqs: dict[int, Request] = {}             # seq_id (a request's, or one of its choices') -> its request
        self.request_of: dict[int, int] = {}           # seq_id -> its request's index
        self.choice_ids: dict[int, tuple] = {}         # request index -> its sequences: (parent, choices...) or (seq,)
        self.next_id = len(w.requests)                 # choices' seq ids, after the requests' own
        self.outputs: dict[int, list] = {}             # request index -> RequestOutputs in order
        self.generated: dict[int, list[int]] = {}      # seq_id -> every token the stages sampled for it
        self.refused: list[int] = []
        self.aborted: set[int] = set()
        self.stage: dict[int, tuple] = {}              # seq_id -> (slot, position, commit, block_table)
        self.slot_holder: dict[int, int | None] = {}   # Mamba slot -> seq whose state it holds
        self.block_valid: dict[int, set] = {}          # KV block -> seqs whose KV it holds (n > 1: shared)
        self.history: list[str] = []                   # events, for the failure message
        self.num_plans = 0
        self.num_failures = 0
        self.proposed: set[int] = set()                # drafts proposed per sampling step, as chosen

    # ---- the loop (router/engine.py `_loop`) -------------------------------------------------------
    def run(self) -> "Sim":
        """Play the workload to the end; a failure carries the workload and the last events as notes."""
        try:
            return self._run()
        except Exception as e:
            e.add_note(f"workload: {self.w}")
            e.add_note("last events:\n  " + "\n  ".join(self.history[-25:]))
            raise

    def _run(self) -> "Sim":
        arrivals = sorted(enumerate(self.w.requests), key=lambda t: (t[1].arrival, t[0]))
        total = sum(r.n * (r.prompt_len + r.max_tokens + r.k) for r in self.w.requests)
        max_turns = 200 + 30 * total
        while True:
            while arrivals and arrivals[0][1].arrival <= self.turn:
                self._add(*arrivals.pop(0))
            self._aborts()
            self._fill()
            if not self.in_flight:
                if self.sched.has_work:
                    raise SchedulerBug(f"deadlock at turn {self.turn}: nothing in flight, work pending "
                                       f"({self._state()}), schedule() planned nothing")
                if not arrivals:
                    break
                self.turn = max(self.turn + 1, arrivals[0][1].arrival)
                continue
            self._complete(self.in_flight.pop(0 if self.w.look_ahead else self.rng.randrange(len(self.in_flight))))
            self.turn += 1
            _check(self.turn <= max_turns, f"livelock: not done after {max_turns} turns ({self._state()})")
        self._check_end()
        return self

    def _add(self, i: int, r: Request) -> None:
        params = SamplingParams(max_tokens=r.max_tokens, **(dict(temperature=1.0, seed=i) if r.seeded else {}))
        kids = tuple(range(self.next_id, self.next_id + r.n)) if r.n > 1 else ()
        seq = Sequence(i, f"r{i}", [10 + (i + j) % 50 for j in range(r.prompt_len)], params, seed=i,
                       num_speculative=r.k, arrival_time=float(self.turn), fork_ids=kids)
        try:
            self.sched.add(seq)
        except ValueError as e:
            _check(not fits_alone(r, self.w), f"request {i} fits the cache alone but add() refused it: {e}")
            self.refused.append(i)
            self.history.append(f"t{self.turn} refuse {i}")
            return
        _check(fits_alone(r, self.w), f"request {i} ({r}) can never fit the cache but add() took it")
        self.next_id += len(kids)
        self.choice_ids[i], self.outputs[i] = (i, *kids), []
        for j in (i, *kids):
            self.reqs[j], self.request_of[j], self.generated[j] = r, i, []
        self.history.append(f"t{self.turn} add {i}")
        self.check("add")

    def _aborts(self) -> None:
        for i, ids in self.choice_ids.items():
            r = self.reqs[i]
            if r.abort_at is not None and r.abort_at <= self.turn and i not in self.aborted:
                self.aborted.add(i)
                for j in ids:                           # as the engine does: the parent, or its choices
                    out = self.sched.abort(j)
                    self.history.append(f"t{self.turn} abort {j}")
                    self._record([out] if out else [])
                    self.check(f"abort({j})")

    def _fill(self) -> None:
        P, sched = self.w.microbatches, self.sched
        most = 2 if self.w.look_ahead else P
        while len(self.in_flight) < most and (sched.has_work or (self.in_flight and sched.can_look_ahead)):
            idle = sum(not s.in_flight for s in self.sched.running) + len(self.sched.waiting)
            per_mb = self.w.max_num_seqs if self.w.look_ahead else max(1, math.ceil(idle / (P - len(self.in_flight))))
            before = {q.seq_id: (_age(q), len(q.block_table)) for q in self.sched.running}
            plan = self.sched.schedule(max_seqs=per_mb, microbatch=len(self.in_flight))
            self._check_preemptions(before, plan)
            self.history.append(f"t{self.turn} plan " + ("None" if plan is None else
                                f"{plan.step_id}: {[(s.seq_id, s.start_pos, s.num_tokens) for s in plan.seqs]}"))
            if plan is None:
                self.check("schedule()")
                return
            self._check_plan(plan, per_mb)
            self.proposed |= {s.num_drafts for s in plan.seqs if s.sample and self.reqs[s.seq_id].k}
            self.in_flight.append(plan)
            self.num_plans += 1
            self.check("schedule()")

    def _complete(self, plan: StepPlan) -> None:
        poisoned = any(self.reqs[s.seq_id].poison for s in plan.seqs)
        fail = poisoned or (self.w.p_fail and self.rng.random() < self.w.p_fail)
        if fail and hasattr(self.sched, "pass_failed"):
            self.num_failures += 1
            for s in plan.seqs:                         # half-updated: nothing it writes is to be trusted
                self.stage.pop(s.seq_id, None)
                self.slot_holder[s.mamba_slot] = None
                self.block_valid.update({b: set() for b in self._written(s)})
            self.history.append(f"t{self.turn} pass {plan.step_id} failed")
            outs = self.sched.pass_failed(plan, "boom")
            self._record(outs)
            self.check(f"pass_failed(step {plan.step_id})")
            return
        if self.w.look_ahead:
            self._forks([st for st in plan.seqs if st.fork_of >= 0])
        result = StepResult(plan.step_id, plan.microbatch, [self._run_step(plan.step_id, s) for s in plan.seqs])
        if self.policy is not None:                     # what the engine measures of a pass
            fixed, per_token, per_row = self.w.cost
            rows = draft_rows(plan, result)
            noise = 1.0 + 0.2 * (self.rng.random() - 0.5)
            self.policy.observe_pass(plan.num_tokens, noise * (fixed + per_token * plan.num_tokens) + per_row * rows,
                                     per_row * rows, rows, len(plan.seqs))
        self.history.append(f"t{self.turn} result {plan.step_id}: "
                            f"{[(o.seq_id, o.new_tokens, o.num_accepted) for o in result.outputs]}")
        outs = self.sched.update(result)
        self._record(outs)
        self.check(f"update(step {plan.step_id})")

    # ---- the stages --------------------------------------------------------------------------------
    def _run_step(self, step_id: int, s) -> SeqOutput:
        """Look-ahead: the stages fill in a step's input (the token they last sampled for it) and find its
        state as they run it; a step whose output the scheduler will drop (its sequence ended or was
        requeued after it was planned) reads anything and samples nothing that counts."""
        if not self.w.look_ahead:
            return self._execute(s)
        dropped = (step_id, s.seq_id) in self.sched.ahead.dropped
        if not dropped:
            self._check_stage_reads(s)
        if s.input_ids == [SAMPLED_TOKEN] and not dropped:  # the token its last pass sampled, now its newest
            q = self.sched.seqs[s.seq_id]
            _check(s.start_pos == q.num_tokens - 1 and q.tokens[-1] == self.generated[s.seq_id][-1],
                   f"seq {s.seq_id}: look-ahead step at {s.start_pos}, its newest token is at {q.num_tokens - 1}")
        return self._execute(s, record=not dropped)

    def _execute(self, s, record: bool = True) -> SeqOutput:
        """What the stages do with one sequence's step: sample, verify, draft, and remember."""
        rng, eos = self.rng, lambda: EOS if rng.random() < self.w.p_eos else rng.randrange(3, 60)
        new, acc, drafts = [], 0, []
        if s.sample:
            acc = rng.randint(0, len(s.drafts))
            new = s.drafts[:acc] + [eos()]
            drafts = [eos() for _ in range(s.num_drafts)]
            if record:
                self.generated[s.seq_id].extend(new)
        n_settled = s.num_tokens - len(s.drafts) + acc if s.sample else s.num_tokens
        commit = acc if s.drafts else -1
        self.stage[s.seq_id] = (s.mamba_slot, s.start_pos + n_settled, commit, list(s.block_table))
        self.slot_holder[s.mamba_slot] = s.seq_id
        self.block_valid.update({b: {s.seq_id} for b in self._written(s)})
        return SeqOutput(s.seq_id, new, acc, drafts)

    def _written(self, s) -> list[int]:
        """The KV blocks a step writes: those of positions start_pos.. (its tokens, drafting after them)."""
        bs = self.w.block_size
        return s.block_table[s.start_pos // bs:math.ceil((s.start_pos + s.num_tokens + s.num_drafts) / bs)]

    def _forks(self, steps) -> None:
        """n > 1: the stages copy each choice's state from its parent before the pass (router/fork.py); the
        parent's state must be there, the copies and shared blocks the parent's, and only then move."""
        bs, moves = self.w.block_size, []
        for s in steps:
            held = self.stage.get(s.fork_of)
            _check(held is not None, f"choice {s.seq_id} forks from seq {s.fork_of}, which the stages do not hold")
            slot, pos, commit, table = held
            _check(pos == s.start_pos and commit == -1 == s.commit_index,
                   f"choice {s.seq_id} starts at {s.start_pos}, its parent {s.fork_of} is at {pos}")
            src = s.fork_slot if s.fork_slot >= 0 else s.mamba_slot
            _check(src == slot and self.slot_holder.get(slot) == s.fork_of,
                   f"choice {s.seq_id} copies slot {src}; its parent's state is in {slot} "
                   f"(held by {self.slot_holder.get(slot)})")
            copies = {d: a for a, d in s.copy_blocks}
            for j, b in enumerate(s.block_table[:math.ceil(pos / bs)]):
                a = copies.get(b, b)
                _check(j < len(table) and a == table[j] and s.fork_of in self.block_valid.get(a, ()),
                       f"choice {s.seq_id}: its block {j} ({b}, from {a}) is not its parent's ({table})")
                moves.append((b, s.seq_id, b in copies))
            self.stage[s.seq_id] = (s.mamba_slot, pos, -1, list(s.block_table))
        for s in steps:
            self.slot_holder[s.mamba_slot] = s.seq_id
        for b, seq_id, copied in moves:
            self.block_valid[b] = {seq_id} if copied else self.block_valid[b] | {seq_id}

    def _check_stage_reads(self, s) -> None:
        """A step that continues a sequence must find its state where the last pass left it."""
        if s.start_pos == 0:
            _check(s.commit_index == -1, f"seq {s.seq_id}: a fresh start commits {s.commit_index}")
            return
        held = self.stage.get(s.seq_id)
        _check(held is not None, f"seq {s.seq_id} continues at {s.start_pos} but the stages hold nothing for it")
        slot, pos, commit, table = held
        _check(slot == s.mamba_slot and self.slot_holder.get(slot) == s.seq_id,
               f"seq {s.seq_id} continues in slot {s.mamba_slot}, its state is in slot {slot} "
               f"(held by {self.slot_holder.get(slot)})")
        _check(pos == s.start_pos, f"seq {s.seq_id} continues at {s.start_pos}, the stages are at {pos}")
        _check(commit == s.commit_index, f"seq {s.seq_id} commits {s.commit_index}, the stages need {commit}")
        used = math.ceil(s.start_pos / self.w.block_size)
        _check(s.block_table[:used] == table[:used], f"seq {s.seq_id}: its KV moved from {table} to {s.block_table}")
        for b in s.block_table[:used]:
            _check(s.seq_id in self.block_valid.get(b, ()),
                   f"seq {s.seq_id} reads block {b}, which holds the KV of {self.block_valid.get(b)} only")

    # ---- invariants --------------------------------------------------------------------------------
    def check(self, after: str) -> None:
        """After every call: every sequence in one place, every block and slot owned once or free,
        every sequence in flight in one plan and untouched."""
        if not self.checks:
            return
        s, bm, w = self.sched, self.blocks, self.w
        where = f" (after {after}, turn {self.turn})"
        running, waiting = list(s.running), list(s.waiting)
        ids_r, ids_w = [q.seq_id for q in running], [q.seq_id for q in waiting]
        _check(len(set(ids_r)) == len(ids_r), f"a sequence is running twice: {ids_r}{where}")
        _check(len(set(ids_w)) == len(ids_w), f"a sequence is waiting twice: {ids_w}{where}")
        _check(not set(ids_r) & set(ids_w), f"seqs {set(ids_r) & set(ids_w)} both running and waiting{where}")
        _check(set(s.seqs) == set(ids_r) | set(ids_w),
               f"live sequences {sorted(s.seqs)} != running {ids_r} + waiting {ids_w}{where}")
        _check(len(running) <= w.max_num_seqs, f"{len(running)} running > max_num_seqs {w.max_num_seqs}{where}")
        for q in waiting:
            _check(q.status is SeqStatus.WAITING, f"seq {q.seq_id} waits with status {q.status}{where}")
            _check(not q.block_table and q.mamba_slot < 0,
                   f"seq {q.seq_id} waits holding blocks {q.block_table} / slot {q.mamba_slot}{where}")
            _check(not q.in_flight, f"seq {q.seq_id} waits while in flight{where}")
        for q in running:
            _check(q.status is SeqStatus.RUNNING and q.mamba_slot >= 0,
                   f"seq {q.seq_id} runs with status {q.status}, slot {q.mamba_slot}{where}")
            _check(q.num_computed < q.num_tokens, f"seq {q.seq_id}: nothing left to compute{where}")
        owned = [b for q in running for b in q.block_table]
        for q in running:
            _check(len(set(q.block_table)) == len(q.block_table), f"seq {q.seq_id} holds a block twice{where}")
        for b in set(owned):                            # shared only by one request's choices, and counted
            holders = [q for q in running if b in q.block_table]
            _check(bm.refs[b] == len(holders), f"block {b}: refcount {bm.refs[b]}, held by "
                                               f"{[q.seq_id for q in holders]}{where}")
            _check(len({q.request_id for q in holders}) == 1, f"block {b} shared across requests{where}")
        _check(all(bm.refs[b] == 0 for b in bm.free_blocks), f"a free block has holders{where}")
        both = sorted(set(owned) & set(bm.free_blocks))
        _check(not both, f"blocks {both} both owned and free{where}")
        _check(len(set(bm.free_blocks)) == len(bm.free_blocks), f"a block is free twice{where}")
        _check(set(owned) | set(bm.free_blocks) == set(range(w.num_blocks)),
               f"blocks leaked: {sorted(set(range(w.num_blocks)) - set(owned) - set(bm.free_blocks))}{where}")
        slots = [q.mamba_slot for q in running]
        _check(len(set(slots)) == len(slots) and not set(slots) & set(bm.free_slots)
               and set(slots) | set(bm.free_slots) == set(range(w.num_slots)),
               f"Mamba slots: owned {slots}, free {bm.free_slots}{where}")
        planned = {}
        for plan in self.in_flight:
            for st in plan.seqs:
                if (plan.step_id, st.seq_id) in s.ahead.dropped:   # look-ahead: ended while it was out
                    _check(st.seq_id not in s.seqs or s.seqs[st.seq_id].pending is None
                           or s.seqs[st.seq_id].pending.step_id != plan.step_id,
                           f"seq {st.seq_id}: its output in step {plan.step_id} is both dropped and awaited{where}")
                    continue
                q = s.seqs.get(st.seq_id)
                steps = [x.step_id for x in (q.pending, q.ahead) if x is not None] if q is not None else []
                _check(st.seq_id not in planned or (w.look_ahead and len(steps) == 2),
                       f"seq {st.seq_id} in flight in two plans{where}")
                planned[st.seq_id] = st
                _check(q is not None and q.status is SeqStatus.RUNNING and plan.step_id in steps
                       and q.mamba_slot == st.mamba_slot
                       and (q.block_table[:len(st.block_table)] if w.look_ahead else q.block_table) == st.block_table,
                       f"seq {st.seq_id} was preempted or changed while in flight{where}")
        flying = {q.seq_id for q in running if q.in_flight}
        _check(flying == set(planned), f"seqs {sorted(flying ^ set(planned))} in flight here, "
                                       f"not in a plan in flight (stuck){where}")

    def _check_preemptions(self, before: dict, plan: StepPlan | None) -> None:
        """A sequence is preempted only to make room for an older one that this plan grows (so the
        oldest is never starved, and nothing is evicted for nothing)."""
        if not self.checks:
            return
        victims = [i for i in before if i in self.sched.seqs and self.sched.seqs[i] in self.sched.waiting]
        grown = [before[st.seq_id][0] for st in (plan.seqs if plan else [])
                 if st.seq_id in before and len(st.block_table) > before[st.seq_id][1]]
        grown += [_age(self.sched.seqs[st.seq_id]) for st in (plan.seqs if plan else []) if st.fork_of >= 0]
        for i in victims:
            _check(any(age < before[i][0] for age in grown),
                   f"seq {i} preempted, but for no older sequence this plan grows (turn {self.turn})")

    def _check_plan(self, plan: StepPlan, limit: int) -> None:
        if not self.checks:
            return
        w, ids = self.w, [s.seq_id for s in plan.seqs]
        where = f" (plan {plan.step_id}, turn {self.turn})"
        forks = [st for st in plan.seqs if st.fork_of >= 0]   # a fork plans its n choices at once
        _check(0 < len(ids) <= max(limit, len(forks)), f"{len(ids)} sequences planned, max_seqs {limit}{where}")
        _check(len(set(ids)) == len(ids), f"a sequence is planned twice: {ids}{where}")
        _check(plan.num_tokens <= w.budget, f"{plan.num_tokens} tokens > budget {w.budget}{where}")
        # Look-ahead: a sequence's own passes run in order, and a dropped step (its sequence ended) runs
        # before any later plan reuses its blocks; its writes are never read.
        mine, dropped = {st.seq_id for st in plan.seqs}, self.sched.ahead.dropped
        flying = [st for p in self.in_flight for st in p.seqs
                  if st.seq_id not in mine and (p.step_id, st.seq_id) not in dropped]
        others = {b for st in flying for b in st.block_table}
        others_write = {b for st in flying for b in self._written(st)}
        if not self.w.look_ahead:                       # else when the pass runs, as the stages do
            self._forks(forks)
        for st in plan.seqs:
            q = self.sched.seqs.get(st.seq_id)
            _check(q is not None and q in self.sched.running,
                   f"seq {st.seq_id} planned while {'finished' if q is None else q.status.value}{where}")
            _check(not getattr(q, "suspect", False) or len(ids) == 1,
                   f"suspect seq {st.seq_id} planned with others {ids}{where}")
            need = st.start_pos + st.num_tokens + st.num_drafts
            _check(len(st.block_table) * w.block_size >= need,
                   f"seq {st.seq_id}: blocks {st.block_table} do not cover {need} positions{where}")
            r = self.reqs[st.seq_id]
            _check(len(st.block_table) <= math.ceil(worst_positions(r, w.max_model_len) / w.block_size),
                   f"seq {st.seq_id} holds {len(st.block_table)} blocks, more than its worst case{where}")
            _check(not set(self._written(st)) & others and not set(st.block_table) & others_write,
                   f"seq {st.seq_id} writes blocks a pass in flight reads, or reads what it writes{where}")
            k = q.num_speculative
            _check(st.num_drafts <= k and len(st.drafts) <= k and st.drafts == q.drafts[:len(st.drafts)],
                   f"seq {st.seq_id}: proposes {st.num_drafts} and verifies {st.drafts} of {q.drafts}, k={k}{where}")
            _check(not (r.seeded and k) or st.num_drafts > 0 or st.mtp_context,
                   f"seeded seq {st.seq_id} does not feed the MTP block as k every step would{where}")
            decoding = st.num_tokens == 1 + len(st.drafts) and st.start_pos == len(q.tokens) - 1
            if r.seeded and decoding:                   # reproducible: what fixed k verifies (budget permitting)
                full = min(len(q.drafts), max(0, r.max_tokens - len(q.output_ids) - 1),
                           w.max_model_len - q.num_tokens - 1)
                _check(len(st.drafts) == full or plan.num_tokens == w.budget,
                       f"seeded seq {st.seq_id} verifies {len(st.drafts)} of {len(q.drafts)} drafts{where}")
            if st.input_ids == [SAMPLED_TOKEN]:         # look-ahead: after the pass in flight samples
                _check(q.ahead is not None and q.ahead.step_id == plan.step_id and q.pending is not None
                       and st.start_pos == q.num_tokens and st.sample and not st.drafts and st.commit_index == -1,
                       f"seq {st.seq_id}: look-ahead step at {st.start_pos} of {q.num_tokens} tokens{where}")
                continue
            tokens = q.tokens
            _check(st.input_ids[:st.num_tokens - len(st.drafts)] ==
                   tokens[st.start_pos:st.start_pos + st.num_tokens - len(st.drafts)],
                   f"seq {st.seq_id}: input ids are not its tokens{where}")
            settled = st.start_pos + st.num_tokens - len(st.drafts)
            _check(st.sample == (settled == len(tokens)), f"seq {st.seq_id}: sample={st.sample} at {settled}/"
                                                          f"{len(tokens)}{where}")
            _check(st.sample or st.next_token == tokens[settled], f"seq {st.seq_id}: wrong next_token{where}")
            if not self.w.look_ahead:                   # else when the pass runs (passes before it are queued)
                self._check_stage_reads(st)

    def _record(self, outs) -> None:
        for o in outs:
            i = int(o.request_id[1:])
            prev = self.outputs[i]
            _check(not prev or not prev[-1].finished, f"request {i} got {o} after it finished")
            prev.append(o)

    def _check_end(self) -> None:
        s = self.sched
        for i, outs in self.outputs.items():
            r, ids = self.reqs[i], self.choice_ids[i]
            _check(outs and outs[-1].finished, f"request {i} never finished: {outs}")
            last = outs[-1]
            reasons = {o.index: o.finish_reason for o in outs if o.finish_reason}
            _check(len(reasons) == sum(o.finish_reason is not None for o in outs),
                   f"request {i}: a choice finished twice: {outs}")
            whole = len(outs) == 1 and last.finish_reason in ("abort", "error")   # ended before its choices ran
            _check(whole or sorted(reasons) == list(range(r.n)), f"request {i}: choices {sorted(reasons)} of "
                                                                 f"{r.n} finished: {outs}")
            for index, reason in reasons.items():
                mine = [o for o in outs if o.index == index]
                seq_id = ids[0] if r.n == 1 or whole else ids[1 + index]
                self._check_choice(i, r, seq_id, mine, reason)
        poisoned = sum(len(ids) for i, ids in self.choice_ids.items() if self.reqs[i].poison)
        _check(self.w.p_fail or self.num_failures <= 2 * poisoned,
               f"{self.num_failures} failed passes for {poisoned} poisoned requests: the culprit is not isolated")
        _check(not s.seqs and not s.running and not s.waiting and not s.has_work,
               f"the scheduler still holds sequences at the end: {self._state()}")
        _check(self.blocks.all_free(), f"blocks or slots not freed at the end: {self._state()}")

    def _check_choice(self, i: int, r: Request, seq_id: int, outs: list, reason: str) -> None:
        """One choice's updates (n = 1: the request's): the tokens the stages sampled, ended as they say."""
        last, toks = outs[-1], [t for o in outs for t in o.new_token_ids]
        _check(reason in ("stop", "length", "abort", "error"), f"request {i}: {last}")
        _check(reason != "abort" or i in self.aborted, f"request {i} aborted by no one")
        if r.poison:
            _check(reason in ("error", "abort"), f"poisoned request {i} ended with {last}")
        elif not self.w.p_fail:
            _check(reason != "error", f"request {i} failed with the poisoned ones: {last}")
        _check(len(toks) == last.num_output_tokens <= r.max_tokens, f"request {i}: {len(toks)} tokens, {last}")
        _check(toks == self.generated[seq_id][:len(toks)], f"request {i} (seq {seq_id}) streamed {toks}, the "
                                                           f"stages sampled {self.generated[seq_id]}")
        if reason == "stop":
            _check(toks[-1] == EOS, f"request {i} stopped without EOS")
        if reason == "length":
            _check(len(toks) == r.max_tokens or r.prompt_len + len(toks) >= self.w.max_model_len,
                   f"request {i}: 'length' at {len(toks)} tokens")

    def _state(self) -> str:
        s = self.sched
        return (f"running {[(q.seq_id, q.num_computed, len(q.block_table), q.in_flight) for q in s.running]}, "
                f"waiting {[(q.seq_id, len(q.block_table)) for q in s.waiting]}, "
                f"free blocks {len(self.blocks.free_blocks)}/{self.w.num_blocks}, "
                f"free slots {len(self.blocks.free_slots)}/{self.w.num_slots}")
