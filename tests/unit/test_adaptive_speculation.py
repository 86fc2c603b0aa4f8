"""Adaptive speculation through the single-process engine: outputs never depend on the drafts chosen.

Greedy: MTP off, fixed k, the adaptive policy and a policy that chooses at random (0..k drafts per
sequence per step, verifying fewer than a sequence holds) all give the oracle's tokens, on the trained
default model (real acceptance) with chunked prompts arriving while others decode.
Random sampling: the tokens' distribution with drafts chosen adaptively, or at random, equals the one
with MTP off (Pearson's chi-square test of homogeneity at significance 0.001 over a fixed set of seeds),
and the test tells a different temperature apart.
"""
from __future__ import annotations

import asyncio
import collections
import math
import random

import pytest

from model_shards.sampling_params import SamplingParams
from router.engine import AsyncEngine
from router.engine_config import EngineConfig
from router import spec_policy
from router.spec_policy import AdaptivePolicy
from tests.engine_helpers import RandomDrafts, oracle, staggered, use_speculative_mode

GREEDY = SamplingParams(max_tokens=24, ignore_eos=True)
PROMPTS = [[1, 475, 285, 302, 14, 295, 32, 300], [1, 302, 14, 295, 32, 300, 475, 285, 302, 14, 295, 32, 300] * 3,
           [1, 475, 285], [1, 295, 32, 300, 475, 285, 302, 14] * 5, [1, 14, 295, 32], [1, 300, 475, 285, 302] * 2]


def test_auto_is_three_drafts_with_an_mtp_block_and_zero_without():
    cfg = EngineConfig()
    assert cfg.num_speculative_tokens == "auto" and cfg.speculative_policy == "adaptive"
    assert cfg.speculative_tokens_for(True) == 3 and cfg.speculative_tokens_for(False) == 0
    assert EngineConfig(num_speculative_tokens=0).speculative_tokens_for(True) == 0       # 0 stays off
    for bad in (-1, "three", True):
        with pytest.raises(ValueError, match="num_speculative_tokens"):
            EngineConfig(num_speculative_tokens=bad).validate()
    with pytest.raises(ValueError, match="speculative_policy"):
        EngineConfig(speculative_policy="greedy").validate()


def test_greedy_tokens_are_the_oracles_with_mtp_off_fixed_adaptive_and_random_drafts():
    engine = AsyncEngine(EngineConfig(model="default", max_model_len=256, max_num_batched_tokens=40, max_num_seqs=8))
    assert engine.config.num_speculative_tokens == 3                   # auto: the shipped checkpoint has MTP
    modes = {"off": None, "fixed": "fixed", "adaptive": "adaptive", "random": RandomDrafts(3, seed=5)}

    async def scenario():
        await engine.start()
        results, outs = {}, {}
        try:
            for mode, policy in modes.items():
                k = use_speculative_mode(engine, mode, policy)
                results[mode] = await staggered(engine, [(f"{mode}{i}", p, GREEDY, k) for i, p in enumerate(PROMPTS)])
                outs[mode] = engine.stats()
            return results, outs
        finally:
            await engine.shutdown()

    results, stats = asyncio.run(scenario())
    for i, p in enumerate(PROMPTS):
        want = oracle(engine.folder, p, GREEDY)
        for mode in modes:
            assert results[mode][f"{mode}{i}"] == (want, "length"), f"prompt {i} differs with MTP {mode}"
    assert engine.blocks.all_free()
    chosen = [b - a for a, b in zip(stats["adaptive"].drafts_per_seq, stats["random"].drafts_per_seq)]
    assert all(c > 0 for c in chosen), f"the random policy chose every count 0..3: {chosen}"
    assert sum(stats["random"].accepted_per_position) > sum(stats["fixed"].accepted_per_position) > 0


def test_a_finished_request_reports_its_drafts_verified_and_accepted():
    engine = AsyncEngine(EngineConfig(model="default", max_model_len=256, speculative_policy="fixed"))

    async def scenario():
        await engine.start()
        try:
            outs = {}
            for k in (0, 3):
                async for out in engine.generate(f"k{k}", PROMPTS[0], GREEDY, k):
                    outs[k] = out
            return outs
        finally:
            await engine.shutdown()

    outs = asyncio.run(scenario())
    assert (outs[0].num_verified_drafts, outs[0].num_accepted_drafts, outs[0].num_verify_steps) == (0, 0, 0)
    o = outs[3]
    assert o.finished and 0 < o.num_accepted_drafts <= o.num_verified_drafts <= 3 * o.num_verify_steps
    assert o.num_verify_steps + o.num_accepted_drafts + 1 >= o.num_output_tokens      # 1 from the prompt's pass


# ---- random sampling: the distribution --------------------------------------------------------------------
N, SEED, POSITIONS = 600, 20240601, range(1, 6)
SAMPLED = SamplingParams(max_tokens=6, temperature=1.0, top_k=4, ignore_eos=True)


def chi2_critical_999(df: int) -> float:
    """The 0.999 quantile of chi-square with df degrees of freedom (Wilson-Hilferty; within 1% here)."""
    z = 3.0902
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def homogeneity(a: list[int], b: list[int]) -> tuple[float, int]:
    """Pearson's chi-square test that two independent samples come from one distribution: (statistic,
    degrees of freedom). Categories with fewer than 10 draws in both samples together are pooled."""
    ca, cb = collections.Counter(a), collections.Counter(b)
    cats = [t for t in set(ca) | set(cb) if ca[t] + cb[t] >= 10]
    rest = (sum(ca.values()) - sum(ca[t] for t in cats), sum(cb.values()) - sum(cb[t] for t in cats))
    rows = [(ca[t], cb[t]) for t in cats] + ([rest] if sum(rest) else [])
    na, nb = sum(r[0] for r in rows), sum(r[1] for r in rows)
    stat = 0.0
    for x, y in rows:
        for obs, n in ((x, na), (y, nb)):
            exp = (x + y) * n / (na + nb)
            stat += (obs - exp) ** 2 / exp
    return stat, len(rows) - 1


def test_drafts_chosen_adaptively_or_at_random_leave_the_sampling_distribution_alone(monkeypatch):
    """N requests per arm, each with its own seed (the engine draws them: `random` seeded per arm, a different
    set per arm so the samples are independent), the trained model (drafts are accepted about half the
    time at temperature 1, top_k 4): output tokens 1..5 (token 0 comes from the prompt's pass, before any
    draft) have one distribution with MTP off, with drafts chosen adaptively and with drafts chosen at
    random; temperature 0.4 is told apart."""
    engine = AsyncEngine(EngineConfig(model="default", max_model_len=64, max_num_seqs=16, max_queued_requests=N))
    # The adaptive policy with its pass costs frozen (the engine does not feed it timings), so its choices
    # depend on the sequences' acceptance alone and the run repeats: passes bound by a fixed cost and cheap
    # tokens (a weight-bound pass) make it draft at every batch size up to 16, each sequence as its
    # acceptance says; exploring and probing often make it vary more. (With a fixed cost of 0.01 s drafting
    # paid only in small batches, which look-ahead's batches of 16 in lockstep hardly ever were.)
    adaptive = AdaptivePolicy(3, fixed_s=0.05, per_token_s=5e-4, row_s=2e-4, probe_every=3, explore_every=5)
    monkeypatch.setattr(spec_policy, "FAR_FROM_DRAFTING", 1.0)    # explore at the same pace at every batch size
    engine.adaptive_policy = None
    arms = {"off": (0, None, SAMPLED, 1), "adaptive": (3, adaptive, SAMPLED, 2),
            "random": (3, RandomDrafts(3, seed=9), SAMPLED, 3),
            "cooler": (0, None, SamplingParams(max_tokens=6, temperature=0.4, top_k=4, ignore_eos=True), 4)}

    async def arm(name, k, policy, params, seed_set):
        if policy is not None:
            engine.scheduler.policy = policy
        random.seed(SEED + seed_set)
        before = engine.stats()
        streams = [engine.add_request(f"{name}-{i}", [1, 475, 285, 302, 14, 295, 32, 300], params, k) for i in range(N)]

        async def read(s):
            toks = []
            async for out in s:
                toks += out.new_token_ids
            return toks
        toks = await asyncio.gather(*[read(s) for s in streams])
        after = engine.stats()
        verified = sum(after.drafted_per_position) - sum(before.drafted_per_position)
        accepted = sum(after.accepted_per_position) - sum(before.accepted_per_position)
        return toks, (verified, accepted)

    async def scenario():
        await engine.start()
        try:
            return {name: await arm(name, *a) for name, a in arms.items()}
        finally:
            await engine.shutdown()

    out = asyncio.run(scenario())
    for name in ("adaptive", "random"):
        verified, accepted = out[name][1]
        assert N < verified and 0.2 * verified < accepted < 0.8 * verified, \
            f"{name}: {verified} drafts verified, {accepted} accepted"
    for pos in POSITIONS:
        off = [t[pos] for t in out["off"][0]]
        for name in ("adaptive", "random"):
            stat, df = homogeneity(off, [t[pos] for t in out[name][0]])
            assert stat < chi2_critical_999(df), f"token {pos}, {name} vs off: chi-square {stat:.1f} (df {df})"
        stat, df = homogeneity(off, [t[pos] for t in out["cooler"][0]])
        assert stat > chi2_critical_999(df), f"token {pos}: the test cannot tell temperature 0.4 from 1.0"
