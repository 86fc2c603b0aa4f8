"""A stage worker: one contiguous slice of the model, its caches, and (on the last stage) the tail.

The same class runs in-process (single-process engine) and inside a Ray stage actor. It reads a
StepPlan, commits the Mamba states of last round's accepted drafts, runs its layers, and returns
hidden states (not last) or a StepResult (last stage): token ids and counts only, never logits.
"""
from __future__ import annotations

import copy
import dataclasses
import logging
import time

import torch

from model_shards.batch import BatchLayout, SeqSlice
from model_shards.cuda_graphs import DecodeGraphs
from model_shards.drafter import resolve_draft_dtype
from model_shards.model import HybridModel
from model_shards.sampling_params import SamplingParams
from model_shards.tail import DraftStore, TailRequest, run_tail
from cluster.contracts import SAMPLED_TOKEN, SeqOutput, StepPlan, StepResult

log = logging.getLogger("hybridserve.worker")


class StageWorker:
    def __init__(self, model: HybridModel, *, num_blocks: int, block_size: int, num_slots: int,
                 max_verify_positions: int, device: str = "cpu", draft_dtype: str = "auto",
                 draft_vocab: bool = True, cuda_graphs: bool = True):
        """cuda_graphs: on a CUDA device, run decode passes through CUDA graphs (model_shards/cuda_graphs.py;
        EngineConfig.cuda_graphs, --enforce-eager turns it off); elsewhere it does nothing."""
        self.model = model
        if model.mtp is not None:
            dtype, max_rows = resolve_draft_dtype(draft_dtype, model, device)
            model.configure_drafting(dtype=dtype, max_rows=max_rows,
                                     vocab=model.checkpoint_draft_vocab if draft_vocab else None)
        graphs = cuda_graphs and torch.device(device).type == "cuda"
        # KV in the dtype the weights compute in (what the planner budgets per element); Mamba states float32.
        # With graphs, one Mamba slot more than the engine hands out: the padding rows' scratch slot.
        self.cache = model.make_cache(num_blocks=num_blocks, block_size=block_size,
                                      num_slots=num_slots + (1 if graphs else 0),
                                      max_verify_positions=max_verify_positions, device=device,
                                      kv_dtype=model.dtype)
        self.graphs = (DecodeGraphs(model, self.cache, scratch_slot=num_slots, max_rows=num_slots)
                       if graphs else None)
        self.store = DraftStore()
        self.device = device
        self._params: dict[int, SamplingParams] = {}   # per running sequence, parsed once
        # Per sequence, the token its last pass here sampled (None: that pass failed): a look-ahead step's
        # input (SAMPLED_TOKEN). Kept on the last stage, which is also the first in in-order executors.
        self._sampled: dict[int, int | None] = {}
        self.busy_s = 0.0                      # time spent computing, for overhead measurements
        self.num_steps = 0

    @torch.no_grad()
    def execute(self, plan: StepPlan, hidden: torch.Tensor | None = None):
        """plan -> hidden states (T, d) for the next stage, or a StepResult on the last stage."""
        try:
            return self._execute(plan, hidden)
        except BaseException:
            for s in plan.seqs:                # a look-ahead step after this pass has no token to read
                self._sampled[s.seq_id] = None
            raise

    def _fill_sampled(self, plan: StepPlan) -> StepPlan:
        """The plan with look-ahead steps' inputs filled in: the token their sequence's previous pass
        sampled (a copy: in-process the plan is the scheduler's). After a failed pass (here, or one that
        never got here) there is none, or a stale one: the scheduler has dropped that step's output
        already (it applied the failure first), so any token does; it only writes caches the sequence no
        longer holds."""
        if not any(s.input_ids == [SAMPLED_TOKEN] for s in plan.seqs):
            return plan
        seqs = []
        for s in plan.seqs:
            if s.input_ids == [SAMPLED_TOKEN]:
                token = self._sampled.get(s.seq_id)
                s = copy.copy(s)                   # cheaper than dataclasses.replace, once per sequence
                s.input_ids = [0 if token is None else token]
            seqs.append(s)
        return dataclasses.replace(plan, seqs=seqs)

    def _execute(self, plan: StepPlan, hidden: torch.Tensor | None):
        t0 = time.perf_counter()
        self._fork(plan)                       # before `released`: a forked parent is released in the same plan
        for seq_id in plan.released:
            self.store.drop(seq_id)
            self._params.pop(seq_id, None)
            self._sampled.pop(seq_id, None)
        if self.model.first and self.model.last:
            plan = self._fill_sampled(plan)
        commits = [(s.mamba_slot, s.commit_index) for s in plan.seqs if s.commit_index >= 0]
        self.cache.commit_many([c[0] for c in commits], [c[1] for c in commits])
        layout = self.layout(plan)
        if self.model.first:
            x = torch.tensor([t for s in plan.seqs for t in s.input_ids], device=self.device)
        else:
            x = hidden.to(self.device)
        h = self.graphs.forward(x, layout) if self.graphs is not None else None   # None: not a graph's pass
        if h is None:
            h = self.model(x, layout, self.cache)
        out = h
        if self.model.last:
            reqs = [TailRequest(s.seq_id, s.input_ids, s.drafts, s.sample, s.next_token, self._params_of(s),
                                s.seed, s.num_drafts, s.prompt_len, s.mtp_context, s.mtp_stash) for s in plan.seqs]
            timings: dict = {}
            res = run_tail(self.model, self.cache, h, layout, reqs, self.store, timings)
            out = StepResult(plan.step_id, plan.microbatch,
                             [SeqOutput(r.seq_id, r.new_tokens, r.num_accepted, r.drafts, r.logprobs,
                                        r.prompt_logprobs) for r in res],
                             draft_s=timings.get("draft_s", 0.0), draft_rows=timings.get("draft_rows", 0))
            for r in res:
                if r.new_tokens:
                    self._sampled[r.seq_id] = r.new_tokens[-1]
        self.busy_s += time.perf_counter() - t0
        self.num_steps += 1
        return out

    def _fork(self, plan: StepPlan) -> None:
        """n > 1 (router/fork.py): choices start from their parent's prompt state, copied before any pass
        of the plan writes it."""
        forks = [s for s in plan.seqs if s.fork_of >= 0]
        if not forks:
            return
        self.cache.fork([(s.fork_slot, s.mamba_slot) for s in forks if s.fork_slot >= 0],
                        [(a, b) for s in forks for a, b in s.copy_blocks])
        for s in forks:                        # penalties count the prompt: the parent's history is the choice's
            if self.store.history.tokens(s.fork_of):
                self.store.history.note(s.seq_id, 0, list(self.store.history.tokens(s.fork_of)))

    def _params_of(self, step) -> SamplingParams:
        """A sequence's SamplingParams, parsed from the plan on its first pass here (they never change)."""
        params = self._params.get(step.seq_id)
        if params is None:
            params = self._params[step.seq_id] = SamplingParams.from_dict(step.params)
        return params

    def layout(self, plan: StepPlan) -> BatchLayout:
        seqs, offset = [], 0
        for s in plan.seqs:
            table = torch.tensor(s.block_table, dtype=torch.long, device=self.device)
            seqs.append(SeqSlice(offset, s.num_tokens, s.start_pos, s.mamba_slot, table, keep_states=bool(s.drafts)))
            offset += s.num_tokens
        return BatchLayout(seqs)
