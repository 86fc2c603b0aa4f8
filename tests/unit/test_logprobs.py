"""Logprobs (`SamplingParams.logprobs` / `prompt_logprobs`) as vLLM reports them by default.

The specification: the logprob entry of output token i is the float32 log_softmax, over the full vocabulary,
of the model's raw logits at the position before it, given the prompt and the tokens actually emitted
before it (`teacher_forced` below: one forward pass over prompt + output, no cache games), before any
logit_bias, penalty, min_tokens mask, temperature or top-k/p. Prompt token q's entry is row q - 1 of
the same pass. With MTP each emitted token (accepted drafts, then the bonus / corrected one) is scored by
the verification row that read it, so the numbers are the ones without MTP; greedy outputs are identical.

Uses the shipped default model (checkpoints/hybrid-mini): its trained MTP block gets drafts accepted, so
the verified rows of accepted drafts are really exercised.
"""
from __future__ import annotations

import asyncio
import math
import random
from pathlib import Path

import pytest
import torch

from model_shards import logprobs as lp_mod
from model_shards.batch import BatchLayout
from model_shards.generate import generate
from model_shards.sampling_params import SamplingParams
from model_shards.weights import load_checkpoint
from router.engine import AsyncEngine
from router.engine_config import EngineConfig

FOLDER = Path(__file__).resolve().parents[2] / "checkpoints" / "hybrid-mini"
CODE = 'import os\n\n\ndef read_lines(path):\n    """Return the lines of a file."""\n    with open(path) as f:\n'
ATOL = 2e-4              # incremental decoding vs one teacher-forced pass: float32 rounding only


@pytest.fixture(scope="module")
def model():
    return load_checkpoint(FOLDER, dtype=torch.float32)


@pytest.fixture(scope="module")
def prompt():
    from tokenizers import Tokenizer
    return [1] + Tokenizer.from_file(str(FOLDER / "tokenizer.json")).encode(CODE).ids


@torch.no_grad()
def teacher_forced(model, ids: list[int]) -> torch.Tensor:
    """Raw logprobs (len(ids), V) of one forward pass over `ids`: row p scores the token at p + 1."""
    T, block = len(ids), 16
    n = math.ceil(T / block)
    cache = model.make_cache(num_blocks=n, block_size=block, num_slots=1)
    h = model(torch.tensor(ids), BatchLayout.single(T, 0, torch.arange(n)), cache)
    return torch.log_softmax(model.logits(h).float(), dim=-1)


def assert_entries_match(entries: list, ref_rows: torch.Tensor, tokens: list[int], k: int):
    """Each entry [logprob, top ids, top logprobs] equals the reference row's: the chosen token's logprob,
    the k best tokens (the order of near-ties may differ) and their logprobs."""
    assert len(entries) == len(tokens) == len(ref_rows)
    for i, ((chosen, ids, lps), row, tok) in enumerate(zip(entries, ref_rows, tokens)):
        assert chosen == pytest.approx(row[tok].item(), abs=ATOL), f"token {i}"
        assert len(ids) == len(lps) == k and lps == sorted(lps, reverse=True)
        top_lp, _ = row.topk(k)
        assert lps == pytest.approx(top_lp.tolist(), abs=ATOL), f"token {i}"
        assert [row[t].item() for t in ids] == pytest.approx(lps, abs=ATOL), f"token {i}"
        # the alternatives plus everything else: the full distribution sums to 1
        rest = row.exp().sum().item() - sum(row[t].exp().item() for t in ids)
        assert sum(math.exp(v) for v in lps) + rest == pytest.approx(1.0, abs=1e-3)


@pytest.mark.parametrize("k", [0, 3], ids=["mtp-off", "mtp-k3"])
@pytest.mark.parametrize("top", [0, 5, 20])
def test_greedy_logprobs_equal_the_teacher_forced_reference(model, prompt, k, top):
    params = SamplingParams(max_tokens=24, ignore_eos=True, logprobs=top, prompt_logprobs=top)
    out = generate(model, prompt, params, num_drafts=k, prefill_chunk=7)
    assert out.tokens == generate(model, prompt, SamplingParams(max_tokens=24, ignore_eos=True)).tokens
    if k:
        assert out.num_accepted > 0, "no draft accepted: the verified rows of drafts were not exercised"
    ref = teacher_forced(model, prompt + out.tokens)
    assert_entries_match(out.logprobs, ref[len(prompt) - 1:-1], out.tokens, top)
    assert_entries_match(out.prompt_logprobs, ref[:len(prompt) - 1], prompt[1:], top)
    if top:          # greedy: the chosen token is the best one
        assert all(e[1][0] == t for e, t in zip(out.logprobs, out.tokens))


@pytest.mark.parametrize("k", [0, 3], ids=["mtp-off", "mtp-k3"])
def test_logprobs_are_of_the_raw_distribution_under_penalties_bias_and_sampling(model, prompt, k):
    """Penalties, logit_bias, min_tokens and temperature change which tokens come, not what is reported."""
    seed = random.getrandbits(31)
    params = SamplingParams(temperature=0.8, top_k=40, seed=seed, max_tokens=20, ignore_eos=True, min_tokens=5,
                            repetition_penalty=1.3, presence_penalty=0.5, logit_bias=((prompt[3], 5.0),),
                            logprobs=2)
    out = generate(model, prompt, params, num_drafts=k)
    if k:
        assert out.num_accepted > 0, f"seed {seed}: no draft accepted, the verified rows of drafts were not exercised"
    ref = teacher_forced(model, prompt + out.tokens)
    assert_entries_match(out.logprobs, ref[len(prompt) - 1:-1], out.tokens, 2)
    assert out.prompt_logprobs is None


def test_without_logprobs_nothing_is_computed(model, prompt):
    out = generate(model, prompt, SamplingParams(max_tokens=4), num_drafts=3)
    assert out.logprobs is None and out.prompt_logprobs is None


def test_prompt_rows_are_computed_in_bounded_chunks(model, prompt, monkeypatch):
    """A long prefill chunk never holds (chunk x V) logits at once for prompt logprobs."""
    monkeypatch.setattr(lp_mod, "PROMPT_ROWS_PER_CHUNK", 4)
    seen = []
    real = lp_mod.raw_logprobs
    monkeypatch.setattr(lp_mod, "raw_logprobs", lambda x: seen.append(x.shape[0]) or real(x))
    out = generate(model, prompt, SamplingParams(max_tokens=1, prompt_logprobs=1))
    assert len(out.prompt_logprobs) == len(prompt) - 1 and max(seen) == 4
    assert_entries_match(out.prompt_logprobs, teacher_forced(model, prompt)[:-1], prompt[1:], 1)


def test_limits_are_checked_with_the_field_named():
    for field in ("logprobs", "prompt_logprobs"):
        for bad in (-1, 21, True, 2.0):
            with pytest.raises(ValueError, match=f"^{field}:"):
                SamplingParams(**{field: bad}).validate()
        SamplingParams(**{field: 20}).validate()


def test_the_engine_reports_them_through_scheduler_and_worker_with_and_without_mtp(model, prompt):
    """Several requests batched, chunked prefill (prompt logprobs cross chunks and the plan / result
    contracts), fixed MTP k=3 and MTP off: identical greedy tokens, logprobs equal to the reference."""
    engine = AsyncEngine(EngineConfig(model=str(FOLDER), num_speculative_tokens=3, speculative_policy="fixed",
                                      max_model_len=256, max_num_batched_tokens=16, dtype="float32"))
    prompts = [prompt, prompt[:9], prompt[5:]]

    async def run(rid, p, params, k):
        toks, lps, plps, accepted = [], [], None, 0
        async for o in engine.generate(rid, p, params, k):
            toks += o.new_token_ids
            lps += o.logprobs or []
            plps = o.prompt_logprobs if o.prompt_logprobs is not None else plps
            accepted = o.num_accepted_drafts
        return toks, lps, plps, accepted

    async def scenario():
        await engine.start()
        try:
            params = SamplingParams(max_tokens=16, ignore_eos=True, logprobs=3, prompt_logprobs=2)
            return await asyncio.gather(*[run(f"{k}-{i}", p, params, k) for k in (3, 0) for i, p in enumerate(prompts)])
        finally:
            await engine.shutdown()

    results = asyncio.run(scenario())
    on, off = results[:3], results[3:]
    assert sum(r[3] for r in on) > 0
    for p, (t_on, lp_on, plp_on, _), (t_off, lp_off, plp_off, _) in zip(prompts, on, off):
        assert t_on == t_off and len(t_on) == 16
        ref = teacher_forced(model, p + t_on)
        for lps, plps in ((lp_on, plp_on), (lp_off, plp_off)):
            assert_entries_match(lps, ref[len(p) - 1:-1], t_on, 3)
            assert_entries_match(plps, ref[:len(p) - 1], p[1:], 2)
