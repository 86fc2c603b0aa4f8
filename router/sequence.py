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


@dataclasses.dataclass(eq=False)
class Sequence:
    """vLLM's rule: no prefill or decode phase; each pass catches `num_computed` up to the tokens,
    plus the drafts to verify.

    num_computed: positions whose Mamba state and KV the stages hold (invariant while decoding:
                  num_computed == len(tokens) - 1, the newest token is the next pass's input)
    drafts:       tokens the MTP block proposed after the newest one, to verify in the next pass
    commit_index: the accepted count of the last verification, for the stages to commit (-1: none)
    pending:      the pass it is in (None: between passes); the scheduler's only "in flight" flag
    suspect:      it was in a pass that raised; it runs alone until one of its passes succeeds
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
    num_emitted: int = 0                 # output tokens already handed to the request's stream
    num_verified_drafts: int = 0         # MTP drafts verified for it, all passes together
    num_accepted_drafts: int = 0         # ... and accepted
    num_verify_steps: int = 0            # passes that verified at least one of its drafts

    @functools.cached_property
    def params_dict(self) -> dict:
        """params as the plan carries them (SeqStep.params), built once rather than every step."""
        return self.params.to_dict()

    @property
    def tokens(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def num_uncomputed(self) -> int:
        return self.num_tokens - self.num_computed

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
