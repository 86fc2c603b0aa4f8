"""The scheduler's logprob bookkeeping (router/sequence.py note_logprobs / logprobs_since) under cache pressure.

Random workloads (tests/unit/test_scheduler_properties.py's) through the simulated engine loop, with every
request asking for logprobs and prompt logprobs. The simulated last stage answers each pass with entries
that name the position of the token they score, so whatever the interleaving (chunked prompts, MTP drafts
accepted or not, preemption by recompute that re-reads the prompt from position 0, results out of order,
aborts, stops cutting the tokens), every update's logprobs must be those of exactly its tokens, in order,
and a finished request's prompt logprobs those of prompt tokens 1.. once each.
"""
from __future__ import annotations

import dataclasses

from hypothesis import given

from tests.scheduler_sim import Sim
from tests.unit.test_scheduler_properties import PROFILE, workloads


def entry(position: int) -> list:
    return [float(position), [], []]


class LogprobSim(Sim):
    def _add(self, i, r) -> None:
        super()._add(i, r)
        seq = self.sched.seqs.get(i)
        if seq is not None:
            seq.params = dataclasses.replace(seq.params, logprobs=0, prompt_logprobs=0)

    def _execute(self, s):
        out = super()._execute(s)
        settled = s.start_pos + s.num_tokens - len(s.drafts)       # the position of the first new token
        out.logprobs = [entry(settled + i) for i in range(len(out.new_tokens))] if s.sample else None
        # row p scores the token at p + 1: prompt tokens only (what model_shards/tail.py computes)
        out.prompt_logprobs = [entry(p + 1) for p in range(s.start_pos, min(settled, s.prompt_len - 1))]
        return out


@PROFILE
@given(workloads())
def test_every_update_carries_the_logprobs_of_exactly_its_tokens(w):
    sim = LogprobSim(w).run()
    for i, outs in sim.outputs.items():
        prompt_len = sim.reqs[i].prompt_len
        toks = [t for o in outs for t in o.new_token_ids]
        lps = [e for o in outs for e in (o.logprobs or [])]
        assert lps == [entry(prompt_len + n) for n in range(len(toks))], (i, outs)
        assert all(o.logprobs is not None for o in outs if o.new_token_ids)
        prompts = [o.prompt_logprobs for o in outs if o.prompt_logprobs is not None]
        assert len(prompts) <= 1, "prompt logprobs sent more than once"
        if outs[-1].finish_reason in ("stop", "length") and toks:
            assert prompts == [[entry(q) for q in range(1, prompt_len)]], (i, outs)


def test_coalesced_updates_keep_every_tokens_logprobs_and_the_prompts():
    """A replica that fell behind merges queued updates (request_stream.merge_outputs): nothing may be lost."""
    from router.outputs import RequestOutput
    from router.request_stream import merge_outputs

    first = RequestOutput("r", [5, 6], None, 3, 2, logprobs=[entry(3), entry(4)],
                          prompt_logprobs=[entry(1), entry(2)])
    then = RequestOutput("r", [7], "length", 3, 3, logprobs=[entry(5)])
    merged = merge_outputs(first, then)
    assert merged.new_token_ids == [5, 6, 7] and merged.logprobs == [entry(3), entry(4), entry(5)]
    assert merged.prompt_logprobs == [entry(1), entry(2)] and merged.finish_reason == "length"
    assert merge_outputs(RequestOutput("r", [1], None), RequestOutput("r", [2], None)).logprobs is None


def test_logprob_entries_cross_processes_as_msgpack():
    """What the last stage sends (cluster/contracts.py) comes back equal, with and without logprobs."""
    from cluster.contracts import SeqOutput, StepResult, decode_result, encode

    with_lps = SeqOutput(3, [5, 9], 1, [7], logprobs=[[-0.25, [5, 6], [-0.25, -1.5]], [-3.0, [1, 9], [-0.1, -3.0]]],
                         prompt_logprobs=[[-2.0, [], []]])
    for out in (with_lps, SeqOutput(4, [1], 0, [])):
        result = StepResult(1, 0, [out])
        assert decode_result(encode(result)) == result
