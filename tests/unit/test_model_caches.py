"""The hybrid model's caches keep every way of feeding tokens equivalent (fp32, small presets).

Rules: incremental decoding == one full forward; chunked prefill == unchunked (logits, Mamba states,
KV); a verification pass followed by commit(j) leaves exactly the state of plain decoding of j+1
tokens; a ragged batch == each sequence alone; MTP drafting and chunking never change greedy output.

The Mamba decay is slowed (A in [-1, -0.05]) on top of the random weights so that the recurrent state
reaches across many positions and chunks: losing it moves the logits far above LOGIT_TOL (checked by
test_the_caches_carry_information_between_passes).
"""
from __future__ import annotations

import copy
import math

import pytest
import torch

from kernels.reference.attention import gather_kv
from model_shards import tail
from model_shards.batch import BatchLayout, SeqSlice
from model_shards.generate import generate
from model_shards.model import HybridModel
from model_shards.presets import get_preset
from model_shards.sampling_params import SamplingParams

LOGIT_TOL = dict(atol=1e-4, rtol=1e-4)     # fp32 logits (std ~1) across different paths
STATE_TOL = dict(atol=3e-5, rtol=1e-4)     # fp32 Mamba conv/SSM states and KV entries
BLOCK = 4                                  # small KV blocks: sequences span many of them
NUM_BLOCKS = 48

CONFIGS = {
    "tiny": get_preset("tiny"),
    "tiny-nolatent-g1": get_preset("tiny").replace(name="tiny-nolatent-g1", moe_latent_size=None, n_groups=1),
}


def build(cfg, seed: int = 0) -> HybridModel:
    model = HybridModel(cfg).init_random(seed).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("A_log"):
                p.copy_(torch.empty(p.shape).uniform_(-3.0, 0.0, generator=g))
    return model


@pytest.fixture(scope="module", params=list(CONFIGS))
def model(request) -> HybridModel:
    return build(CONFIGS[request.param])


@pytest.fixture(scope="module")
def tiny() -> HybridModel:
    return build(CONFIGS["tiny"])


def tokens(n: int, seed: int, vocab: int) -> torch.Tensor:
    return torch.randint(3, vocab, (n,), generator=torch.Generator().manual_seed(seed))


def shuffled_table(seed: int, n: int = NUM_BLOCKS) -> torch.Tensor:
    return torch.randperm(NUM_BLOCKS, generator=torch.Generator().manual_seed(seed))[:n]


def new_cache(model: HybridModel, max_verify: int = 6, slots: int = 4):
    return model.make_cache(num_blocks=NUM_BLOCKS, block_size=BLOCK, num_slots=slots,
                            max_verify_positions=max_verify)


@torch.no_grad()
def run(model, cache, ids, start, table, *, slot=0, keep_states=False) -> torch.Tensor:
    """One pass of one sequence; logits (len(ids), V)."""
    layout = BatchLayout.single(len(ids), start, table, mamba_slot=slot, keep_states=keep_states)
    return model.logits(model(ids, layout, cache))


def mamba_states(cache, slot: int = 0) -> dict:
    return {i: (c.conv[slot].clone(), c.ssm[slot].clone()) for i, c in cache.mamba.items()}


def kv_contents(cache, table, length: int) -> dict:
    return {i: gather_kv(c.k, c.v, table, length) for i, c in cache.kv.items() if i != "mtp"}


def assert_same_states(a: dict, b: dict) -> None:
    assert a.keys() == b.keys() and a
    for i in a:
        for x, y in zip(a[i], b[i]):
            torch.testing.assert_close(x, y, **STATE_TOL, msg=lambda m: f"layer {i}: {m}")


def assert_pieces_equal_whole(model, T, *, seed, table_seed, starts):
    """Running T tokens as pieces starting at `starts` (through one cache) gives the logits, Mamba
    states and KV of one pass over all T tokens."""
    ids, table = tokens(T, seed, model.cfg.vocab_size), shuffled_table(table_seed)
    whole_cache = new_cache(model)
    whole = run(model, whole_cache, ids, 0, table)
    cache = new_cache(model)
    ends = starts[1:] + [T]
    parts = [run(model, cache, ids[a:b], a, table) for a, b in zip(starts, ends)]
    torch.testing.assert_close(torch.cat(parts), whole, **LOGIT_TOL)
    assert_same_states(mamba_states(cache), mamba_states(whole_cache))
    assert_same_states(kv_contents(cache, table, T), kv_contents(whole_cache, table, T))


# ---- incremental decoding and chunked prefill ---------------------------------------------------------

@pytest.mark.parametrize("t", [1, 5, 8, 13])
def test_prefill_then_one_token_steps_equals_one_full_forward(model, t):
    T = 21
    assert_pieces_equal_whole(model, T, seed=1, table_seed=2, starts=[0] + list(range(t, T)))


@pytest.mark.parametrize("chunk", [1, 3, 5, 8, 11, 16])
def test_chunked_prefill_equals_unchunked(model, chunk):
    """Chunks of any size, multiples of the SSD chunk_size (8) or not: same logits, states and KV."""
    T = 29
    assert_pieces_equal_whole(model, T, seed=3, table_seed=4, starts=list(range(0, T, chunk)))


def test_the_caches_carry_information_between_passes(tiny):
    """Control for the tests above: a second chunk run on a fresh cache gives other logits."""
    ids, table = tokens(20, 5, tiny.cfg.vocab_size), shuffled_table(6)
    cache = new_cache(tiny)
    run(tiny, cache, ids[:10], 0, table)
    with_state = run(tiny, cache, ids[10:], 10, table)
    fresh = new_cache(tiny)
    fresh.kv = cache.kv                        # same KV, Mamba state lost
    without = run(tiny, fresh, ids[10:], 10, table)
    assert (with_state - without).abs().max() > 100 * LOGIT_TOL["atol"]


# ---- verification and commit --------------------------------------------------------------------------------

@pytest.mark.parametrize("prefix", [0, 1, 11])
@pytest.mark.parametrize("k", [1, 4])
def test_commit_after_verification_equals_plain_decoding_of_the_accepted_tokens(model, prefix, k):
    """A pass over [last token + k drafts] with keep_states, then commit(slot, j), for every j in 0..k:
    Mamba states == decoding those j+1 tokens one by one, KV up to the accepted position equal, and the
    next token's logits equal (entries past the accepted position are overwritten, never read)."""
    vocab = model.cfg.vocab_size
    ids, table, slot = tokens(prefix + k + 2, 7, vocab), shuffled_table(8), 2
    base = new_cache(model, max_verify=k + 1)
    if prefix:
        run(model, base, ids[:prefix], 0, table, slot=slot)
    verify_ids, nxt = ids[prefix:prefix + k + 1], ids[prefix + k + 1:]
    for j in range(k + 1):
        spec = copy.deepcopy(base)
        verify_logits = run(model, spec, verify_ids, prefix, table, slot=slot, keep_states=True)
        spec.commit(slot, j)
        plain = copy.deepcopy(base)
        plain_logits = torch.cat([run(model, plain, verify_ids[i:i + 1], prefix + i, table, slot=slot)
                                  for i in range(j + 1)])
        torch.testing.assert_close(verify_logits[:j + 1], plain_logits, **LOGIT_TOL)
        assert_same_states(mamba_states(spec, slot), mamba_states(plain, slot))
        n = prefix + j + 1
        assert_same_states(kv_contents(spec, table, n), kv_contents(plain, table, n))
        pos = prefix + j + 1
        torch.testing.assert_close(run(model, spec, nxt, pos, table, slot=slot),
                                   run(model, plain, nxt, pos, table, slot=slot), **LOGIT_TOL)


def test_verification_pass_leaves_the_committed_state_alone_until_commit(tiny):
    ids, table = tokens(12, 9, tiny.cfg.vocab_size), shuffled_table(10)
    cache = new_cache(tiny)
    run(tiny, cache, ids[:8], 0, table)
    before = mamba_states(cache)
    run(tiny, cache, ids[8:], 8, table, keep_states=True)
    assert_same_states(mamba_states(cache), before)
    cache.commit(0, 3)
    with pytest.raises(AssertionError):
        assert_same_states(mamba_states(cache), before)


# ---- ragged batches ---------------------------------------------------------------------------------------

def test_ragged_batch_equals_each_sequence_alone(model):
    """Four sequences in one flat batch (fresh prefill, decode, verification, mid-prompt chunk) with their
    own slots, interleaved shuffled block tables and different start positions."""
    vocab = model.cfg.vocab_size
    perm = shuffled_table(11)
    tables = [perm[i::4] for i in range(4)]                          # 12 blocks each, interleaved
    # (slot, cached prefix length, tokens in this pass, keep_states)
    plan = [(2, 0, 7, False), (0, 5, 1, False), (3, 12, 4, True), (1, 9, 6, False)]
    seqs_ids = [tokens(pre + n, 20 + i, vocab) for i, (_, pre, n, _) in enumerate(plan)]
    cache = new_cache(model)
    for (slot, pre, _, _), ids, table in zip(plan, seqs_ids, tables):
        if pre:
            run(model, cache, ids[:pre], 0, table, slot=slot)
    alone_cache = copy.deepcopy(cache)

    layout, flat, offset = [], [], 0
    for (slot, pre, n, keep), ids, table in zip(plan, seqs_ids, tables):
        layout.append(SeqSlice(offset, n, pre, slot, table, keep))
        flat.append(ids[pre:])
        offset += n
    with torch.no_grad():
        batched = model.logits(model(torch.cat(flat), BatchLayout(layout), cache))

    for s, (slot, pre, n, keep), ids, table in zip(layout, plan, seqs_ids, tables):
        alone = run(model, alone_cache, ids[pre:], pre, table, slot=slot, keep_states=keep)
        torch.testing.assert_close(batched[s.offset:s.end], alone, **LOGIT_TOL)
        if keep:
            cache.commit(slot, n - 1)
            alone_cache.commit(slot, n - 1)
        assert_same_states(mamba_states(cache, slot), mamba_states(alone_cache, slot))
        assert_same_states(kv_contents(cache, table, pre + n), kv_contents(alone_cache, table, pre + n))


@pytest.mark.parametrize("step_slots", [[0, 1, 2, 3], [2, 0, 3, 1], [0, 3, 5], [6, 0]],
                         ids=["dense-in-order", "dense-permuted", "range-with-holes", "sparse"])
def test_batched_decode_steps_equal_each_sequence_alone_for_every_slot_layout(model, step_slots):
    """One decode token of several sequences in one pass: the Mamba update runs in place on the slot range
    (in batch order, permuted, or with holes) or gathers (sparse slots); every way gives each sequence
    what it gets alone, and a slot inside the range that is not stepping keeps its state bit for bit."""
    vocab, slots = model.cfg.vocab_size, 8
    perm = shuffled_table(5)
    tables = {slot: perm[slot::slots] for slot in range(slots)}      # 6 blocks each
    ids = {slot: tokens(9, 40 + slot, vocab) for slot in range(slots)}
    cache = new_cache(model, slots=slots)
    for slot in range(slots):                                        # every slot holds a prompt of 8
        run(model, cache, ids[slot][:8], 0, tables[slot], slot=slot)
    alone_cache = copy.deepcopy(cache)
    before = {slot: mamba_states(cache, slot) for slot in range(slots)}
    layout = BatchLayout([SeqSlice(n, 1, 8, slot, tables[slot]) for n, slot in enumerate(step_slots)])
    with torch.no_grad():
        batched = model.logits(model(torch.stack([ids[slot][8] for slot in step_slots]), layout, cache))
    for n, slot in enumerate(step_slots):
        alone = run(model, alone_cache, ids[slot][8:], 8, tables[slot], slot=slot)
        torch.testing.assert_close(batched[n:n + 1], alone, **LOGIT_TOL)
        assert_same_states(mamba_states(cache, slot), mamba_states(alone_cache, slot))
    for slot in set(range(slots)) - set(step_slots):
        for i, (conv, ssm) in mamba_states(cache, slot).items():
            assert torch.equal(conv, before[slot][i][0]) and torch.equal(ssm, before[slot][i][1]), (slot, i)


# ---- generation with MTP drafts ---------------------------------------------------------------------------------

PROMPT_LEN, MAX_TOKENS = 13, 12


def prompt_of(model, seed: int = 30) -> list[int]:
    return tokens(PROMPT_LEN, seed, model.cfg.vocab_size).tolist()


@pytest.fixture(scope="module")
def greedy_reference(model):
    """Greedy tokens without drafts, long enough to serve as an oracle continuation too."""
    return generate(model, prompt_of(model), SamplingParams(max_tokens=MAX_TOKENS + 12, ignore_eos=True)).tokens


def with_drafter(model: HybridModel, dtype: torch.dtype, vocab_fraction: float = 1.0) -> HybridModel:
    """A copy of `model` that drafts in `dtype` from the first `vocab_fraction` of a fixed random
    permutation of its vocabulary (model_shards/drafter.py)."""
    if dtype == torch.float32 and vocab_fraction == 1.0:
        return model
    V = model.cfg.vocab_size
    vocab = None if vocab_fraction == 1.0 else torch.randperm(V, generator=torch.Generator().manual_seed(3))[:int(V * vocab_fraction)]
    other = copy.deepcopy(model)
    other.configure_drafting(dtype=dtype, vocab=vocab)
    return other


@pytest.mark.parametrize("draft_dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("prefill_chunk", [None, 5])
@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_mtp_drafting_does_not_change_greedy_tokens(model, greedy_reference, k, prefill_chunk, draft_dtype):
    out = generate(with_drafter(model, draft_dtype), prompt_of(model),
                   SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True), num_drafts=k, prefill_chunk=prefill_chunk)
    assert out.tokens == greedy_reference[:MAX_TOKENS]
    assert out.num_drafted > 0 and out.finish_reason == "length"


def mtp_after_prefix(model: HybridModel, ids: torch.Tensor, **kwargs):
    """The model over ids[:-1] in a fresh cache, then one MTP call over every (h_t, ids[t+1]) pair."""
    n, table = len(ids) - 1, torch.arange(NUM_BLOCKS)
    cache = new_cache(model)
    with torch.no_grad():
        h = model(ids[:n], BatchLayout.single(n, 0, table), cache)
        return model.mtp_forward(ids[1:], model.mtp_hidden_input(h), BatchLayout.single(n, 0, table), cache, **kwargs)


def test_a_float16_drafter_computes_the_float32_drafts_to_float16_precision(tiny):
    """Same inputs through the MTP block in float32 and in float16 (with lm_head copied to float16): the
    draft logits agree to float16 precision, and the model's own (verification) head is untouched."""
    half = with_drafter(tiny, torch.float16)
    assert half.draft_dtype == torch.float16 and half.lm_head.weight.dtype == torch.float32
    ids = tokens(10, 5, tiny.cfg.vocab_size)
    (h32, l32), (h16, l16) = [mtp_after_prefix(m, ids, logit_rows=[8, 6]) for m in (tiny, half)]
    assert h16.dtype == torch.float16 and l16.dtype == torch.float32 and l16.shape == (2, tiny.cfg.vocab_size)
    torch.testing.assert_close(l16, l32, atol=2e-2 * float(l32.abs().max()), rtol=2e-2)
    torch.testing.assert_close(h16.float(), h32, atol=2e-2 * float(h32.abs().max()), rtol=2e-2)


@pytest.mark.parametrize("draft_dtype", [torch.float32, torch.float16])
def test_a_draft_vocabulary_keeps_greedy_tokens_and_drafts_only_its_tokens(model, greedy_reference, monkeypatch,
                                                                          draft_dtype):
    """Drafts restricted to half the vocabulary (a random half, so that many greedy tokens fall outside it):
    every draft is in it, its logits equal the full head's there (-inf elsewhere), outputs do not change."""
    m = with_drafter(model, draft_dtype, vocab_fraction=0.5)
    allowed = set(m.drafter.vocab.tolist())
    real, drafts = tail._mtp_draft, []

    def spy(model_, cache, h, batch, reqs, results, store):
        real(model_, cache, h, batch, reqs, results, store)
        drafts.extend(d for res in results for d in res.drafts)

    monkeypatch.setattr(tail, "_mtp_draft", spy)
    out = generate(m, prompt_of(model), SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True), num_drafts=3)
    assert out.tokens == greedy_reference[:MAX_TOKENS]
    assert drafts and set(drafts) <= allowed
    ids = tokens(8, 9, model.cfg.vocab_size)
    logits = [mtp_after_prefix(mm, ids)[1] for mm in (m, with_drafter(model, draft_dtype))]
    inside = m.drafter.vocab
    torch.testing.assert_close(logits[0][:, inside], logits[1][:, inside])
    outside = torch.ones(model.cfg.vocab_size, dtype=torch.bool)
    outside[inside] = False
    assert torch.all(logits[0][:, outside] == float("-inf"))


@pytest.mark.parametrize("draft_dtype", [torch.float32, torch.float16])
def test_rows_that_sample_get_every_tokens_logit_despite_a_draft_vocabulary(tiny, draft_dtype):
    """Random sampling drafts from the whole vocabulary (a restricted q costs acceptance); greedy rows of
    the same call stay restricted."""
    m, full = with_drafter(tiny, draft_dtype, vocab_fraction=0.5), with_drafter(tiny, draft_dtype)
    ids = tokens(7, 11, tiny.cfg.vocab_size)
    restricted, everything = [mtp_after_prefix(mm, ids, logit_rows=[1, 3, 5], full_vocab_rows=[0, 2])[1]
                              for mm in (m, full)]
    torch.testing.assert_close(restricted[[0, 2]], everything[[0, 2]])
    assert torch.isfinite(restricted[[0, 2]]).all()
    assert (restricted[1] == float("-inf")).sum() == tiny.cfg.vocab_size - len(m.drafter.vocab)


def test_a_drafter_with_a_row_limit_leaves_larger_mtp_calls_to_the_model_dtype(tiny):
    """auto on a CPU: float16 for the few-row calls of one or a few sequences, float32 above the limit
    (the CPU's float16 GEMM loses with many rows)."""
    m = copy.deepcopy(tiny)
    m.configure_drafting(dtype=torch.float16, max_rows=4)
    table = torch.arange(NUM_BLOCKS)
    cache = new_cache(m)
    with torch.no_grad():
        h = m(tokens(9, 6, m.cfg.vocab_size), BatchLayout.single(9, 0, table), cache)
        big, _ = m.mtp_forward(tokens(9, 7, m.cfg.vocab_size), h, BatchLayout.single(9, 0, table), cache)
        small, _ = m.mtp_forward(tokens(1, 8, m.cfg.vocab_size), big[-1:], BatchLayout.single(1, 9, table), cache)
    assert big.dtype == torch.float32 and small.dtype == torch.float16
    assert m.mtp.layers[0].eh_proj.weight.dtype == torch.float32        # the model's block is untouched


@pytest.mark.parametrize("prefill_chunk", [3, 8])
def test_chunked_prefill_does_not_change_greedy_tokens(model, greedy_reference, prefill_chunk):
    out = generate(model, prompt_of(model), SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True),
                   prefill_chunk=prefill_chunk)
    assert out.tokens == greedy_reference[:MAX_TOKENS]


@pytest.mark.parametrize("k", [0, 2])
def test_seeded_sampling_is_reproducible(tiny, k):
    params = SamplingParams(temperature=0.8, top_p=0.95, seed=1234, max_tokens=MAX_TOKENS, ignore_eos=True)
    a = generate(tiny, prompt_of(tiny), params, num_drafts=k)
    b = generate(tiny, prompt_of(tiny), params, num_drafts=k, prefill_chunk=4)
    other = generate(tiny, prompt_of(tiny), SamplingParams(**{**params.to_dict(), "seed": 99}), num_drafts=k)
    assert a.tokens == b.tokens and len(a.tokens) == MAX_TOKENS
    assert other.tokens != a.tokens


def oracle_drafter(continuation: list[int], *, corrupt_cycle: bool = False, accepted: list | None = None):
    """A stand-in for the MTP drafter that proposes the true greedy continuation. With corrupt_cycle, the
    n-th drafting corrupts draft n % (k+1) (none when that is k), so verification accepts 0, 1, .., k in
    turn. `accepted` collects each verification's accepted count."""
    calls = [0]

    def draft(model, cache, h, batch, reqs, results, store):
        for s, r, res in zip(batch.seqs, reqs, results):
            if not r.sample or r.num_drafts <= 0:
                continue
            if r.drafts and accepted is not None:
                accepted.append(res.num_accepted)
            committed = s.start_pos + s.num_tokens - len(r.drafts) + len(res.new_tokens)
            d = list(continuation[committed:committed + r.num_drafts])
            bad = calls[0] % (r.num_drafts + 1)
            if corrupt_cycle and bad < len(d):
                d[bad] = (d[bad] + 1) % model.cfg.vocab_size
            calls[0] += 1
            res.drafts = d
            store.put(r.seq_id, None)
    return draft


@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_correct_drafts_are_all_accepted_and_generation_continues_identically(
        model, greedy_reference, monkeypatch, k):
    prompt = prompt_of(model)
    monkeypatch.setattr(tail, "_mtp_draft", oracle_drafter(prompt + greedy_reference))
    out = generate(model, prompt, SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True), num_drafts=k)
    assert out.tokens == greedy_reference[:MAX_TOKENS]
    assert out.num_drafted > 0 and out.num_accepted == out.num_drafted
    assert out.passes == math.ceil((MAX_TOKENS - 1) / (k + 1))


@pytest.mark.parametrize("k", [2, 4])
def test_partly_correct_drafts_commit_every_accepted_length(model, greedy_reference, monkeypatch, k):
    """Verification accepts 0, 1, .., k drafts in turn (every commit(j) path): the same tokens."""
    prompt, accepted = prompt_of(model), []
    monkeypatch.setattr(tail, "_mtp_draft",
                        oracle_drafter(prompt + greedy_reference, corrupt_cycle=True, accepted=accepted))
    n = len(greedy_reference) - 2 * k
    out = generate(model, prompt, SamplingParams(max_tokens=n, ignore_eos=True), num_drafts=k)
    assert out.tokens == greedy_reference[:n]
    assert set(accepted) == set(range(k + 1))


@torch.no_grad()
def recomputed_drafts(model, history: list[int], k: int) -> list[int]:
    """Greedy MTP drafts after `history` from scratch: the main model over history[:-1], the MTP block over
    every (h_t, token_t+1) pair at once, then k recursive steps on its own output."""
    n = len(history) - 1
    table = torch.arange(NUM_BLOCKS)
    cache = new_cache(model)
    h = model(torch.tensor(history[:-1]), BatchLayout.single(n, 0, table), cache)
    h_mtp, logits = model.mtp_forward(torch.tensor(history[1:]), model.mtp_hidden_input(h),
                                      BatchLayout.single(n, 0, table), cache)
    drafts, cur_h, cur_logits = [], h_mtp[-1:], logits[-1:]
    for step in range(k):
        drafts.append(int(cur_logits[0].argmax()))
        if step + 1 < k:
            cur_h, cur_logits = model.mtp_forward(torch.tensor(drafts[-1:]), cur_h,
                                                  BatchLayout.single(1, n + step, table), cache)
    return drafts


@pytest.mark.parametrize("prefill_chunk", [None, 3, 8])
@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("draft_dtype", [torch.float32, torch.float16])
def test_mtp_drafts_at_every_pass_equal_a_direct_recomputation(model, greedy_reference, monkeypatch, k,
                                                                prefill_chunk, draft_dtype):
    """The MTP block's incremental KV cache (fed across prefill chunks and after 0..k accepted drafts) gives
    the drafts a from-scratch MTP pass over the committed history gives. The real drafter runs and is
    recorded; its drafts are then replaced by oracle ones so that some passes accept several."""
    model = with_drafter(model, draft_dtype)
    prompt = prompt_of(model)
    real, oracle = tail._mtp_draft, oracle_drafter(prompt + greedy_reference, corrupt_cycle=True)
    records = []

    def spy(model_, cache, h, batch, reqs, results, store):
        real(model_, cache, h, batch, reqs, results, store)
        s, r, res = batch.seqs[0], reqs[0], results[0]
        if r.sample:
            records.append((s.start_pos + s.num_tokens - len(r.drafts) + len(res.new_tokens), list(res.drafts)))
        oracle(model_, cache, h, batch, reqs, results, store)

    monkeypatch.setattr(tail, "_mtp_draft", spy)
    out = generate(model, prompt, SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True), num_drafts=k,
                   prefill_chunk=prefill_chunk)
    assert out.tokens == greedy_reference[:MAX_TOKENS] and out.num_accepted > 0 and len(records) > 2
    history = prompt + out.tokens
    for committed, drafts in records:
        assert drafts == recomputed_drafts(model, history[:committed], k), f"after {committed} tokens"


def test_commit_of_many_sequences_in_place_equals_the_gathered_batched_commit():
    """The CPU commit (per sequence, in place) and the GPU one (slots gathered, one ssd_state_at, scattered
    back) give the same states, conv windows and nothing else changes; fresh random scratch, no zeros."""
    from model_shards.cache import MambaStateCache

    cfg = get_preset("tiny")
    seed = torch.seed() % 10_000
    caches = []
    for _ in range(2):
        g = torch.Generator().manual_seed(seed)
        c = MambaStateCache(cfg, num_layers=3, num_slots=12, max_positions=4)
        for t in (c.ssm, c.conv, c.scratch_conv, c.scratch_dtx, c.scratch_B):
            t.copy_(torch.rand(t.shape, generator=g) + 0.1)
        c.scratch_cum.copy_(-(torch.rand(c.scratch_cum.shape, generator=g) + 0.05).cumsum(-1))
        caches.append(c)
    slots, indices = [7, 2, 9, 3, 10], [0, 3, 1, 2, 3]
    for c in caches:
        for s in slots:
            c.kept[s] = 4
    caches[0].commit(slots, indices)
    caches[1]._commit_gathered(slots, indices)
    torch.testing.assert_close(caches[0].ssm, caches[1].ssm, atol=1e-6, rtol=1e-5)
    assert torch.equal(caches[0].conv, caches[1].conv)
    assert caches[0].kept[7] == 0
