"""Look-ahead (vLLM calls it async scheduling): a sequence's next decode step, planned while its pass is
in flight.

Only for executors that run passes one after another on one model, in the order sent (`runs_in_order`:
the in-process one, and the child process of `hybridserve serve` at -pp 1 -ep 1). A sequence whose pass
in flight samples one token, verifies no draft and proposes none gets its next step planned at once: one
token, SAMPLED_TOKEN, which the worker replaces with the token that pass sampled (cluster/worker.py).
So the model starts that step as soon as the pass before it ends, while the engine loop applies and
streams that pass; without look-ahead the model waits for the loop.

Correct by construction, not by care at each call:
- the step starts one position past the pass in flight, with blocks for it and its proposals; it never
  preempts, and takes a new KV block only when no sequence is waiting for room (they have first claim);
- when the pass in flight lands, the step becomes the one the sequence is in (`Sequence.pending`), so
  results apply in step order, as any other;
- a sequence that leaves `running` while a step of it is out (a stop, an abort, a failed pass, a
  requeue) has that step's output dropped when it lands. The step wrote only caches the sequence held,
  and an in-order executor runs it before any plan made later can reuse them.
No torch here (the scheduler's rule).
"""
from __future__ import annotations

from cluster.contracts import SAMPLED_TOKEN, SeqStep

from .sequence import InFlight, SeqStatus, Sequence, priority
from .spec_policy import pinned


class LookAhead:
    """The scheduler's look-ahead steps, and the outputs of those it must drop (see the module docstring)."""

    def __init__(self, scheduler):
        self.s = scheduler
        self.dropped: set[tuple[int, int]] = set()   # (step, seq): outputs to drop when they land
        self.num_planned = 0                         # look-ahead steps planned
        self.num_dropped = 0                         # ... whose sequence left before they landed

    @property
    def on(self) -> bool:
        return self.s.config.look_ahead

    def eligible(self, seq: Sequence) -> bool:
        """Its pass in flight samples one token, verifies and proposes no draft, and that token will not be
        its last by length: so its next step is one token, known but for that token's value."""
        p, limit = seq.pending, self.s.config.max_model_len
        return (p is not None and seq.ahead is None and p.samples and not p.num_verified and not p.num_proposed
                and seq.status is SeqStatus.RUNNING and not (seq.aborted or seq.error or seq.suspect or seq.fork_ids)
                and len(seq.output_ids) + 2 <= seq.params.max_tokens and seq.num_tokens + 2 <= limit)

    def candidates(self) -> list[Sequence]:
        """Sequences whose next step may be planned now, oldest first."""
        return sorted((q for q in self.s.running if self.eligible(q)), key=priority) if self.on else []

    def plan(self, seq: Sequence, budget: int, step_id: int, choice) -> SeqStep | None:
        """Its next decode step: one token after the pass in flight, proposing the drafts the speculation
        policy chose (`choice`; None: fixed k) and verifying none (it holds none yet)."""
        s, blocks = self.s, self.s.blocks
        propose = seq.num_speculative
        if choice is not None:
            chosen = choice.get(seq.seq_id)
            propose = chosen if chosen is not None else seq.num_speculative if pinned(seq) else 0
        left = min(seq.params.max_tokens - len(seq.output_ids), s.config.max_model_len - seq.num_tokens) - 2
        propose = max(0, min(propose, left))        # the draft cap once the pass in flight has sampled
        start = seq.num_computed + seq.pending.num_tokens
        positions = start + 1 + propose
        grows = blocks.blocks_for(positions) > len(seq.block_table)
        if budget < 1 or not blocks.can_hold(seq, positions) or \
                (grows and (s.waiting or any(not q.in_flight for q in s.running))):
            return None
        blocks.grow(seq, positions)
        step = SeqStep(seq_id=seq.seq_id, input_ids=[SAMPLED_TOKEN], start_pos=start, mamba_slot=seq.mamba_slot,
                       block_table=list(seq.block_table), params=seq.params_dict, seed=seq.seed,
                       num_drafts=propose, prompt_len=len(seq.prompt_ids))
        seq.ahead = InFlight(step_id, 1, 0, True, propose)
        self.num_planned += 1
        return step

    def leave(self, seq: Sequence) -> None:
        """`seq` leaves `running` (ends, or is requeued) out of flight as far as the scheduler goes; a
        look-ahead step of it still out (now its `pending`) has its output dropped when it lands."""
        if seq.pending is not None:
            self.dropped.add((seq.pending.step_id, seq.seq_id))
            self.num_dropped += 1
        seq.pending = seq.ahead = None

    def is_dropped(self, step_id: int, seq_id: int) -> bool:
        return (step_id, seq_id) in self.dropped

    def landed(self, step_id: int) -> None:
        """Step `step_id` returned or failed: nothing of it is left to drop."""
        if self.dropped:
            self.dropped = {d for d in self.dropped if d[0] != step_id}
