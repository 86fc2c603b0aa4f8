"""Properties of the scheduler under cache pressure: random workloads through a simulated engine loop.

Each example draws a cache small enough to force preemption (but where every request fits alone),
slots, a token budget, MTP k, 1-3 micro-batches in flight, arrivals, prompt lengths, max_tokens,
aborts at random turns, then runs it with results returned in random order, random acceptance
counts, random EOS and (where asked) passes that raise, at random or whenever a "poisoned" request
is in them. tests/scheduler_sim.py checks, after every schedule(), update(), abort(), pass_failed():
- every live sequence is running or waiting, once; a waiting one holds no block and no slot;
- no block or slot is owned twice, owned and free, or lost;
- every planned sequence is running and planned once, within the budget, with blocks for every
  position it may write (k drafting positions included) and no more than its worst case;
- a sequence is preempted only for an older one, and nothing in flight is preempted or changed;
- every sequence in flight is in exactly one plan in flight (none stuck);
- a step that continues a sequence finds its state on the stages (slot, position, commit, KV blocks)
  where its last pass left it.
At the end every request has finished exactly once, having streamed exactly the tokens the stages
sampled for it, and every block and slot is free. Work pending with nothing in flight and nothing
plannable fails the run as a deadlock; a run that does not end, as a livelock.
With the adaptive speculation policy choosing the drafts (fed simulated pass timings: a fixed cost, a
cost per token and one per MTP row drafting, drawn per example) all of that holds, and every step
proposes and verifies at most k drafts and verifies a prefix of the drafts the sequence holds; a seeded
random-sampling sequence verifies what k every step would and always feeds the MTP block.
"""
from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, event, given, settings, target
from hypothesis import strategies as st

from model_shards.sampling_params import SamplingParams
from router.block_manager import BlockManager
from cluster.contracts import SeqOutput, StepResult
from router.scheduler import Scheduler, SchedulerConfig
from router.sequence import Sequence
from tests.scheduler_sim import Request, Sim, Workload, fits_alone

# Local to these tests (not loaded globally): SCHEDULER_PROFILE=scheduler-thorough for a long hunt.
settings.register_profile("scheduler-ci", max_examples=500, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("scheduler-thorough", parent=settings.get_profile("scheduler-ci"), max_examples=5000)
PROFILE = settings.get_profile(os.environ.get("SCHEDULER_PROFILE", "scheduler-ci"))


def _mostly(draw, likely: st.SearchStrategy, otherwise: st.SearchStrategy, odds: int = 3):
    """`likely` odds times in odds + 1; the rest `otherwise` (which is where shrinking goes too)."""
    return draw(likely) if draw(st.integers(0, odds)) else draw(otherwise)


@st.composite
def workloads(draw, fail: bool = False, oversized: bool = False, adaptive: bool = False,
              choices: bool = False, look_ahead: bool = False) -> Workload:
    """A cache of a few blocks and requests each of which fits it alone (unless `oversized`), most of
    them long enough that two together do not, most arriving at once: the cache runs short often."""
    block_size, num_blocks = draw(st.integers(1, 4)), draw(st.integers(1, 8))
    capacity = num_blocks * block_size
    k_max = draw(st.integers(1 if adaptive and capacity > 1 else 0, min(3, capacity - 1)))
    # Mostly a context limit past the cache, so that sequences grow until the cache runs short.
    max_model_len = _mostly(draw, st.integers(capacity + 1, capacity + 4), st.integers(2, capacity + 4))
    num_slots = _mostly(draw, st.integers(2, 4), st.integers(1, 4))
    reqs = []
    for _ in range(draw(st.integers(1, 6))):
        need = _mostly(draw, st.integers((capacity + 1) // 2, capacity), st.integers(1, capacity))  # worst case
        k = draw(st.integers(0, min(k_max, need - 1)))
        prompt = draw(st.integers(1, max(1, min(max_model_len - 1, need - k, capacity // 2))))
        max_tokens = max(1, need - k - prompt + 1) + (draw(st.integers(0, 8)) if oversized else 0)
        arrival = _mostly(draw, st.just(0), st.integers(0, 6), odds=2)
        abort_at = _mostly(draw, st.none(), st.integers(arrival, arrival + 40))
        poison = fail and draw(st.integers(0, 3)) == 0
        seeded = adaptive and draw(st.integers(0, 3)) == 0
        n = _mostly(draw, st.integers(2, 3), st.just(1)) if choices else 1
        reqs.append(Request(arrival, prompt, max_tokens, k, abort_at, poison, seeded, n))
    return Workload(
        num_blocks=num_blocks, block_size=block_size, num_slots=num_slots,
        max_num_seqs=_mostly(draw, st.integers(2, num_slots + 1), st.integers(1, num_slots + 1)), budget=draw(st.integers(k_max + 1, k_max + 12)),
        max_model_len=max_model_len, microbatches=1 if look_ahead else draw(st.integers(1, 3)), requests=tuple(reqs),
        seed=draw(st.integers(0, 2 ** 32 - 1)), p_eos=draw(st.sampled_from([0.0, 0.0, 0.05, 0.3])),
        p_fail=draw(st.sampled_from([0.0, 0.1, 0.3])) if fail else 0.0, adaptive=adaptive,
        cost=(draw(st.sampled_from([0.0005, 0.01, 0.05])), draw(st.sampled_from([0.0, 0.0002, 0.002, 0.02])),
              draw(st.sampled_from([0.0, 0.001, 0.01]))), look_ahead=look_ahead)


@PROFILE
@given(workloads())
def test_every_request_finishes_with_blocks_owned_once_and_nothing_in_flight_preempted(w):
    assert all(fits_alone(r, w) for r in w.requests)
    sim = Sim(w).run()
    event(f"preempted: {sim.sched.num_preemptions > 0}")   # pytest --hypothesis-show-statistics
    target(float(sim.sched.num_preemptions), label="preemptions")


@PROFILE
@given(workloads(fail=True))
def test_a_failing_pass_fails_only_the_sequence_that_keeps_failing_alone(w):
    sim = Sim(w).run()
    event(f"failed passes: {min(sim.num_failures, 3)}")
    target(float(sim.num_failures), label="failed passes")


@PROFILE
@given(workloads(adaptive=True))
def test_adaptive_drafting_finishes_every_request_and_leaks_no_block_or_slot(w):
    sim = Sim(w).run()
    event(f"drafts proposed per step: {sorted(sim.proposed)}")   # pytest --hypothesis-show-statistics


@PROFILE
@given(workloads(fail=True, adaptive=True))
def test_adaptive_drafting_with_failing_passes_isolates_the_culprit(w):
    Sim(w).run()


@PROFILE
@given(workloads(oversized=True))
def test_requests_that_can_never_fit_are_refused_at_add_and_the_rest_finish(w):
    sim = Sim(w).run()
    assert sorted(sim.refused) == [i for i, r in enumerate(w.requests) if not fits_alone(r, w)]


@PROFILE
@given(workloads(choices=True), st.booleans(), st.booleans())
def test_choices_sharing_a_prefill_finish_each_with_refcounts_equal_to_holders(w, fail, adaptive):
    """n > 1 (router/fork.py) under the same pressure: every choice of every request finishes once with
    the tokens the stages sampled for it; after every call a block's refcount is its holders (all of one
    request), none leaks or is freed twice; every choice starts from its parent's state, reads only
    blocks holding its KV (shared prompt blocks are never written by a choice), preempted choices
    recompute alone; with failing passes and the adaptive policy too."""
    import dataclasses
    w = dataclasses.replace(w, p_fail=0.1 if fail else 0.0, adaptive=adaptive and any(r.k for r in w.requests))
    sim = Sim(w).run()
    forked = sum(r.n > 1 and r.prompt_len > 1 for i, r in sim.reqs.items() if i < len(w.requests))
    event(f"forked requests: {min(forked, 3)}; preempted: {sim.sched.num_preemptions > 0}")


@PROFILE
@given(workloads(look_ahead=True), st.booleans(), st.booleans())
def test_look_ahead_keeps_every_invariant_with_failures_and_adaptive_drafts(w, fail, adaptive):
    """Look-ahead (a decode step planned while the one before it is in flight, its input the token that
    one samples; results in order): all of the above holds, a look-ahead step starts one past its
    sequence's newest token and finds the stages there when it runs, and an ended or requeued
    sequence's look-ahead output is dropped, never streamed."""
    import dataclasses
    w = dataclasses.replace(w, p_fail=0.1 if fail else 0.0, adaptive=adaptive and any(r.k for r in w.requests))
    sim = Sim(w).run()
    event(f"looked ahead: {sim.sched.ahead.num_planned > 0}; dropped: {sim.sched.ahead.num_dropped > 0}")


@PROFILE
@given(workloads(choices=True, look_ahead=True))
def test_look_ahead_with_choices_sharing_a_prefill(w):
    Sim(w).run()


def test_look_ahead_plans_each_decode_step_before_the_last_returns_and_drops_what_follows_a_stop():
    """Two requests with room to spare: after each one's first pass, every decode step is planned while
    the one before it is in flight; a request that stops on EOS has the step planned after it dropped."""
    w = Workload(num_blocks=16, block_size=4, num_slots=2, max_num_seqs=2, budget=16, max_model_len=64,
                 microbatches=1, requests=(Request(0, 3, 20), Request(0, 5, 20)), seed=3, p_eos=0.1, look_ahead=True)
    sim = Sim(w).run()
    ends = [o[-1] for o in sim.outputs.values()]
    tokens = sum(e.num_output_tokens for e in ends)
    stopped_early = sum(e.finish_reason == "stop" and e.num_output_tokens < 20 for e in ends)
    assert stopped_early >= 1
    # Each request's first token comes from its prompt pass, each later one from a look-ahead step; a step
    # was planned after each early stop too (not after a last token by max_tokens), its output dropped.
    assert sim.sched.ahead.num_dropped == stopped_early
    assert sim.sched.ahead.num_planned == tokens - 2 + stopped_early


# ---- the case of the issue, deterministic ------------------------------------------------------------------
def _issue_workload(microbatches: int) -> Workload:
    """4 blocks of 4 tokens, budget 4, two 4-token prompts: each fits alone (4 + 12 - 1 <= 16), both do not."""
    return Workload(num_blocks=4, block_size=4, num_slots=2, max_num_seqs=2, budget=4, max_model_len=64,
                    microbatches=microbatches, requests=(Request(0, 4, 12), Request(0, 4, 12)))


@pytest.mark.parametrize("microbatches", [1, 2])
def test_a_sequence_preempted_while_a_plan_is_built_is_not_planned_in_it(microbatches):
    sim = Sim(_issue_workload(microbatches)).run()
    assert sim.sched.num_preemptions >= 1
    assert [o[-1].finish_reason for o in sim.outputs.values()] == ["length", "length"]
    assert [o[-1].num_output_tokens for o in sim.outputs.values()] == [12, 12]


def test_the_issue_case_step_by_step():
    """Seq 0 grows into seq 1's block: seq 1 is preempted (its block and slot freed), is not in that
    plan, and is recomputed from position 0 later; the older seq 0 is never the one preempted."""
    s = Scheduler(SchedulerConfig(max_num_seqs=2, max_num_batched_tokens=4, max_model_len=64, eos_token_id=2),
                  BlockManager(4, 4, 2))
    for i in range(2):
        s.add(Sequence(i, f"r{i}", [10, 11, 12, 13], SamplingParams(max_tokens=12), 0, arrival_time=float(i)))
    restarts = []
    for _ in range(200):
        plan = s.schedule()
        if plan is None:
            break
        ids = [x.seq_id for x in plan.seqs]
        assert len(ids) == len(set(ids)) and all(s.seqs[i] in s.running for i in ids)
        assert all(not q.block_table and q.mamba_slot < 0 for q in s.waiting)
        restarts += [x.seq_id for x in plan.seqs if x.start_pos == 0 and s.seqs[x.seq_id].output_ids]
        s.update(StepResult(plan.step_id, 0, [SeqOutput(x.seq_id, [7] if x.sample else [], 0, [])
                                              for x in plan.seqs]))
    assert s.num_preemptions >= 1 and set(restarts) == {1}
    assert not s.seqs and s.blocks.all_free()
