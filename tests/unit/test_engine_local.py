"""The single-process engine: continuous batching, preemption and limits, checked against the oracle."""
from __future__ import annotations

import asyncio
import random

import pytest
import torch

from kernels.fast.linear import bf16_bits

from model_shards.sampling_params import SamplingParams
from router.engine import AsyncEngine
from router.engine_config import EngineConfig
from router.outputs import QueueFullError
from tests.engine_helpers import collect, oracle, staggered


def _prompts(n, seed):
    rng = random.Random(seed)
    return [[rng.randrange(3, 250) for _ in range(rng.randrange(2, 50))] for _ in range(n)]


def test_memory_pressure_preempts_by_recompute_and_outputs_stay_exact(preset_cache):
    # 12 blocks of 8 positions cannot hold six ~40-token sequences at once: some must be preempted.
    engine = AsyncEngine(EngineConfig(model="tiny", num_kv_blocks=12, block_size=8, max_num_seqs=6,
                                      max_model_len=96, max_num_batched_tokens=48, num_speculative_tokens=2))
    params = SamplingParams(max_tokens=20, ignore_eos=True)
    prompts = _prompts(6, seed=7)

    async def scenario():
        await engine.start()
        try:
            return await staggered(engine, [(f"r{i}", p, params, 2 if i % 2 else 0) for i, p in enumerate(prompts)])
        finally:
            await engine.shutdown()

    results = asyncio.run(scenario())
    assert engine.scheduler.num_preemptions > 0
    for i, p in enumerate(prompts):
        assert results[f"r{i}"][0] == oracle(engine.folder, p, params)
    assert engine.blocks.all_free()


@pytest.mark.parametrize("draft_dtype,expected", [("auto", torch.float16), ("model", torch.float32)])
def test_mtp_on_and_off_give_the_same_greedy_tokens(preset_cache, draft_dtype, expected):
    engine = AsyncEngine(EngineConfig(model="tiny", num_speculative_tokens=4, max_model_len=128,
                                      draft_dtype=draft_dtype))
    assert engine.executor.worker.model.draft_dtype == expected       # auto: float16 drafts on a CPU
    params = SamplingParams(max_tokens=25, ignore_eos=True)
    prompts = _prompts(4, seed=3)

    async def scenario():
        await engine.start()
        try:
            on = await asyncio.gather(*[collect(engine, f"on{i}", p, params, 4) for i, p in enumerate(prompts)])
            off = await asyncio.gather(*[collect(engine, f"off{i}", p, params, 0) for i, p in enumerate(prompts)])
            return on, off
        finally:
            await engine.shutdown()

    on, off = asyncio.run(scenario())
    assert [t for t, _ in on] == [t for t, _ in off]


@pytest.mark.parametrize("draft_vocab", [True, False])
def test_the_engine_drafts_from_the_checkpoint_draft_vocabulary_unless_told_not_to(draft_vocab):
    engine = AsyncEngine(EngineConfig(model="default", num_speculative_tokens=3, max_model_len=256,
                                      draft_vocab=draft_vocab))
    model = engine.executor.worker.model
    drafter = model.drafter
    if bf16_bits(model.lm_head.weight) is not None:     # auto on a CPU, the checkpoint's exact bfloat16 weights
        assert model.draft_dtype == torch.float32        # read by the native kernel: the model's own weights
        assert (drafter is not None and len(drafter.vocab) == 2048) == draft_vocab
    else:                                                # auto on a CPU without the native kernels: float16
        assert drafter is not None and drafter.dtype == torch.float16
        assert (drafter.vocab is not None and len(drafter.vocab) == 2048) == draft_vocab
    params = SamplingParams(max_tokens=12, ignore_eos=True)
    prompt = [1, 475, 285, 302, 14, 295, 32, 300]

    async def scenario():
        await engine.start()
        try:
            return await collect(engine, "mtp", prompt, params, 3), await collect(engine, "plain", prompt, params, 0)
        finally:
            await engine.shutdown()

    (on, _), (off, _) = asyncio.run(scenario())
    assert on == off and len(on) == 12


def test_a_prompt_over_the_context_is_refused_with_the_limit_and_the_count(preset_cache):
    engine = AsyncEngine(EngineConfig(model="tiny", max_model_len=32))
    with pytest.raises(ValueError, match=r"prompt: 40 tokens, but the context limit is 32"):
        engine.add_request("long", list(range(3, 43)), SamplingParams())


def test_past_the_queue_limit_requests_are_refused(preset_cache):
    engine = AsyncEngine(EngineConfig(model="tiny", max_queued_requests=2))
    engine.add_request("a", [5, 6], SamplingParams())
    engine.add_request("b", [5, 6], SamplingParams())
    with pytest.raises(QueueFullError):
        engine.add_request("c", [5, 6], SamplingParams())


def test_bad_sampling_parameters_name_the_field(preset_cache):
    engine = AsyncEngine(EngineConfig(model="tiny"))
    with pytest.raises(ValueError, match="top_p"):
        engine.add_request("x", [5, 6], SamplingParams(top_p=0.0))
    with pytest.raises(ValueError, match="num_speculative_tokens"):     # the default is auto: k=3 for tiny
        engine.add_request("y", [5, 6], SamplingParams(), num_speculative_tokens=4)


def test_device_memory_caps_the_slots_and_kv_blocks_as_the_planner_computes(preset_cache):
    roomy = AsyncEngine(EngineConfig(model="tiny", max_num_seqs=64, max_model_len=512))
    tight = AsyncEngine(EngineConfig(model="tiny", max_num_seqs=64, max_model_len=512, device_memory_gib=0.003))
    assert roomy.blocks.num_slots == 64
    assert tight.blocks.num_slots == tight.plan.max_num_seqs < 64
    assert tight.blocks.num_blocks == tight.plan.num_kv_blocks < roomy.blocks.num_blocks
