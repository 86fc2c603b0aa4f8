"""n > 1 through the single-process engine: one prefill, n choices, each what an n = 1 request would give.

The prompt is computed once: the engine's own counter (EngineStats.prompt_tokens_computed) grows by
prompt_len - 1 (the parent) + n (each choice reads the prompt's last token), not n * prompt_len.
"""
from __future__ import annotations

import asyncio
import random

import pytest

from model_shards.sampling_params import SamplingParams
from router.engine import AsyncEngine
from router.engine_config import EngineConfig


class Running:
    """An engine started on an event loop of its own; run() drives coroutine factories on it together."""

    def __init__(self, config: EngineConfig):
        self.loop = asyncio.new_event_loop()
        self.engine = AsyncEngine(config)
        self.loop.run_until_complete(self.engine.start())

    def run(self, *coros):
        async def all_of():
            return await asyncio.gather(*(c() for c in coros))
        return self.loop.run_until_complete(asyncio.wait_for(all_of(), 300))

    def close(self):
        self.loop.run_until_complete(self.engine.shutdown())
        self.loop.close()


@pytest.fixture(scope="module")
def running(preset_cache):
    # Drafting in the model's dtype: the float16 drafter may draft differently in a batch of 3 than of 1.
    r = Running(EngineConfig(model="tiny", num_kv_blocks=64, block_size=8, max_num_seqs=8, max_model_len=128,
                             num_speculative_tokens=3, draft_dtype="model"))
    yield r
    r.close()


async def choices(engine, rid, prompt, params, k=None, drafts=None):
    """{index: tokens}, {index: finish_reason} of one request; `drafts` gets {index: (verified, accepted)}."""
    toks, reasons = {}, {}
    async for out in engine.generate(rid, prompt, params, k):
        toks.setdefault(out.index, []).extend(out.new_token_ids)
        if out.finish_reason:
            reasons[out.index] = out.finish_reason
        if drafts is not None:
            drafts[out.index] = (out.num_verified_drafts, out.num_accepted_drafts)
    return toks, reasons


class ProposedDrafts:
    """The engine's executor, noting the MTP drafts each sampling pass proposed, per sequence."""

    def __init__(self, inner):
        self.inner, self.drafts = inner, {}

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def submit(self, plan):
        work = self.inner.submit(plan)

        async def noted():
            result = await work
            for o in result.outputs:
                if o.new_tokens:
                    self.drafts.setdefault(o.seq_id, []).append(o.drafts)
            return result
        return noted()


def _prompt(rng, n):
    return [rng.randrange(3, 250) for _ in range(n)]


@pytest.mark.parametrize("k", [0, 3])
@pytest.mark.parametrize("penalties", [{}, dict(repetition_penalty=1.3, frequency_penalty=0.5)])
def test_greedy_n3_is_three_copies_of_the_n1_output_and_the_prompt_is_computed_once(running, k, penalties):
    engine = running.engine
    rng = random.Random()
    prompt = _prompt(rng, rng.randrange(2, 40))
    one = SamplingParams(max_tokens=12, ignore_eos=True, **penalties)
    three = SamplingParams(max_tokens=12, ignore_eos=True, n=3, **penalties)
    before, drafts_one, drafts_three = {}, {}, {}

    async def n1():
        return await choices(engine, "one", prompt, one, k, drafts_one)

    async def n3():
        before["prefilled"] = engine.stats().prompt_tokens_computed
        return await choices(engine, "three", prompt, three, k, drafts_three)

    engine.set_speculative_policy("fixed")      # k drafts every step: the drafts are comparable
    proposed = engine.executor = ProposedDrafts(engine.executor)
    try:
        ((ref, _),) = running.run(n1)
        ref_drafts, proposed.drafts = list(proposed.drafts.values()), {}
        ((toks, reasons),) = running.run(n3)
    finally:
        engine.set_speculative_policy("adaptive")
        engine.executor = proposed.inner
    assert toks == {0: ref[0], 1: ref[0], 2: ref[0]} and reasons == {0: "length", 1: "length", 2: "length"}
    # every choice drafts what the n = 1 request drafted: the MTP block's KV of the prompt was copied too
    assert drafts_three == {i: drafts_one[0] for i in range(3)}
    assert list(proposed.drafts.values()) == ref_drafts * 3 and any(ref_drafts[0]) == bool(k)
    assert engine.stats().prompt_tokens_computed - before["prefilled"] == len(prompt) - 1 + 3
    assert engine.blocks.all_free() and all(r == 0 for r in engine.blocks.refs)


def test_seeded_choices_differ_reproduce_and_choice_0_is_the_n1_answer(running):
    engine, prompt = running.engine, _prompt(random.Random(), 9)
    kw = dict(max_tokens=10, ignore_eos=True, temperature=1.0, seed=random.getrandbits(32))
    (a, _), (b, _), (one, _) = running.run(
        *(lambda i=i: choices(engine, f"s{i}", prompt, SamplingParams(**kw, n=3), 3) for i in range(2)),
        lambda: choices(engine, "s1n", prompt, SamplingParams(**kw), 3))
    assert a == b and len({tuple(t) for t in a.values()}) == 3
    assert a[0] == one[0]


def test_a_one_token_prompt_gives_n_choices(running):
    engine = running.engine
    ((toks, reasons),) = running.run(lambda: choices(engine, "t", [7], SamplingParams(max_tokens=5, ignore_eos=True,
                                                                                     n=3), 3))
    assert sorted(toks) == [0, 1, 2] and len({tuple(t) for t in toks.values()}) == 1 and len(toks[0]) == 5


def test_choices_under_memory_pressure_are_preempted_and_stay_exact(preset_cache):
    r = Running(EngineConfig(model="tiny", num_kv_blocks=14, block_size=8, max_num_seqs=6, max_model_len=96,
                             max_num_batched_tokens=48, num_speculative_tokens=2))
    eng, rng = r.engine, random.Random()
    prompts = [_prompt(rng, rng.randrange(20, 40)) for _ in range(3)]
    try:
        refs = [r.run(lambda p=p: choices(eng, f"ref{i}", p, SamplingParams(max_tokens=24, ignore_eos=True), 2))[0]
                for i, p in enumerate(prompts)]           # one at a time: no pressure
        assert eng.scheduler.num_preemptions == 0
        got = r.run(*(lambda p=p, i=i: choices(eng, f"r{i}", p, SamplingParams(max_tokens=24, ignore_eos=True, n=2),
                                               i % 3) for i, p in enumerate(prompts)))
    finally:
        r.close()
    assert eng.scheduler.num_preemptions > 0
    for (ref, _), (toks, _) in zip(refs, got):
        assert toks == {0: ref[0], 1: ref[0]}
    assert eng.blocks.all_free() and all(r == 0 for r in eng.blocks.refs)


def test_closing_the_stream_aborts_every_choice_and_frees_their_caches(running):
    engine, prompt = running.engine, _prompt(random.Random(), 20)
    seen = {}

    async def reader():
        aborted = engine.stats().requests_aborted
        async with engine.add_request("gone", prompt, SamplingParams(max_tokens=100, ignore_eos=True, n=3)) as s:
            async for out in s:
                seen[out.index] = seen.get(out.index, 0) + len(out.new_token_ids)
                if len(seen) == 3:
                    break                        # every choice running, 90+ tokens to go: the client leaves
        async def counted():                    # the abort lands when the pass in flight returns
            while engine.stats().requests_aborted == aborted:
                await asyncio.sleep(0)
        await asyncio.wait_for(counted(), 30)
        return engine.stats()

    (stats,) = running.run(reader)
    assert stats.running == 0 and stats.waiting == 0 and stats.kv_blocks_used == 0 and stats.mamba_slots_used == 0
    assert max(seen.values()) < 100 and engine.blocks.all_free()


def test_more_choices_than_the_engine_runs_at_once_are_refused_naming_n(running):
    with pytest.raises(ValueError, match=r"^n: 9 choices, but this engine runs at most 8 sequences at once"):
        running.engine.add_request("big", [5, 6, 7], SamplingParams(n=9))
