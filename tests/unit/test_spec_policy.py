"""The adaptive speculation policy (router/spec_policy.py) on its own, and as the scheduler applies it.

The policy sees only what the engine measures (pass seconds by token count, drafting seconds, each
sequence's accepted counts), so these tests feed it those and check what it chooses: fewer drafts when
the batch grows and each token costs (a compute-bound deployment), k at any batch when tokens are
nearly free (a weight-bound one), fewer for a sequence whose drafts fail, probes so that one recovers,
and never more than k, a sequence's cap or the token budget.
"""
from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from model_shards.sampling_params import SamplingParams
from router.block_manager import BlockManager
from cluster.contracts import SeqOutput, StepResult
from router.scheduler import Scheduler, SchedulerConfig
from router.sequence import Sequence
from router import spec_policy
from router.spec_policy import AdaptivePolicy, Candidate, FixedPolicy, PassCost


def trained(cost, k=3, **kw) -> AdaptivePolicy:
    """A policy that has measured passes of 1..256 tokens costing cost(n) seconds."""
    policy = AdaptivePolicy(k, explore_every=0, **kw)
    for _ in range(3):
        for n in range(1, 257):
            policy.observe_pass(n, cost(n))
    return policy


def mean_drafts(policy, num_seqs, k=3, budget=4096) -> float:
    choice = policy.choose([Candidate(i, k) for i in range(num_seqs)], 0, budget)
    return sum(choice.drafts.values()) / num_seqs


def test_drafts_fewer_as_the_batch_grows_when_each_token_costs():
    """CPU-like: 10 ms a pass plus 1 ms a token (drafting nearly free, 20 us an MTP row). One sequence
    drafts k; by 32 verification alone no longer pays."""
    policy = trained(lambda n: 0.010 + 0.001 * n, row_s=2e-5)
    means = [mean_drafts(policy, n) for n in (1, 2, 4, 8, 16, 32, 64)]
    assert means[0] == 3 and means[-1] == 0
    assert all(a >= b for a, b in zip(means, means[1:])), means


def test_drafts_k_at_every_batch_when_tokens_are_nearly_free():
    """Weight-bound (a GPU at these sizes): 10 ms a pass, 10 us a token, 20 us an MTP row: drafting always pays."""
    policy = trained(lambda n: 0.010 + 0.00001 * n, row_s=2e-5)
    assert [mean_drafts(policy, n) for n in (1, 16, 64)] == [3, 3, 3]


@pytest.mark.parametrize("gain, drafts", [(0.02, 0), (0.06, 1)])
def test_drafting_must_beat_not_drafting_by_a_margin(gain, drafts):
    """Where drafting is predicted to win by less than min_gain (3%), within the noise of the learned
    costs, it is what could lose: the policy proposes none. One sequence, k=1, acceptance 0.7: one draft
    gives 1.7 tokens in a pass of 2 tokens, so its rate over none's is 1.7 * cost(1) / cost(2)."""
    c1 = 0.010
    c2 = 1.7 * c1 / (1 + gain)
    policy = trained(lambda n: c1 + (c2 - c1) * (n - 1), k=1, row_s=0.0, prior_acceptance=0.7)
    assert policy.choose([Candidate(0, 1)], 0, 4096).drafts[0] == drafts
    policy.min_gain = 0.0                     # without the margin even 2% drafts
    assert policy.choose([Candidate(0, 1)], 0, 4096).drafts[0] == 1


def test_a_sequence_whose_drafts_fail_drafts_less_than_one_whose_drafts_land():
    policy = trained(lambda n: 0.010 + 0.0005 * n)
    for _ in range(20):
        policy.observe_verified(0, 3, 3)        # seq 0: every draft accepted
        policy.observe_verified(1, 3, 0)        # seq 1: the first draft always rejected
    d = policy.choose([Candidate(0, 3), Candidate(1, 3)], 0, 4096).drafts
    assert d[0] == 3 and d[1] == 0
    assert policy.acceptance.of(1)[0] < 0.05 and policy.acceptance.of(0)[0] > 0.95


def test_engine_wide_acceptance_is_the_prior_of_a_new_sequence():
    policy = AdaptivePolicy(3, prior_acceptance=0.7)
    assert policy.acceptance.of(99) == [0.7] * 3
    for i in range(200):
        policy.observe_verified(i, 3, 1)        # first accepted, second rejected, third never reached
    rates = policy.acceptance.of(1000)
    assert rates[0] > 0.95 and rates[1] < 0.1 and rates[2] == 0.7


def test_a_failing_sequence_is_probed_and_recovers_when_its_drafts_land_again():
    policy = trained(lambda n: 0.010 + 0.0005 * n, probe_every=4)
    for _ in range(20):
        policy.observe_verified(7, 3, 0)
    cand = [Candidate(7, 3)]
    chosen = []
    for _ in range(12):                         # no draft verified: idle grows until a probe
        d = policy.choose(cand, 0, 4096).drafts[7]
        chosen.append(d)
        policy.observe_verified(7, 0, 0)
    assert chosen[:4] == [0] * 4 and set(chosen[4:]) == {1}, chosen   # probing until a draft is verified
    for _ in range(10):                         # the probes land: it drafts fully again
        policy.observe_verified(7, 1, 1)
        policy.observe_verified(7, 3, 3)
    assert policy.choose(cand, 0, 4096).drafts[7] == 3


def test_no_probe_where_even_a_perfect_draft_would_not_pay():
    policy = trained(lambda n: 0.001 + 0.01 * n, probe_every=1)     # every token is a whole pass
    for _ in range(5):
        policy.observe_verified(3, 0, 0)
    assert policy.choose([Candidate(i, 3) for i in range(8)], 0, 4096).drafts[3] == 0


def test_exploration_moves_the_choice_for_a_few_steps_then_returns(monkeypatch):
    monkeypatch.setattr(spec_policy, "FAR_FROM_DRAFTING", 1.0)     # never "far": every explore_every choices
    policy = trained(lambda n: 0.010 + 0.001 * n)
    policy.explore_every, policy.explore_steps = 5, 2
    cands = [Candidate(i, 3) for i in range(32)]
    totals = [sum(policy.choose(cands, 0, 4096).drafts.values()) for _ in range(10)]
    assert totals[:4] == [0] * 4 and totals[4] > 0 and totals[5] > 0 and totals[6:9] == [0] * 3, totals


def test_exploring_up_is_rarer_where_drafting_is_predicted_to_lose_by_far():
    """32 sequences at 10 ms + 1 ms a token: a draft each is predicted to lose over 20% of tokens/s, so the
    policy explores up FAR_EXPLORE_EVERY times less often (each exploration fed every stash and verified a
    pass of twice the tokens, a measured 3-4% tax at 16-32 sequences)."""
    policy = trained(lambda n: 0.010 + 0.001 * n)
    policy.explore_every, policy.explore_steps = 5, 2
    cands = [Candidate(i, 3) for i in range(32)]
    n = 5 * spec_policy.FAR_EXPLORE_EVERY
    totals = [sum(policy.choose(cands, 0, 4096).drafts.values()) for _ in range(n + 2)]
    assert totals[:n - 1] == [0] * (n - 1) and totals[n - 1] > 0 and totals[n] > 0, totals


def test_fixed_policy_is_k_for_everyone():
    c = FixedPolicy().choose([Candidate(0, 3), Candidate(1, 1, pinned=True), Candidate(2, 0)], 100, 10)
    assert c.drafts == {0: 3, 1: 1, 2: 0}


@settings(max_examples=300, deadline=None)
@given(caps=st.lists(st.tuples(st.integers(0, 6), st.booleans(), st.integers(1, 40), st.integers(0, 6)),
                     min_size=1, max_size=12),
       k=st.integers(1, 4), extra=st.integers(0, 60), budget=st.integers(1, 120),
       fixed=st.sampled_from([0.0001, 0.01]), per_token=st.sampled_from([0.0, 1e-5, 0.001, 0.05]),
       acc=st.lists(st.integers(0, 3), min_size=12, max_size=12), explore=st.integers(0, 3))
def test_never_more_than_k_the_cap_or_the_budget(caps, k, extra, budget, fixed, per_token, acc, explore):
    policy = trained(lambda n: fixed + per_token * n, k=k, probe_every=2)
    policy.explore_every = explore
    for i, a in enumerate(acc):
        policy.observe_verified(i, 3, a)
    cands = [Candidate(i, cap, tokens, pinned, held) for i, (cap, pinned, tokens, held) in enumerate(caps)]
    for _ in range(4):
        choice = policy.choose(cands, extra, budget)
        d, v = choice.drafts, choice.verify
        assert set(d) == set(v) == {c.seq_id for c in cands}
        for c in cands:
            assert 0 <= d[c.seq_id] <= min(c.cap, k) and 0 <= v[c.seq_id] <= min(c.cap, k, c.held)
            if c.pinned:
                assert d[c.seq_id] == min(c.cap, k) and v[c.seq_id] == min(c.cap, k, c.held)
        # Verified drafts are in this pass: within its budget. Proposed ones are verified in a decoding pass
        # of these sequences (one token each): within the budget of that one.
        base = extra + sum(c.tokens for c in cands) + sum(v[c.seq_id] for c in cands if c.pinned)
        free = sum(v[c.seq_id] for c in cands if not c.pinned)
        probed = sum(1 for c in cands if v[c.seq_id] == 1 and policy.idle.get(c.seq_id, 0) >= 2)
        assert free - probed <= max(0, budget - base)
        base = len(cands) + sum(d[c.seq_id] for c in cands if c.pinned)
        assert sum(d[c.seq_id] for c in cands if not c.pinned) <= max(0, budget - base)


def test_pass_cost_interpolates_keeps_monotone_and_scales_the_prior_outside():
    cost = PassCost(fixed_s=0.01, per_token_s=0.001, alpha=1.0)
    assert cost(10) == 0.02                                       # nothing seen: the prior
    cost.observe(4, 0.008)
    assert abs(cost(2) - 0.008 * cost.prior(2) / cost.prior(4)) < 1e-12   # the prior's shape, at the seen scale
    cost.observe(16, 0.020)
    cost.observe(8, 0.005)                                        # noise: 4 and 8 pooled, more never costs less
    assert cost(4) <= cost(8) <= cost(16) and abs(cost(6) - 0.0065) < 1e-12
    assert cost(64) > cost(16)                                    # the slope fitted from what was seen
    for n in (4, 8, 16):                                          # the deployment slowed: it follows (alpha 1)
        cost.observe(n, 0.1 * n)
    assert cost(4) == 0.4 and cost(16) == 1.6


def test_a_rarely_seen_noisy_bucket_does_not_lift_a_well_measured_one():
    cost = PassCost(fixed_s=0.01, per_token_s=0.001)
    for _ in range(30):
        cost.observe(16, 0.015)
    cost.observe(15, 0.030)                                       # once, while something else ran
    assert cost(16) < 0.018 and cost(15) <= cost(16)


def test_drafting_time_is_charged_per_mtp_row_not_per_token():
    policy = AdaptivePolicy(3, row_s=0.0)
    for _ in range(50):
        policy.observe_pass(4, 0.016, draft_seconds=0.003, draft_rows=6)
    assert abs(policy.row_s - 0.0005) < 1e-6 and abs(policy.cost(4) - 0.013) < 1e-9
    policy.observe_pass(100, 0.05, draft_seconds=0.004, draft_rows=0)      # prompts fed: all token cost
    assert abs(policy.cost(100) - 0.05) < 1e-9


def test_drafting_that_costs_per_row_turns_off_before_verification_alone_would():
    """Tokens nearly free, but every MTP row drafting costs 1 ms: one sequence drafts, 64 do not."""
    policy = trained(lambda n: 0.010 + 0.00001 * n, row_s=0.001)
    policy.alpha = 0.0                          # keep row_s where it is
    assert mean_drafts(policy, 1) > 0 and mean_drafts(policy, 64) == 0


# ---- in the scheduler --------------------------------------------------------------------------------------
def _scheduler(policy, budget=64):
    return Scheduler(SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=budget, max_model_len=256,
                                     eos_token_id=None), BlockManager(64, 4, 8), policy)


def _decode_until_drafts(s: Scheduler, seqs, drafts=(11, 12, 13)):
    """Run the prompts through; every sequence then holds `drafts` to verify."""
    plan = s.schedule()
    s.update(StepResult(plan.step_id, 0, [SeqOutput(x.seq_id, [7], 0, list(drafts)) for x in plan.seqs]))


def test_the_scheduler_verifies_and_proposes_what_the_policy_chose_and_seeded_sampling_keeps_k():
    policy = trained(lambda n: 0.010 + 0.001 * n)           # 4 sequences: 2 drafts each pay
    s = _scheduler(policy)
    params = SamplingParams(max_tokens=50)
    for i in range(3):
        s.add(Sequence(i, f"r{i}", [5, 6, 7], params, 0, num_speculative=3, arrival_time=float(i)))
    s.add(Sequence(3, "seeded", [5, 6, 7], SamplingParams(max_tokens=50, temperature=1.0, seed=9), 0,
                   num_speculative=3, arrival_time=3.0))
    _decode_until_drafts(s, range(4))
    plan = s.schedule()
    by, choice = {x.seq_id: x for x in plan.seqs}, s._choice
    assert by[3].drafts == [11, 12, 13] and by[3].num_drafts == 3          # seeded: what fixed k does
    assert all(by[i].num_drafts == choice.drafts[i] < 3 and len(by[i].drafts) == choice.verify[i] for i in range(3))
    assert all(x.drafts == [11, 12, 13][:len(x.drafts)] for x in plan.seqs)   # a prefix of what it holds
    assert all(x.mtp_context for x in plan.seqs)             # drafting in this pass: every MTP sequence fed
    s.update(StepResult(plan.step_id, 0, [SeqOutput(x.seq_id, [11] * (len(x.drafts) + 1), len(x.drafts), [1, 2, 3])
                                          for x in plan.seqs]))
    out = s.seqs[3]
    assert (out.num_verified_drafts, out.num_accepted_drafts, out.num_verify_steps) == (3, 3, 1)


def test_when_no_one_drafts_the_mtp_block_is_not_fed():
    policy = trained(lambda n: 0.001 + 0.01 * n)            # tokens are all that cost: drafting never pays
    s = _scheduler(policy)
    for i in range(4):
        s.add(Sequence(i, f"r{i}", [5, 6, 7], SamplingParams(max_tokens=50), 0, num_speculative=3,
                       arrival_time=float(i)))
    _decode_until_drafts(s, range(4))
    plan = s.schedule()
    assert all(x.drafts == [] and x.num_drafts == 0 and not x.mtp_context for x in plan.seqs)


def test_fixed_policy_plans_as_before():
    s = _scheduler(None)
    s.add(Sequence(0, "r0", [5, 6, 7], SamplingParams(max_tokens=50), 0, num_speculative=3))
    _decode_until_drafts(s, [0])
    x = s.schedule().seqs[0]
    assert x.drafts == [11, 12, 13] and x.num_drafts == 3 and not x.mtp_context


def test_a_batch_far_from_drafting_skips_the_evaluation_and_stops_stashing(monkeypatch):
    """32 sequences where a draft each loses by far: between full evaluations (every RECHECK_FAR choices)
    the choice stays at none without computing it, and after STOP_STASHING_AFTER such choices the
    sequences stop stashing MTP pairs; a batch where drafting pays turns stashing back on."""
    policy = trained(lambda n: 0.010 + 0.001 * n)
    cands = [Candidate(i, 3) for i in range(32)]
    evaluated = []
    gains = policy._gains
    monkeypatch.setattr(policy, "_gains", lambda c: evaluated.append(c.seq_id) or gains(c))
    for _ in range(spec_policy.STOP_STASHING_AFTER):
        assert policy.stashing
        assert sum(policy.choose(cands, 0, 4096).drafts.values()) == 0
    assert len(evaluated) == 32 * (1 + spec_policy.STOP_STASHING_AFTER // spec_policy.RECHECK_FAR)
    assert not policy.stashing
    assert policy.choose([Candidate(0, 3)], 0, 4096).drafts[0] == 3      # one sequence: drafting pays
    assert policy.stashing


@pytest.mark.parametrize("drafting_rate, drafts", [(400.0, 0), (600.0, 3)])
def test_what_decode_passes_realized_overrules_the_estimate(drafting_rate, drafts):
    """The learned costs price a pass by its size; a drafting pass also has costs they miss. Once decode
    passes of this batch size with drafts realized fewer tokens/s than those without (8 of each), the
    policy stops choosing drafts there, however well the estimate says they pay; faster, it keeps them."""
    policy = trained(lambda n: 0.010 + 0.00001 * n, row_s=2e-5)         # drafting looks nearly free
    cands = [Candidate(i, 3) for i in range(4)]
    assert mean_drafts(policy, 4) == 3
    for _ in range(spec_policy.REALIZED_MIN_PASSES):
        policy.observe_decode(4, 500.0, drafting=False)
        policy.observe_decode(4, drafting_rate, drafting=True)
        policy.observe_decode(1, 100.0, drafting=True)                  # another batch size: its own record
    assert sum(policy.choose(cands, 0, 4096).drafts.values()) / 4 == drafts
    assert mean_drafts(policy, 1) == 3
