"""Whole blocks in one C call (model_shards/fused_blocks.py over kernels/fast/native/blocks.c).

Specification: wherever the fused path runs, the model's hidden states and every cache it writes (Mamba
states, verification scratch, KV) are the unfused native path's, bit for bit, so the choice never changes
a token; it runs for decode steps, verifications, MTP-sized MoE calls and short attention chunks of up
to MAX_ROWS rows, and nowhere else (more rows, autograd, other kernels forced, weights that are not exact
bfloat16), where the modules run as written; it follows weights changed in place. Models: the `tiny`
preset (latent MoE, 2 groups) and a variant without the latent space and with one group, with random
weights rounded to bfloat16 (a checkpoint stored in bfloat16).
"""
from __future__ import annotations

import copy

import pytest
import torch

from kernels import ops
from kernels.fast import blocks as fused
from kernels.fast import native
from model_shards import fused_blocks
from model_shards.batch import BatchLayout, SeqSlice
from model_shards.generate import generate
from model_shards.model import HybridModel
from model_shards.presets import get_preset
from model_shards.sampling_params import SamplingParams

pytestmark = pytest.mark.skipif(native.library() is None, reason=f"native kernels not built: {native.why_not()}")

CONFIGS = {
    "tiny": get_preset("tiny"),
    "tiny-nolatent-g1": get_preset("tiny").replace(name="tiny-nolatent-g1", moe_latent_size=None, n_groups=1),
}
BS, PROMPT = 4, 9
SLOTS = fused.MAX_ROWS + 1                  # a decode pass of every row count the fused path takes, and one more
NUM_BLOCKS = 4 * SLOTS


def bf16_model(cfg, seed: int) -> HybridModel:
    model = HybridModel(cfg).init_random(seed).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.to(torch.bfloat16).float())
    return model


@pytest.fixture(params=list(CONFIGS))
def model(request, seed):
    return bf16_model(CONFIGS[request.param], seed % 1000)


@pytest.fixture
def taken(monkeypatch):
    """Calls of each fused block kind, counted."""
    counts = {"moe": 0, "mamba": 0, "attention": 0}
    for name, cls in (("moe", fused.MoEBlock), ("mamba", fused.MambaBlock), ("attention", fused.AttentionBlock)):
        real = cls.__call__

        def counted(self, *a, _real=real, _name=name, **kw):
            counts[_name] += 1
            return _real(self, *a, **kw)
        monkeypatch.setattr(cls, "__call__", counted)
    return counts


def tables(seed: int) -> list[torch.Tensor]:
    """Each slot's KV blocks, scattered over the cache."""
    perm = torch.randperm(NUM_BLOCKS, generator=torch.Generator().manual_seed(seed))
    return [perm[s::SLOTS].contiguous() for s in range(SLOTS)]


def prefilled(model, seed: int, slots: list[int]):
    """A cache where each of `slots` holds a random prompt of PROMPT tokens (unfused path)."""
    g = torch.Generator().manual_seed(seed)
    cache = model.make_cache(num_blocks=NUM_BLOCKS, block_size=BS, num_slots=SLOTS, max_verify_positions=4)
    tbl = tables(seed)
    fused_blocks.ENABLED = False
    try:
        with torch.no_grad():
            for slot in slots:
                ids = torch.randint(3, model.cfg.vocab_size, (PROMPT,), generator=g)
                model(ids, BatchLayout([SeqSlice(0, PROMPT, 0, slot, tbl[slot])]), cache)
    finally:
        fused_blocks.ENABLED = True
    return cache, tbl


def both_ways(model, cache, ids, layout):
    """(hidden, cache) with the fused path on, and the same from a copy of the cache with it off."""
    other = copy.deepcopy(cache)
    with torch.no_grad():
        on = model(ids, layout, cache)
        fused_blocks.ENABLED = False
        try:
            off = model(ids, layout, other)
        finally:
            fused_blocks.ENABLED = True
    return (on, cache), (off, other)


def assert_same_caches(a, b):
    for i in a.mamba:
        assert torch.equal(a.mamba[i].conv, b.mamba[i].conv) and torch.equal(a.mamba[i].ssm, b.mamba[i].ssm)
        for x, y in zip(a.mamba[i].scratch, b.mamba[i].scratch):
            assert torch.equal(x, y)
        assert a.mamba[i].store.kept == b.mamba[i].store.kept
    for i in a.kv:
        assert torch.equal(a.kv[i].k, b.kv[i].k) and torch.equal(a.kv[i].v, b.kv[i].v)


def kinds(model) -> dict[str, int]:
    """Blocks of each fused kind in the model's layers (MTP not counted: these are plain passes)."""
    pattern = model.cfg.hybrid_override_pattern
    return {"moe": pattern.count("E"), "mamba": pattern.count("M"), "attention": pattern.count("*")}


@pytest.mark.parametrize("S", [1, 3, 8, 32, fused.MAX_ROWS])
def test_decode_steps_are_the_unfused_path_bit_for_bit(model, seed, taken, S):
    slots = torch.randperm(SLOTS, generator=torch.Generator().manual_seed(seed))[:S].tolist()
    cache, tbl = prefilled(model, seed, slots)
    ids = torch.randint(3, model.cfg.vocab_size, (S,), generator=torch.Generator().manual_seed(seed + 1))
    layout = BatchLayout([SeqSlice(i, 1, PROMPT, slot, tbl[slot]) for i, slot in enumerate(slots)])
    (on, c_on), (off, c_off) = both_ways(model, cache, ids, layout)
    assert torch.equal(on, off)
    assert_same_caches(c_on, c_off)
    assert taken == kinds(model)


@pytest.mark.parametrize("S,T", [(1, 4), (1, 2), (3, 2)])
def test_verification_passes_are_the_unfused_path_bit_for_bit(model, seed, taken, S, T):
    slots = torch.randperm(SLOTS, generator=torch.Generator().manual_seed(seed))[:S].tolist()
    cache, tbl = prefilled(model, seed, slots)
    ids = torch.randint(3, model.cfg.vocab_size, (S * T,), generator=torch.Generator().manual_seed(seed + 1))
    layout = BatchLayout([SeqSlice(i * T, T, PROMPT, slot, tbl[slot], keep_states=True)
                          for i, slot in enumerate(slots)])
    (on, c_on), (off, c_off) = both_ways(model, cache, ids, layout)
    assert torch.equal(on, off)
    assert_same_caches(c_on, c_off)             # the scratch the commit reads, and which slots hold it
    assert all(c_on.mamba[i].store.kept[s] == T for i in c_on.mamba for s in slots)
    assert taken == kinds(model)


def test_a_pass_of_decode_steps_and_verifications_fuses_each_length_bit_for_bit(model, seed, taken):
    """What an adaptive MTP step plans: most sequences decode, a few verify 1 or 2 drafts, interleaved.
    Mamba runs one fused call per length (rows gathered), with the unfused path's numbers and scratch."""
    slots = torch.randperm(SLOTS, generator=torch.Generator().manual_seed(seed))[:6].tolist()
    lengths = [1, 2, 1, 3, 1, 2]
    cache, tbl = prefilled(model, seed, slots)
    ids = torch.randint(3, model.cfg.vocab_size, (sum(lengths),), generator=torch.Generator().manual_seed(seed + 1))
    offsets = [sum(lengths[:i]) for i in range(len(lengths))]
    layout = BatchLayout([SeqSlice(o, n, PROMPT, slot, tbl[slot], keep_states=n > 1)
                          for o, n, slot in zip(offsets, lengths, slots)])
    (on, c_on), (off, c_off) = both_ways(model, cache, ids, layout)
    assert torch.equal(on, off)
    assert_same_caches(c_on, c_off)
    assert all(c_on.mamba[i].store.kept[s] == n for i in c_on.mamba for s, n in zip(slots, lengths) if n > 1)
    assert taken == dict(kinds(model), mamba=3 * kinds(model)["mamba"])     # three lengths: three calls a layer


def test_a_ragged_batch_fuses_its_attention_and_moe_but_not_its_mamba(model, seed, taken):
    """Chunks of 3, 1 and 2 tokens (a continued prompt, a decode step, a short chunk): attention takes them
    in one call, MoE does not care, Mamba runs the modules (not one layout)."""
    slots = [5, 1, 6]
    cache, tbl = prefilled(model, seed, slots)
    ids = torch.randint(3, model.cfg.vocab_size, (6,), generator=torch.Generator().manual_seed(seed + 1))
    layout = BatchLayout([SeqSlice(0, 3, PROMPT, 5, tbl[5]), SeqSlice(3, 1, PROMPT, 1, tbl[1]),
                          SeqSlice(4, 2, PROMPT, 6, tbl[6])])
    (on, c_on), (off, c_off) = both_ways(model, cache, ids, layout)
    assert torch.equal(on, off)
    assert_same_caches(c_on, c_off)
    assert taken == dict(kinds(model), mamba=0)


def test_it_follows_weights_changed_in_place(model, seed, taken):
    cache, tbl = prefilled(model, seed, [0])
    layout = BatchLayout([SeqSlice(0, 1, PROMPT, 0, tbl[0])])
    ids = torch.tensor([7])
    before, _ = both_ways(model, copy.deepcopy(cache), ids, layout)[0]
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.mul_(-2.0)                    # still exact bfloat16; bumps every version counter
    (on, _), (off, _) = both_ways(model, cache, ids, layout)
    assert torch.equal(on, off) and not torch.equal(on, before)


def test_where_it_does_not_apply_the_modules_run(model, seed, taken, monkeypatch):
    cache, tbl = prefilled(model, seed, list(range(fused.MAX_ROWS + 1)))
    ids = torch.randint(3, model.cfg.vocab_size, (fused.MAX_ROWS + 1,), generator=torch.Generator().manual_seed(seed))
    one = BatchLayout([SeqSlice(0, 1, PROMPT, 0, tbl[0])])

    def run(n, layout, grad=False):
        with torch.set_grad_enabled(grad):
            model(ids[:n], layout, copy.deepcopy(cache))
        return dict(taken)

    many = BatchLayout([SeqSlice(i, 1, PROMPT, i, tbl[i]) for i in range(fused.MAX_ROWS + 1)])
    assert run(fused.MAX_ROWS + 1, many) == dict.fromkeys(taken, 0)      # more rows than few-rows products
    assert run(1, one, grad=True) == dict.fromkeys(taken, 0)             # autograd
    monkeypatch.setenv(ops.ENV, "reference")                             # other kernels forced
    assert run(1, one) == dict.fromkeys(taken, 0)
    monkeypatch.delenv(ops.ENV)
    assert run(1, one) == kinds(model)                                   # (and it does apply here)
    with torch.no_grad():                                                # weights not exact bfloat16
        for p in model.parameters():
            if p.dim() >= 2:
                p.add_(1e-4)
    assert run(1, one) == kinds(model)                                   # no more calls than before


@pytest.mark.parametrize("S", [1, 4])
def test_decode_steps_match_the_reference_kernels(model, seed, monkeypatch, S):
    """Not only the unfused native path: the reference ops (float64-free torch) within float32 tolerance."""
    cache, tbl = prefilled(model, seed, list(range(S)))
    ids = torch.randint(3, model.cfg.vocab_size, (S,), generator=torch.Generator().manual_seed(seed))
    layout = BatchLayout([SeqSlice(i, 1, PROMPT, i, tbl[i]) for i in range(S)])
    ref_cache = copy.deepcopy(cache)
    with torch.no_grad():
        on = model(ids, layout, cache)
        monkeypatch.setenv(ops.ENV, "reference")
        ref = model(ids, layout, ref_cache)
    torch.testing.assert_close(on, ref, atol=2e-4, rtol=2e-4)


def test_greedy_generation_with_mtp_is_unchanged(model, seed):
    """End to end through model_shards.generate: decode steps, verification of 3 drafts, commits, MTP."""
    if model.mtp is None:
        pytest.skip("preset without an MTP block")
    prompt = torch.randint(3, model.cfg.vocab_size, (11,), generator=torch.Generator().manual_seed(seed)).tolist()
    params = SamplingParams(max_tokens=24, ignore_eos=True)
    outs = {}
    for on in (True, False):
        fused_blocks.ENABLED = on
        try:
            outs[on] = generate(model, prompt, params, num_drafts=3).tokens
        finally:
            fused_blocks.ENABLED = True
    assert outs[True] == outs[False]
