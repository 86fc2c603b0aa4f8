"""n > 1 on the Ray engine at -pp 2 -ep 2: the stages copy each choice's Mamba state and KV from its parent
(cluster/worker.py), two micro-batches in flight; every choice gives the single-process oracle's tokens."""
from __future__ import annotations

import asyncio
import dataclasses
import random

import pytest

from model_shards.sampling_params import SamplingParams
from router.engine import AsyncEngine
from router.engine_config import EngineConfig
from tests.engine_helpers import oracle

pytestmark = pytest.mark.integration


async def _choices(engine, rid, prompt, params, k):
    toks = {}
    async for out in engine.generate(rid, prompt, params, k):
        toks.setdefault(out.index, []).extend(out.new_token_ids)
    return toks


def test_n3_choices_equal_the_oracle_at_pp2_ep2_with_mtp_on_and_off(ray_local, preset_cache):
    engine = AsyncEngine(EngineConfig(model="tiny", use_ray=True, pipeline_parallel_size=2, expert_parallel_size=2,
                                      num_speculative_tokens=3, max_model_len=160, max_num_batched_tokens=40,
                                      max_num_seqs=8))
    rng = random.Random()
    prompts = [[rng.randrange(3, 250) for _ in range(n)] for n in (45, 9, 1)]   # chunked, short, one token
    greedy = SamplingParams(max_tokens=10, ignore_eos=True, n=3)
    seeded = SamplingParams(max_tokens=8, temperature=0.8, seed=rng.getrandbits(32), ignore_eos=True, n=3)

    async def scenario():
        await engine.start()
        try:
            runs = [_choices(engine, f"g{i}-{k}", p, greedy, k) for i, p in enumerate(prompts) for k in (0, 3)]
            return await asyncio.gather(*runs, _choices(engine, "seeded", prompts[1], seeded, 3))
        finally:
            await engine.shutdown()

    *results, sampled = asyncio.run(scenario())
    for (i, p), toks in zip([(i, p) for i, p in enumerate(prompts) for _ in (0, 3)], results):
        want = oracle(engine.folder, p, SamplingParams(max_tokens=10, ignore_eos=True))
        assert toks == {0: want, 1: want, 2: want}, f"prompt {i}"
    assert sampled[0] == oracle(engine.folder, prompts[1], dataclasses.replace(seeded, n=1), k=3)   # choice 0: n=1
    assert len({tuple(t) for t in sampled.values()}) == 3
    assert engine.blocks.all_free() and all(r == 0 for r in engine.blocks.refs)
