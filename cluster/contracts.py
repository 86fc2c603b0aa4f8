"""The contracts between the engine loop and the workers: one dataclass each, msgpack on the wire.

The scheduler writes a StepPlan; every pipeline stage reads it (stage 0 the token ids, every stage
the positions, slots, block tables and commits, the last stage the sampling fields); the last stage
answers with a StepResult of token ids and counts. No torch here: this module is imported by the
scheduler, which must stay free of it.
"""
from __future__ import annotations

import dataclasses

import msgpack


def kv_positions(num_tokens: int, k: int) -> int:
    """KV positions a sequence that ends at `num_tokens` tokens (prompt + output) may need, with k MTP
    drafts: no pass of it covers more than num_tokens - 1 positions (its last token is never fed
    back; drafts are trimmed to that limit), and MTP drafting writes up to k past a pass. The
    scheduler admits by this bound; the planner and EngineConfig.kv_blocks() size the cache by it."""
    return num_tokens - 1 + k


# A look-ahead step's input (router/scheduler.py): the token this sequence's previous pass samples, which
# the worker fills in. Only for executors that run passes one after another on one model (runs_in_order).
SAMPLED_TOKEN = -1


@dataclasses.dataclass
class SeqStep:
    """One sequence's work in a step.

    input_ids:    tokens of this pass; the last len(drafts) are drafts under verification; [SAMPLED_TOKEN]:
                  the one token the previous pass samples for this sequence (a look-ahead step)
    start_pos:    tokens the caches already hold for this sequence
    mamba_slot:   its Mamba state row on every stage
    block_table:  KV block ids covering every position this pass may write (drafting included)
    drafts:       drafts being verified (greedy: exact match; random: rejection sampling)
    sample:       produce a token (False only for a prompt chunk that is not the last)
    next_token:   for a non-final prompt chunk, the next prompt token (the MTP block pairs it)
    commit_index: before this pass, commit the Mamba state kept after that position of the previous
                  verification (the accepted count); -1 when there is nothing to commit
    params:       SamplingParams.to_dict()
    seed:         the request's sampling seed
    num_drafts:   drafts to propose after this pass (0: none this step; the policy's choice, <= k)
    prompt_len:   the request's prompt length: output token i sits at position prompt_len + i (min_tokens)
    mtp_context:  feed the MTP block this pass's settled tokens (and what it stashed before) even when
                  proposing none (seeded sampling; prompts while the policy drafts)
    mtp_stash:    the MTP block does not run for this sequence now: the last stage keeps this pass's settled
                  (hidden state, next token) pairs and feeds them with the sequence's next MTP run, so its
                  attention has no gap when it drafts again, at no cost while it does not
    fork_of:      (n > 1, router/fork.py) the first pass of a choice forked from this parent sequence: the last
                  stage copies the parent's token history (penalties) before the pass
    fork_slot:    ... and every stage copies this Mamba slot's state into mamba_slot (-1: none, choice 0 keeps it)
    copy_blocks:  ... and these [source, destination] KV blocks (the prompt's partly filled last block)
    """

    seq_id: int
    input_ids: list[int]
    start_pos: int
    mamba_slot: int
    block_table: list[int]
    drafts: list[int] = dataclasses.field(default_factory=list)
    sample: bool = True
    next_token: int | None = None
    commit_index: int = -1
    params: dict = dataclasses.field(default_factory=dict)
    seed: int = 0
    num_drafts: int = 0
    prompt_len: int = 0
    mtp_context: bool = False
    mtp_stash: bool = False
    fork_of: int = -1
    fork_slot: int = -1
    copy_blocks: list[list[int]] = dataclasses.field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return len(self.input_ids)


@dataclasses.dataclass
class StepPlan:
    """One batch for the pipeline. `released`: sequences that ended; stages drop what they keep for them."""

    step_id: int
    microbatch: int
    seqs: list[SeqStep]
    released: list[int] = dataclasses.field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(s.num_tokens for s in self.seqs)


@dataclasses.dataclass
class SeqOutput:
    """logprobs: per new token [logprob, [top ids], [top logprobs]] (model_shards/logprobs.py) when the
    request asks; prompt_logprobs: the same for the prompt tokens at positions start_pos + 1.. of the pass."""

    seq_id: int
    new_tokens: list[int]
    num_accepted: int
    drafts: list[int]
    logprobs: list | None = None
    prompt_logprobs: list | None = None


@dataclasses.dataclass
class StepResult:
    """draft_s: seconds the last stage spent in MTP drafting (the speculation policy's drafting cost);
    draft_rows: the MTP rows it ran in them (stashed pairs fed, settled pairs, then drafts)."""

    step_id: int
    microbatch: int
    outputs: list[SeqOutput]
    error: str | None = None
    draft_s: float = 0.0
    draft_rows: int = 0


def _to_plain(obj):
    if dataclasses.is_dataclass(obj):
        return {f.name: _to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [_to_plain(x) for x in obj]
    return obj


def encode(obj) -> bytes:
    return msgpack.packb(_to_plain(obj), use_bin_type=True)


def decode_plan(data: bytes) -> StepPlan:
    d = msgpack.unpackb(data, raw=False)
    d["seqs"] = [SeqStep(**s) for s in d["seqs"]]
    return StepPlan(**d)


def decode_result(data: bytes) -> StepResult:
    d = msgpack.unpackb(data, raw=False)
    d["outputs"] = [SeqOutput(**o) for o in d["outputs"]]
    return StepResult(**d)
