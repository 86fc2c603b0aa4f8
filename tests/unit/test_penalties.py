"""presence / frequency / repetition penalties, logit_bias and min_p as vLLM applies them.

The specification is the plain-torch reference below, one token at a time, written from vLLM's sampler:
  logit_bias:          logit[t] += bias[t]
  repetition_penalty:  for t in prompt or output so far: logit[t] / r if logit[t] > 0 else logit[t] * r
  frequency_penalty:   logit[t] -= f * (occurrences of t in the output so far)
  presence_penalty:    logit[t] -= p if t occurs in the output so far
then temperature, then min_p (drop tokens with probability < min_p * the top probability), top-k, top-p.
Greedy decoding takes the argmax of the adjusted logits. With MTP every verified position sees the
output so far plus the drafts before it, so greedy tokens are identical with and without MTP, and
random sampling with MTP follows the penalized distribution (rejection sampling against it).
"""
from __future__ import annotations

import asyncio
import collections
import math
import random

import pytest
import torch

from kernels.reference.sampling import probs_from_logits
from model_shards import penalties, speculative
from model_shards.batch import BatchLayout
from model_shards.generate import generate
from model_shards.model import HybridModel
from model_shards.presets import get_preset
from model_shards.sampling_params import SamplingParams
from router.engine import AsyncEngine
from router.engine_config import EngineConfig
from tests.engine_helpers import collect
from tests.unit.test_rejection_sampling import assert_distinguishable, assert_follows, draw_drafts
from tests.unit.test_rejection_sampling import collect as collect_verified


def reference_adjust(logits: torch.Tensor, prompt: list[int], output: list[int], params: SamplingParams):
    """One position's logits (V,) float32 adjusted for a context of prompt + output: the specification."""
    logits = logits.float().clone()
    for t, b in params.logit_bias:
        logits[t] += b
    r = params.repetition_penalty
    for t in set(prompt) | set(output):
        logits[t] = logits[t] / r if logits[t] > 0 else logits[t] * r
    for t, c in collections.Counter(output).items():
        logits[t] -= params.frequency_penalty * c
        logits[t] -= params.presence_penalty
    return logits


def reference_greedy(model: HybridModel, prompt: list[int], params: SamplingParams) -> list[int]:
    """Greedy decoding one token per forward pass, penalties by `reference_adjust`."""
    n_blocks = math.ceil((len(prompt) + params.max_tokens + 1) / 16)
    cache = model.make_cache(num_blocks=n_blocks, block_size=16, num_slots=1)
    table = torch.arange(n_blocks)
    out: list[int] = []
    ids, pos = list(prompt), 0
    with torch.no_grad():
        while len(out) < params.max_tokens:
            h = model(torch.tensor(ids), BatchLayout.single(len(ids), pos, table), cache)
            logits = model.logits(h[-1:])[0]
            out.append(int(reference_adjust(logits, prompt, out, params).argmax()))
            pos += len(ids)
            ids = [out[-1]]
    return out


PRESET = get_preset("tiny")
V = PRESET.vocab_size


@pytest.fixture(scope="module")
def model() -> HybridModel:
    return HybridModel(PRESET).init_random(0).eval()


def _prompts(n, seed):
    rng = random.Random(seed)
    return [[rng.randrange(3, 250) for _ in range(rng.randrange(3, 30))] for _ in range(n)]


CASES = {
    "frequency": SamplingParams(max_tokens=24, ignore_eos=True, frequency_penalty=1.5),
    "presence": SamplingParams(max_tokens=24, ignore_eos=True, presence_penalty=1.5),
    "repetition": SamplingParams(max_tokens=24, ignore_eos=True, repetition_penalty=1.8),
    "negative-frequency": SamplingParams(max_tokens=24, ignore_eos=True, frequency_penalty=-0.7),
    "logit-bias": SamplingParams(max_tokens=24, ignore_eos=True, logit_bias=((5, 3.0), (77, -100.0), (200, 2.5))),
    "all": SamplingParams(max_tokens=24, ignore_eos=True, frequency_penalty=0.4, presence_penalty=0.3,
                          repetition_penalty=1.3, logit_bias=((9, 1.5),), min_p=0.2),
}


@pytest.mark.parametrize("case", list(CASES))
def test_greedy_oracle_with_and_without_mtp_equals_the_reference(model, case):
    params = CASES[case]
    changed = 0
    for prompt in _prompts(3, seed=list(CASES).index(case)):
        want = reference_greedy(model, prompt, params)
        assert generate(model, prompt, params, num_drafts=0).tokens == want
        assert generate(model, prompt, params, num_drafts=2).tokens == want
        changed += want != generate(model, prompt, SamplingParams(max_tokens=24, ignore_eos=True)).tokens
    assert changed, "the setting changed no output: the comparison would mean nothing"


def test_the_engine_with_fixed_mtp_and_without_equals_the_reference(preset_cache):
    """Through scheduler, stage worker and batching: several requests with different settings at once."""
    engine = AsyncEngine(EngineConfig(model="tiny", num_speculative_tokens=2, speculative_policy="fixed",
                                      max_model_len=128))
    m = engine.executor.worker.model
    cases = list(CASES.values()) + [SamplingParams(max_tokens=24, ignore_eos=True)]   # a neutral one in the batch
    prompts = _prompts(len(cases), seed=5)

    async def scenario():
        await engine.start()
        try:
            on = await asyncio.gather(*[collect(engine, f"on{i}", p, c, 2)
                                        for i, (p, c) in enumerate(zip(prompts, cases))])
            off = await asyncio.gather(*[collect(engine, f"off{i}", p, c, 0)
                                         for i, (p, c) in enumerate(zip(prompts, cases))])
            return on, off
        finally:
            await engine.shutdown()

    on, off = asyncio.run(scenario())
    for (p, c), (t_on, _), (t_off, _) in zip(zip(prompts, cases), on, off):
        want = reference_greedy(m, p, c)
        assert t_on == want and t_off == want


def test_the_engine_keeps_counting_across_preemption_by_recompute(preset_cache):
    """A tight KV cache preempts sequences; the last stage rebuilds their tokens from position 0."""
    engine = AsyncEngine(EngineConfig(model="tiny", num_speculative_tokens=2, speculative_policy="fixed",
                                      num_kv_blocks=10, block_size=8, max_num_seqs=4, max_model_len=64,
                                      max_num_batched_tokens=32))
    m = engine.executor.worker.model
    prompts = [[5 + i, 60 + i, 17, 33 + i] * (3 + i) for i in range(4)]
    params = SamplingParams(max_tokens=28, ignore_eos=True, frequency_penalty=0.8, repetition_penalty=1.4)

    async def scenario():
        await engine.start()
        try:
            out = await asyncio.gather(*[collect(engine, f"r{i}", p, params, k=2 * (i % 2))
                                         for i, p in enumerate(prompts)])
            await collect(engine, "after", [3, 4], SamplingParams(max_tokens=2))   # its plans carry the releases
            return out
        finally:
            await engine.shutdown()

    results = asyncio.run(scenario())
    assert engine.scheduler.num_preemptions > 0
    for p, (tokens, _) in zip(prompts, results):
        assert tokens == reference_greedy(m, p, params)
    assert len(engine.executor.worker.store.history) == 0          # dropped with their sequences


def test_penalties_change_greedy_outputs_in_the_expected_direction(model):
    prompts = _prompts(4, seed=11)
    plain = SamplingParams(max_tokens=40, ignore_eos=True)
    for prompt in prompts:
        base = generate(model, prompt, plain, num_drafts=2).tokens
        freq = generate(model, prompt, SamplingParams(max_tokens=40, ignore_eos=True, frequency_penalty=2.0),
                        num_drafts=2).tokens
        pres = generate(model, prompt, SamplingParams(max_tokens=40, ignore_eos=True, presence_penalty=2.0),
                        num_drafts=2).tokens
        rep = generate(model, prompt, SamplingParams(max_tokens=40, ignore_eos=True, repetition_penalty=1.0e3),
                       num_drafts=2).tokens
        assert len(set(freq)) >= len(set(base)) and len(set(pres)) >= len(set(base))
        # A huge repetition penalty on positive logits: prompt and output tokens are (almost) never repeated.
        assert len(set(rep) & set(prompt)) <= len(set(base) & set(prompt)) and len(set(rep)) >= len(set(base))
        boosted = generate(model, prompt, SamplingParams(max_tokens=10, ignore_eos=True, logit_bias=((42, 100.0),)),
                           num_drafts=2).tokens
        assert boosted == [42] * 10
        banned = generate(model, prompt, SamplingParams(max_tokens=40, ignore_eos=True,
                                                         logit_bias=tuple((t, -100.0) for t in set(base))),
                          num_drafts=2).tokens
        assert not set(banned) & set(base)
    # Summed over the prompts, a strong frequency penalty repeats fewer tokens than plain greedy decoding.
    def repeats(toks):
        return len(toks) - len(set(toks))
    assert sum(repeats(generate(model, p, SamplingParams(max_tokens=40, ignore_eos=True, frequency_penalty=2.0),
                                num_drafts=0).tokens) for p in prompts) < \
        sum(repeats(generate(model, p, plain, num_drafts=0).tokens) for p in prompts)


def test_each_verified_row_counts_the_drafts_before_it():
    g = torch.Generator().manual_seed(3)
    vocab = 16
    prompt, output, drafts = [1, 2, 3, 3], [4, 5, 4], [4, 7, 2]
    params = SamplingParams(frequency_penalty=0.6, presence_penalty=0.25, repetition_penalty=1.7,
                            logit_bias=((0, 2.0), (7, -1.0), (99, 5.0)))     # 99: outside the vocabulary
    logits = torch.randn(len(drafts) + 1, vocab, generator=g) * 3
    got = penalties.apply(logits.clone(), params, prompt + output, len(prompt), drafts)
    for j in range(len(drafts) + 1):
        ref = reference_adjust(logits[j], prompt, output + drafts[:j],
                               SamplingParams(**{**params.to_dict(), "logit_bias": ((0, 2.0), (7, -1.0))}))
        torch.testing.assert_close(got[j], ref, rtol=0, atol=1e-6)


def test_min_p_drops_tokens_below_a_fraction_of_the_top_probability():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.12, 0.08]]))
    p = probs_from_logits(logits, 1.0, min_p=0.2)               # threshold 0.1: the 0.08 token goes
    torch.testing.assert_close(p, torch.tensor([[0.5, 0.3, 0.12, 0.0]]) / 0.92)
    assert torch.equal(probs_from_logits(logits, 1.0, min_p=0.0), torch.softmax(logits, -1))
    # After temperature, as vLLM: at temperature 0.5 the probabilities sharpen, and 0.12 falls below 0.2 * top.
    sharp = probs_from_logits(logits, 0.5, min_p=0.2)
    assert sharp[0, 2] == 0 and sharp[0, 1] > 0


def test_random_sampling_with_mtp_follows_the_penalized_distribution():
    """Rejection sampling verifies against the penalized target: row 0 counts the output so far, row 1
    the output plus the first draft (test_rejection_sampling.py's statistics)."""
    vocab, n = 8, 20_000
    g = torch.Generator().manual_seed(70)
    raw = 1.5 * torch.randn(2, vocab, generator=g)
    prompt, output = [0, 1], [2, 2, 3]
    params = SamplingParams(temperature=0.9, frequency_penalty=1.0, presence_penalty=0.5, repetition_penalty=1.5,
                            logit_bias=((6, 1.0),), min_p=0.05)
    q = torch.softmax(torch.randn(1, vocab, generator=g), -1)
    drafts = draw_drafts(q, n, seed=71)
    gen = torch.Generator().manual_seed(72)
    target = probs_from_logits(reference_adjust(raw[0], prompt, output, params)[None], params.temperature,
                               min_p=params.min_p)[0]

    def verify(d):
        adjusted = penalties.apply(raw.clone(), params, prompt + output, len(prompt), d.tolist())
        return speculative.verify(adjusted, d.tolist(), q, params, gen)

    first, _, bonus = collect_verified(verify, drafts)
    assert_distinguishable(drafts[:, 0], target)
    assert_follows(first, target, "first token")
    # The bonus token (draft accepted) follows the target given that draft: check the commonest draft.
    d0 = int(torch.mode(drafts[:, 0]).values)
    accepted = torch.tensor([b for b, d in zip(bonus.tolist(), drafts[:, 0][_accepted_mask(first, drafts)].tolist())
                             if d == d0])
    bonus_target = probs_from_logits(reference_adjust(raw[1], prompt, output + [d0], params)[None],
                                     params.temperature, min_p=params.min_p)[0]
    assert_follows(accepted, bonus_target, "bonus token after the commonest draft")


def _accepted_mask(first: torch.Tensor, drafts: torch.Tensor) -> torch.Tensor:
    """Which verifications accepted their one draft (collect() keeps a bonus token exactly for those)."""
    return first == drafts[:, 0]


@pytest.mark.parametrize("r", [1e-30, 1e30])
def test_extreme_repetition_penalties_keep_the_distribution_finite(r):
    """Any r > 0 is accepted (vLLM's rule): the adjusted logits stay finite, the draws well defined."""
    logits = torch.tensor([[30.0, -20.0, 5.0, 1.0]])
    params = SamplingParams(temperature=0.01, repetition_penalty=r)
    adjusted = penalties.apply(logits.clone(), params, [0, 1, 2, 3], 2, [])
    assert torch.isfinite(adjusted).all()
    p = speculative.probs(adjusted, params)
    assert torch.isfinite(p).all() and abs(float(p.sum()) - 1) < 1e-5
