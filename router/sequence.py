"""A request's life inside the engine loop: its tokens, how far the caches have caught up, its drafts."""
from __future__ import annotations

import dataclasses
import enum
import functools
import time
from typing import NamedTuple

from model_shards.sampling_params import SamplingParams


class SeqStatus(enum.Enum):
    WAITING = "waiting"      # not admitted: no Mamba slot or KV blocks yet (or preempted)
    RUNNING = "running"      # holds a slot and blocks
    FINISHED = "finished"


class InFlight(NamedTuple):
    """What the pass a sequence is in holds for it (to apply its result, and only that pass's)."""

    step_id: int
    num_tokens: int          # input ids, drafts included
    num_verified: int        # drafts under verification
    samples: bool            # the pass produces a token (decode, or a prompt's last chunk)
    num_proposed: int = 0    # drafts the pass proposes (its result holds them for the next pass to verify)


@dataclasses.dataclass(eq=False)
class Sequence:
    """vLLM's rule: no prefill or decode phase; each pass catches `num_computed` up to the tokens,
    plus the drafts to verify.

    num_computed: positions whose Mamba state and KV the stages hold (invariant while decoding:
                  num_computed == len(tokens) - 1, the newest token is the next pass's input)
    drafts:       tokens the MTP block proposed after the newest one, to verify in the next pass
    commit_index: the accepted count of the last verification, for the stages to commit (-1: none)
    pending:      the pass it is in (None: between passes); the scheduler's only "in flight" flag
    ahead:        a second pass planned before `pending` returned, whose input is the token `pending`
                  samples (router/scheduler.py, look-ahead); it becomes `pending` when that lands
    suspect:      it was in a pass that raised; it runs alone until one of its passes succeeds
    fork_ids:     (n > 1) the seq ids of the request's n choices: this sequence is their parent, it computes
                  the prompt but its last token, never samples, then forks into them (router/fork.py)
    index:        the choice (0..n-1) whose tokens this sequence produces
    """

    seq_id: int
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    seed: int
    num_speculative: int = 0
    output_ids: list[int] = dataclasses.field(default_factory=list)
    status: SeqStatus = SeqStatus.WAITING
    num_computed: int = 0
    block_table: list[int] = dataclasses.field(default_factory=list)
    mamba_slot: int = -1
    drafts: list[int] = dataclasses.field(default_factory=list)
    commit_index: int = -1
    aborted: bool = False
    error: str | None = None             # fail() while in flight: ends with this error when the pass returns
    suspect: bool = False
    finish_reason: str | None = None
    arrival_time: float = dataclasses.field(default_factory=time.monotonic)
    pending: InFlight | None = None
    ahead: InFlight | None = None
    num_emitted: int = 0                 # output tokens already handed to the request's stream
    num_verified_drafts: int = 0         # MTP drafts verified for it, all passes together
    num_accepted_drafts: int = 0         # ... and accepted
    num_verify_steps: int = 0            # passes that verified at least one of its drafts
    fork_ids: tuple[int, ...] = ()
    index: int = 0
    parent_id: int = -1                  # a choice's parent (its request's first seq id): its priority is theirs
    output_logprobs: list = dataclasses.field(default_factory=list)   # per output token (params.logprobs)
    prompt_logprobs: list = dataclasses.field(default_factory=list)   # per prompt token 1.. (params.prompt_logprobs)

    @functools.cached_property
    def params_dict(self) -> dict:
        """params as the plan carries them (SeqStep.params), built once rather than every step."""
        return self.params.to_dict()

    def note_logprobs(self, out) -> None:
        """A pass's logprobs (its SeqOutput), before num_computed moves past the pass: prompt ones at their
        positions (a recompute after preemption rewrites the same values), output ones appended."""
        if out.prompt_logprobs:
            self.prompt_logprobs[self.num_computed:self.num_computed + len(out.prompt_logprobs)] = out.prompt_logprobs
        if out.logprobs:
            self.output_logprobs.extend(out.logprobs)

    def logprobs_since(self, start: int) -> tuple[list | None, list | None]:
        """For an update from output token `start` on: its tokens' logprobs (kept tokens only), and the
        prompt's with the first update; None for what the request did not ask."""
        out = self.output_logprobs[start:len(self.output_ids)] if self.params.logprobs is not None else None
        prompt = self.prompt_logprobs if start == 0 and self.params.prompt_logprobs is not None else None
        return out, prompt

    @property
    def tokens(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def num_uncomputed(self) -> int:
        """Positions its passes have yet to compute; a parent stops before the prompt's last token."""
        return self.num_tokens - self.num_computed - bool(self.fork_ids)

    @property
    def in_flight(self) -> bool:
        return self.pending is not None

    @property
    def finished(self) -> bool:
        return self.status is SeqStatus.FINISHED

    def reset_for_recompute(self) -> None:
        """Preempted: caches dropped; the next pass re-reads prompt + outputs from position 0."""
        self.status = SeqStatus.WAITING
        self.num_computed = 0
        self.block_table = []
        self.mamba_slot = -1
        self.drafts = []
        self.commit_index = -1


def priority(seq: Sequence) -> tuple[float, int, int]:
    """Older first: the scheduler plans, and preempts for, sequences in this order (a request's choices
    rank where the request does, in order of index)."""
    return seq.arrival_time, seq.seq_id if seq.parent_id < 0 else seq.parent_id, seq.index


def choice_seed(seed: int, index: int) -> int:
    """Choice `index`'s sampling seed, from the request's: choice 0 samples as an n = 1 request with that
    seed would; the others get seeds of their own, the same for the same request seed."""
    return seed if index == 0 else (seed * 0x9E3779B97F4A7C15 + index * 0xBF58476D1CE4E5B9) % 2**62
