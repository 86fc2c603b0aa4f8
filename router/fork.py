"""n > 1: one request, n choices sharing one prefill. No torch here (the scheduler's side of it).

A request with n > 1 enters as a parent sequence that computes its prompt but the last token and never
samples. When it is done, one plan forks it into its n choices (all in that plan, or none):

- choice 0 takes over the parent's Mamba slot and KV blocks;
- choice i > 0 gets a slot of its own, whose state the stages copy from the parent's slot before the
  pass (SeqStep.fork_slot); the prompt's full KV blocks are shared (BlockManager refcounts: a block
  is free once its last holder lets go), the partly filled last one is copied (SeqStep.copy_blocks);
- every choice's first pass reads the prompt's last token at position prompt_len - 1 and samples with
  its own seed (sequence.choice_seed): greedy choices are identical, seeded ones reproducible.

The stages apply every copy of a plan before computing any of it, so the parent's state is read before
choice 0 advances it. Choices never write a shared block: they write from position prompt_len - 1 on,
which lies in the copied block or past the shared ones. A choice that is preempted recomputes its
prompt and outputs from position 0 as any sequence does, holding its own blocks from then on.
A prompt of one token has nothing to share: its choices start as n independent sequences.
"""
from __future__ import annotations

import dataclasses
import logging

from cluster.contracts import SeqStep, kv_positions

from .sequence import SeqStatus, Sequence, choice_seed, priority

log = logging.getLogger("hybridserve.scheduler")


def choices(parent: Sequence) -> list[Sequence]:
    """The request's n choice sequences (no caches yet), in order of index."""
    return [dataclasses.replace(parent, seq_id=cid, seed=choice_seed(parent.seed, i), index=i, fork_ids=(),
                                parent_id=parent.seq_id,
                                output_ids=[], block_table=[], drafts=[], pending=None, mamba_slot=-1,
                                status=SeqStatus.WAITING, num_computed=0, output_logprobs=[],
                                prompt_logprobs=list(parent.prompt_logprobs))
            for i, cid in enumerate(parent.fork_ids)]


def ready(seq: Sequence) -> bool:
    """A parent whose prompt (all but its last token) the stages hold: its next plan forks it."""
    return bool(seq.fork_ids) and seq.num_uncomputed == 0


def _shared(parent: Sequence, block_size: int) -> int:
    """The prompt's full blocks before position prompt_len - 1: the choices share them."""
    return (len(parent.prompt_ids) - 1) // block_size


def first_blocks(parent: Sequence, block_size: int) -> int:
    """KV blocks one choice holds in its first pass (prompt + 1 token, k drafting positions)."""
    return -(-kv_positions(len(parent.prompt_ids) + 1, parent.num_speculative) // block_size)


def fork_blocks(parent: Sequence, block_size: int) -> int:
    """KV blocks the whole fork holds in its first pass: the shared ones once, the rest per choice."""
    n, shared = len(parent.fork_ids), _shared(parent, block_size)
    return shared + n * (first_blocks(parent, block_size) - shared)


def check_fork(seq: Sequence, max_num_seqs: int, max_num_batched_tokens: int, blocks) -> None:
    """ValueError naming `n` if the request's n choices could never run together, even alone."""
    n, num_blocks, block_size = len(seq.fork_ids), blocks.num_blocks, blocks.block_size
    if n <= 1:
        return
    most = min(max_num_seqs, max_num_batched_tokens, blocks.num_slots)
    if n > most:
        raise ValueError(f"n: {n} choices, but this engine runs at most {most} sequences at once "
                         f"(max_num_seqs {max_num_seqs}, max_num_batched_tokens {max_num_batched_tokens}, "
                         f"{blocks.num_slots} Mamba slots)")
    need = fork_blocks(seq, block_size)
    if len(seq.prompt_ids) > 1 and need > num_blocks:
        raise ValueError(f"n: {n} choices of a prompt of {len(seq.prompt_ids)} tokens need {need} KV blocks of "
                         f"{block_size} tokens at once, but the cache has {num_blocks}")


class Forker:
    """Plans forks for a Scheduler (router/scheduler.py): room, cache hand-over, the choices' first steps."""

    def __init__(self, sched):
        self.sched = sched

    def admit(self, seq: Sequence) -> list[Sequence]:
        """What a new request queues: itself (n = 1, or an n > 1 parent), or n choices for a 1-token prompt.
        ValueError naming `n` if its choices could never run together."""
        s = self.sched
        check_fork(seq, s.config.max_num_seqs, s.config.max_num_batched_tokens, s.blocks)
        s.open_choices.open(seq)
        return choices(seq) if seq.fork_ids and len(seq.prompt_ids) == 1 else [seq]

    def need(self, parent: Sequence) -> tuple[int, int, int]:
        """(slots, blocks, running) the fork adds: slots and blocks beyond the parent's, sequences."""
        bm, n = self.sched.blocks, len(parent.fork_ids)
        first, shared = first_blocks(parent, bm.block_size), _shared(parent, bm.block_size)
        blocks = max(0, first - len(parent.block_table)) + (n - 1) * (first - shared)
        return n - 1, blocks, n - 1

    def _fits(self, parent: Sequence, victims: list[Sequence]) -> bool:
        s, bm = self.sched, self.sched.blocks
        slots, blocks, running = self.need(parent)
        return (len(bm.free_slots) + len(victims) >= slots
                and len(bm.free_blocks) + bm.freed_by(victims) >= blocks
                and len(s.running) - len(victims) + running <= s.config.max_num_seqs)

    def make_room(self, parent: Sequence) -> bool:
        """Room for the fork: free slots and blocks, else by preempting idle sequences newer than the
        parent, newest first, when that is enough (as Scheduler._make_room does for blocks)."""
        s = self.sched
        if self._fits(parent, []):
            return True
        victims = sorted((q for q in s.running if not q.in_flight and priority(q) > priority(parent)),
                         key=priority)
        if not self._fits(parent, victims):
            return False
        while not self._fits(parent, []):
            victim = victims.pop()
            log.info("preempting seq %d (request %s) for the choices of seq %d", victim.seq_id, victim.request_id,
                     parent.seq_id)
            s._requeue(victim)
            s.num_preemptions += 1
        return True

    def plan(self, parent: Sequence, budget: int, step_id: int, room: int) -> list[SeqStep]:
        """The n choices' first steps (the parent ends here), or [] if they cannot all run in this plan."""
        s, bm, n = self.sched, self.sched.blocks, len(parent.fork_ids)
        if n > min(budget, room) or not self.make_room(parent):
            return []
        shared, slot = _shared(parent, bm.block_size), parent.mamba_slot
        partial = parent.block_table[shared] if (len(parent.prompt_ids) - 1) % bm.block_size else None
        kids = choices(parent)
        for kid in kids:
            if kid.index == 0:                  # the parent's slot and blocks, as they are
                kid.mamba_slot, kid.block_table = parent.mamba_slot, parent.block_table
            else:
                kid.mamba_slot = bm.slot()
                own = [bm.allocate()] if partial is not None else []      # the partial block's copy
                kid.block_table = bm.share(parent.block_table[:shared]) + own
            kid.status, kid.num_computed = SeqStatus.RUNNING, len(parent.prompt_ids) - 1
        parent.mamba_slot, parent.block_table = -1, []        # handed over to choice 0
        self._retire(parent)
        steps = []
        for kid in kids:
            s.seqs[kid.seq_id] = kid
            s.running.append(kid)
            step = s._plan_seq(kid, budget - len(steps), step_id, may_preempt=False)
            if step is None:
                raise RuntimeError(f"seq {kid.seq_id}: no room for a fork's choice after making room for it")
            step.fork_of = parent.seq_id
            if kid.index:
                step.fork_slot = slot
                if partial is not None:
                    step.copy_blocks = [[partial, kid.block_table[shared]]]
            steps.append(step)
        return steps

    def _retire(self, parent: Sequence) -> None:
        """A parent that forked, holding nothing any more: gone, its stage-side keepings released."""
        s = self.sched
        s.running.remove(parent)
        s.seqs.pop(parent.seq_id, None)
        parent.status = SeqStatus.FINISHED
        s.released.append(parent.seq_id)
        s.policy.release(parent.seq_id)


class OpenChoices:
    """Per request, its choices not ended yet: RequestOutput.open_choices, so that `finished` means the
    whole request (n = 1: its one sequence) and each choice still has its own finish_reason."""

    def __init__(self):
        self._left: dict[str, int] = {}

    def open(self, seq: Sequence) -> None:
        self._left[seq.request_id] = max(1, len(seq.fork_ids))

    def update(self, seq: Sequence, reason: str | None) -> int:
        """The request's choices still running after an update of `seq` (a parent's end ends them all)."""
        left = self._left.get(seq.request_id, 1)
        if reason is not None:
            left = 0 if seq.fork_ids else max(0, left - 1)
            self._left[seq.request_id] = left
            if not left:
                del self._left[seq.request_id]
        return left
