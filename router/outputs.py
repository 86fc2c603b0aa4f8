"""What the engine hands to the front doors (HTTP, gRPC): streamed request updates and its stats."""
from __future__ import annotations

import dataclasses


class QueueFullError(RuntimeError):
    """The engine's queue limit is reached; the front door answers 429 / RESOURCE_EXHAUSTED."""

    def __init__(self, limit: int, retry_after_s: float = 1.0):
        super().__init__(f"queue is full ({limit} requests waiting); retry later")
        self.limit, self.retry_after_s = limit, retry_after_s


class EngineDeadError(RuntimeError):
    """A stage or expert-shard actor died; requests in flight fail with this."""


@dataclasses.dataclass
class RequestOutput:
    """One update of a request's stream: the tokens new since the last update.

    finish_reason: None while running; "stop" (eos or a stop token), "length" (max_tokens),
    "abort" (cancelled), "error" (see `error`).
    num_verified_drafts / num_accepted_drafts / num_verify_steps: the request's MTP so far (all its
    passes): drafts verified, drafts accepted, passes that verified any (usage, the request log line).
    logprobs / prompt_logprobs: model_shards/logprobs.py's entries, for requests with SamplingParams.logprobs
    / prompt_logprobs (None otherwise).
    """

    request_id: str
    new_token_ids: list[int]
    finish_reason: str | None = None
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0
    error: str | None = None
    num_verified_drafts: int = 0
    num_accepted_drafts: int = 0
    num_verify_steps: int = 0
    logprobs: list | None = None          # per new token [logprob, [top ids], [top logprobs]], if asked
    prompt_logprobs: list | None = None   # per prompt token 1.. (same entries), with the first update, if asked
    index: int = 0                        # n > 1: the choice this update is about (its finish_reason is that choice's)
    open_choices: int = 0                 # n > 1: the request's choices still running after this update

    @property
    def finished(self) -> bool:
        """The request is done: this update ends its last choice (with n = 1, its only one)."""
        return self.finish_reason is not None and not self.open_choices


@dataclasses.dataclass
class EngineStats:
    waiting: int = 0
    running: int = 0
    kv_blocks_total: int = 0
    kv_blocks_used: int = 0
    mamba_slots_total: int = 0
    mamba_slots_used: int = 0
    steps: int = 0
    # MTP: drafts proposed and accepted, per draft position (index 0 = first draft).
    drafted_per_position: list[int] = dataclasses.field(default_factory=list)
    accepted_per_position: list[int] = dataclasses.field(default_factory=list)
    # MTP drafts proposed per sequence per step (index = how many; sampling steps of MTP sequences):
    # what the speculation policy chose.
    drafts_per_seq: list[int] = dataclasses.field(default_factory=list)
    # Counters of how requests ended inside the engine (tests and soak runs read them through /metrics).
    requests_aborted: int = 0            # cancelled while running: client gone, stop string, shutdown
    requests_failed: int = 0             # ended with an error (a failed pass, a lost actor)
    tokens_generated: int = 0            # output tokens handed to requests
    prompt_tokens_computed: int = 0      # prompt positions planned into passes (n > 1 choices share theirs)
    healthy: bool = True                 # False while the replica's actors are rebuilt, or if they could not be
    stepping: bool = True                # the loop is alive and passes come back (see AsyncEngine.is_stepping)
