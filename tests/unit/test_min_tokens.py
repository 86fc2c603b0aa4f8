"""min_tokens as vLLM defines it: before a request has min_tokens tokens its stop tokens (EOS too, unless
ignore_eos) cannot be sampled, so they never end it early and never appear in its output.

The models here prefer the stop token at every position (a bias on its logit), so without the mask each
request would end after one token. The mask lives in the last stage's tail (model_shards/tail.py), per
verified position, so MTP on and off give the same greedy tokens.
"""
from __future__ import annotations

import asyncio

import pytest
import torch

from model_shards.generate import generate
from model_shards.model import HybridModel
from model_shards.presets import get_preset
from model_shards.sampling_params import SamplingParams
from model_shards.tail import forbid_stops
from router.engine import AsyncEngine
from router.engine_config import EngineConfig
from tests.engine_helpers import collect

EOS = get_preset("tiny").eos_token_id
STOP = 7                              # a stop_token_ids entry, preferred just below EOS
PROMPT = [5, 9, 40, 33, 17, 120, 64]


def prefer(model: HybridModel, bias: dict[int, float]) -> HybridModel:
    """Make the verifying logits prefer these tokens by far (the MTP drafts are left alone)."""
    plain = model.logits

    def biased(h):
        out = plain(h)
        for t, b in bias.items():
            out[:, t] += b
        return out

    model.logits = biased
    return model


@pytest.fixture(scope="module")
def eos_model() -> HybridModel:
    return prefer(HybridModel(get_preset("tiny")).init_random(0).eval(), {EOS: 1e4, STOP: 5e3})


@pytest.mark.parametrize("k", [0, 3], ids=["mtp-off", "mtp-k3"])
def test_eos_is_not_sampled_before_min_tokens(eos_model, k):
    out = generate(eos_model, PROMPT, SamplingParams(max_tokens=12, min_tokens=6), num_drafts=k)
    assert out.tokens[:6].count(EOS) == 0 and len(out.tokens) == 7
    assert out.tokens[6] == EOS and out.finish_reason == "stop"


@pytest.mark.parametrize("k", [0, 3], ids=["mtp-off", "mtp-k3"])
def test_stop_token_ids_are_masked_too_and_greedy_mtp_equals_mtp_off(eos_model, k):
    params = SamplingParams(max_tokens=20, min_tokens=9, stop_token_ids=(STOP,))
    out = generate(eos_model, PROMPT, params, num_drafts=k)
    assert not {EOS, STOP} & set(out.tokens[:9]) and len(out.tokens) == 10 and out.tokens[9] == EOS
    assert out.tokens == generate(eos_model, PROMPT, params, num_drafts=0).tokens


@pytest.mark.parametrize("k", [0, 2], ids=["mtp-off", "mtp-k2"])
def test_random_sampling_respects_min_tokens(eos_model, k):
    params = SamplingParams(temperature=1.0, seed=11, max_tokens=10, min_tokens=5, stop_token_ids=(STOP,))
    out = generate(eos_model, PROMPT, params, num_drafts=k)
    assert not {EOS, STOP} & set(out.tokens[:5]) and len(out.tokens) == 6 and out.tokens[5] in (EOS, STOP)


def test_without_min_tokens_the_biased_model_stops_at_once(eos_model):
    """The bias works: the tests above mean something."""
    assert generate(eos_model, PROMPT, SamplingParams(max_tokens=8), num_drafts=3).tokens == [EOS]


def test_ignore_eos_leaves_eos_sampleable_and_masks_the_stop_ids():
    logits = torch.zeros(3, 16)
    forbid_stops(logits, 1, SamplingParams(min_tokens=3, stop_token_ids=(4, 99), ignore_eos=True), EOS)
    # Outputs 1 and 2 are short of min_tokens=3, output 3 is not; id 99 is outside the vocabulary.
    assert torch.isinf(logits[:2, 4]).all() and not torch.isinf(logits[2]).any()
    assert not torch.isinf(logits[:, EOS]).any()


def test_a_mask_that_would_leave_no_token_is_not_applied():
    logits = torch.zeros(1, 3)
    forbid_stops(logits, 0, SamplingParams(min_tokens=2, stop_token_ids=(0, 1)), 2)
    assert torch.isfinite(logits).all()


def test_the_engine_masks_per_sequence_with_mtp_and_preemption(preset_cache):
    """Through the scheduler and the stage worker: each sequence counts its own outputs (the last stage
    notes where they start), also across preemption by recompute (tight KV cache)."""
    engine = AsyncEngine(EngineConfig(model="tiny", num_speculative_tokens=2, num_kv_blocks=10, block_size=8,
                                      max_num_seqs=4, max_model_len=64, max_num_batched_tokens=32))
    prefer(engine.executor.worker.model, {EOS: 1e4})
    prompts = [[5 + i, 60 + i, 17, 33 + i] * (3 + i) for i in range(4)]

    async def scenario():
        await engine.start()
        try:
            return await asyncio.gather(*[
                collect(engine, f"r{i}", p, SamplingParams(max_tokens=30, min_tokens=8 + 4 * i), k=2 * (i % 2))
                for i, p in enumerate(prompts)])
        finally:
            await engine.shutdown()

    results = asyncio.run(scenario())
    assert engine.scheduler.num_preemptions > 0
    for i, (tokens, reason) in enumerate(results):
        n = 8 + 4 * i
        assert EOS not in tokens[:n] and tokens[n:] == [EOS] and reason == "stop", (i, tokens)
    assert engine.blocks.all_free()
