"""Structured outputs on the last stage (model_shards/grammar.py, model_shards/tail.py).

The specification: after output tokens o_1..o_m the tokens a request may sample are exactly those a fresh
llguidance matcher accepts after o_1..o_m (`reference_allowed`), its stop tokens only where the grammar
accepts, and only they once it is complete. Each verified row i is masked by the state after the
committed tokens + drafts[:i], each draft by the state after the tokens before it, so greedy decoding
gives the same tokens with and without MTP, random sampling follows the masked distribution, and the
output always matches the grammar. The state follows the sequence's settled tokens through rollbacks,
chunked prompts and recomputes after preemption.
"""
from __future__ import annotations

import asyncio
import json
import random
import re

import jsonschema
import llguidance
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kernels.reference.sampling import probs_from_logits
from model_shards import grammar, speculative
from model_shards.generate import generate
from model_shards.model import HybridModel
from model_shards.presets import get_preset
from model_shards.sampling_params import SamplingParams
from router.engine import AsyncEngine
from router.engine_config import EngineConfig
from tests.engine_helpers import collect
from tests.unit.test_rejection_sampling import assert_follows, collect as collect_verified, draw_drafts

PRESET = get_preset("tiny")
V, EOS = PRESET.vocab_size, PRESET.eos_token_id
TOK = grammar._tokenizer(None, V, EOS, PRESET.bos_token_id)        # the byte tokenizer: byte b is id b + 3
SCHEMA = {"type": "object", "properties": {"n": {"type": "integer", "minimum": -99, "maximum": 999}, "ok": {"type": "boolean"},
                                           "tag": {"enum": ["ab", "cd"]}}, "required": ["n", "ok", "tag"], "additionalProperties": False}
GRAMMARS = {
    "regex": llguidance.LLMatcher.grammar_from_regex(r"[ab]{1,5}c(de)?"),
    "json": llguidance.LLMatcher.grammar_from_json_schema({**SCHEMA, "x-guidance": grammar.JSON_OPTIONS}),
    "choice": llguidance.LLMatcher.grammar_from_lark('start: "yes" | "no" | "maybe"'),
}
STOPS = frozenset([EOS, 7])


def ids(text: str) -> list[int]:
    return [b + 3 for b in text.encode()]


def text(tokens: list[int]) -> str:
    return bytes(t - 3 for t in tokens if 3 <= t < 259).decode(errors="replace")


def reference_allowed(g: str, outputs: list[int], stops=STOPS) -> torch.Tensor:
    """(V,) bool from a fresh matcher, one token at a time: what `SeqGrammar.allowed` must give."""
    m = llguidance.LLMatcher(TOK, g)
    assert m.consume_tokens(outputs)
    out = torch.zeros(V, dtype=torch.bool)
    if not m.is_stopped():
        for t in range(V):
            if t not in stops and t != EOS and m.deep_copy().try_consume_tokens([t]) == 1:
                out[t] = True
    if m.is_accepting():
        out[sorted(stops)] = True
    return out


def walk(g: str, rng: random.Random, n: int) -> list[int]:
    """A random path of up to n grammatical tokens (stopping where only stop tokens remain)."""
    s, out = grammar.SeqGrammar(TOK, g, STOPS, V), []
    for _ in range(n):
        allowed = [t for t in s.allowed().nonzero()[:, 0].tolist() if t not in STOPS]
        if not allowed:
            break
        out.append(rng.choice(allowed))
        s.extend(out[-1:])
    return out


@settings(max_examples=15, deadline=None)
@given(name=st.sampled_from(list(GRAMMARS)), seed=st.integers(0, 2**32), cut=st.integers(0, 12))
def test_the_mask_is_exactly_what_the_grammar_allows_next(name, seed, cut):
    g = GRAMMARS[name]
    path = walk(g, random.Random(seed), 14)[:cut]
    s = grammar.SeqGrammar(TOK, g, STOPS, V)
    s.extend(path)
    assert torch.equal(s.allowed(), reference_allowed(g, path))


def test_stop_tokens_only_where_the_grammar_accepts_and_alone_once_it_is_complete():
    g = GRAMMARS["regex"]
    s = grammar.SeqGrammar(TOK, g, STOPS, V)
    s.extend(ids("ab"))
    assert not s.allowed()[sorted(STOPS)].any()               # "ab" is not a match yet
    s.extend(ids("c"))
    assert s.allowed()[sorted(STOPS)].all() and s.allowed()[ids("d")[0]]      # "abc" matches; "abcde" too
    s.extend(ids("de"))
    assert torch.equal(s.allowed().nonzero()[:, 0], torch.tensor(sorted(STOPS)))
    s.extend([EOS])                                            # the end: still only stop tokens
    assert torch.equal(s.allowed().nonzero()[:, 0], torch.tensor(sorted(STOPS)))
    # With no stop token at all (ignore_eos, no stop_token_ids), EOS still ends a complete output.
    bare = grammar.SeqGrammar(TOK, g, frozenset(), V)
    bare.extend(ids("abcde"))
    assert bare.allowed().nonzero()[:, 0].tolist() == [EOS]


@settings(max_examples=20, deadline=None)
@given(name=st.sampled_from(list(GRAMMARS)), seed=st.integers(0, 2**32),
       ops=st.lists(st.tuples(st.booleans(), st.integers(0, 6)), min_size=1, max_size=10))
def test_rollbacks_and_extensions_leave_the_state_of_the_tokens_kept(name, seed, ops):
    """Any mix of extend / truncate (verification rows, drafting, recompute) equals a fresh state built
    from the outputs kept, including tokens the grammar refuses (the output then ends)."""
    g, rng = GRAMMARS[name], random.Random(seed)
    path = walk(g, rng, 16) + [rng.randrange(V)]               # the last one may be refused
    s = grammar.SeqGrammar(TOK, g, STOPS, V)
    for grow, n in ops:
        if grow:
            s.extend(path[len(s.outputs):len(s.outputs) + n])
        else:
            s.truncate(max(len(s.outputs) - n, 0))
        fresh = grammar.SeqGrammar(TOK, g, STOPS, V)
        fresh.extend(s.outputs)
        assert torch.equal(s.allowed(), fresh.allowed()) and s.fed == fresh.fed


def test_row_masks_follow_the_drafts_and_leave_the_state_as_it_was():
    g = GRAMMARS["json"]
    s = grammar.SeqGrammar(TOK, g, STOPS, V)
    s.extend(ids('{"n":'))
    before = s.allowed()
    drafts = ids("12,") + ids("x")                             # "x" is refused after '12,': '"' must follow
    rows = s.row_masks(drafts)
    assert rows.shape == (len(drafts) + 1, V)
    for i in range(len(drafts)):
        assert torch.equal(rows[i], reference_allowed(g, ids('{"n":') + drafts[:i]))
    assert rows[-1].all()                                      # after a refused draft: unreachable, unmasked
    assert s.outputs == ids('{"n":') and torch.equal(s.allowed(), before)


def test_the_store_follows_settled_inputs_accepted_drafts_and_recomputes():
    g, prompt = GRAMMARS["json"], [9, 9, 9, 9]
    out = ids('{"n":42,"ok":true')
    store = grammar.GrammarStore()

    def make():
        return grammar.SeqGrammar(TOK, g, STOPS, V)

    def state(seq):
        return store.get(seq).allowed()

    store.sync(1, make, len(prompt), 0, prompt[:2])                      # a prompt chunk
    store.sync(1, make, len(prompt), 2, prompt[2:])                      # the final chunk samples out[0]
    store.sync(1, make, len(prompt), 4, out[:1])                         # decode: out[0] fed back
    store.get(1).extend(out[1:4])                                        # three drafts accepted
    store.sync(1, make, len(prompt), 8, out[4:5])                        # the bonus token fed back
    assert store.get(1).outputs == out[:5] and torch.equal(state(1), reference_allowed(g, out[:5]))
    store.sync(1, make, len(prompt), 0, prompt + out[:3])                # recomputed after a preemption
    assert store.get(1).outputs == out[:3] and torch.equal(state(1), reference_allowed(g, out[:3]))
    store.sync(2, make, len(prompt), 6, out[2:3])                        # a state it never saw: unmasked
    assert state(2).all()
    store.drop(1), store.drop(2)
    assert len(store) == 0


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**32), prompt_len=st.integers(1, 9), chunk=st.integers(1, 8),
       steps=st.lists(st.tuples(st.integers(0, 3), st.integers(0, 3), st.booleans()), min_size=1, max_size=8))
def test_the_store_matches_a_fresh_state_through_any_sequence_of_passes(seed, prompt_len, chunk, steps):
    """Passes as the engine sends them: a prompt in chunks, then decode passes verifying d drafts of which
    a are accepted, and recomputes after preemption (everything from position 0 again, in chunks). After
    each pass the store holds exactly the committed outputs, in the state a fresh matcher has after them."""
    g, rng = GRAMMARS["json"], random.Random(seed)
    path, prompt = walk(g, rng, 30), [rng.randrange(3, V) for _ in range(prompt_len)]
    store = grammar.GrammarStore()

    def make():
        return grammar.SeqGrammar(TOK, g, STOPS, V)

    def prefill(tokens):                          # chunks of prompt + outputs, from position 0
        for start in range(0, len(tokens), chunk):
            store.sync(0, make, prompt_len, start, tokens[start:start + chunk])
            assert store.get(0).outputs == tokens[prompt_len:start + chunk]     # what follows a pass is dropped

    prefill(prompt)
    m = 1                                         # the final chunk sampled path[0]
    for d, a, preempt in steps:
        if m >= len(path):
            break
        if preempt:                               # recompute prompt + outputs but the last (the next input)
            prefill(prompt + path[:m - 1])
        store.sync(0, make, prompt_len, prompt_len + m - 1, path[m - 1:m])
        st_ = store.get(0)
        assert st_.outputs == path[:m]
        assert torch.equal(st_.allowed(), reference_allowed(g, path[:m]))
        drafts = path[m:m + d]
        st_.row_masks(drafts)                     # verification leaves the state as it was
        a = min(a, len(drafts))
        st_.extend(drafts[:a])                    # accepted drafts, then the bonus token
        m += a + 1
    assert store.get(0).fed <= len(path)


def test_apply_masks_rows_and_never_leaves_a_row_without_a_token():
    logits = torch.tensor([[1.0, 2.0, 3.0, 4.0], [1.0, float("-inf"), 3.0, float("-inf")]])
    allowed = torch.tensor([[True, True, False, False], [False, True, False, True]])
    grammar.apply(logits, allowed)
    assert logits[0].tolist() == [1.0, 2.0, float("-inf"), float("-inf")]
    assert logits[1].tolist() == [float("-inf"), 0.0, float("-inf"), 0.0]     # allowed ones, equal logits


@pytest.fixture(scope="module")
def model() -> HybridModel:
    return HybridModel(PRESET).init_random(0).eval()


def _prompts(n, seed):
    rng = random.Random(seed)
    return [[rng.randrange(3, 250) for _ in range(rng.randrange(3, 30))] for _ in range(n)]


def _matches(name: str, out: str) -> bool:
    if name == "regex":
        return re.fullmatch(r"[ab]{1,5}c(de)?", out) is not None
    if name == "choice":
        return out in ("yes", "no", "maybe")
    jsonschema.validate(json.loads(out), SCHEMA)
    return True


@pytest.mark.parametrize("name", list(GRAMMARS))
def test_greedy_with_mtp_equals_mtp_off_and_the_output_matches(model, name):
    """The oracle (model_shards/generate.py, the tail the cluster runs) at k=3 and k=0, random prompts."""
    params = SamplingParams(max_tokens=60, stop_token_ids=(EOS,), grammar=GRAMMARS[name])
    seed, accepted = random.randrange(2**32), 0
    for prompt in _prompts(3, seed):
        off = generate(model, prompt, params, num_drafts=0)
        on = generate(model, prompt, params, num_drafts=3)
        assert on.tokens == off.tokens, seed
        assert off.finish_reason == "stop" and off.tokens[-1] == EOS and _matches(name, text(off.tokens[:-1]))
        accepted += on.num_accepted
    # Drafts follow the grammar too: where it forces the next tokens (JSON keys, "es" after "y") a random
    # model's drafts are accepted.
    assert accepted > 0 or name == "regex", seed


def test_random_sampling_with_mtp_matches_the_grammar(model):
    base = random.randrange(2**32)
    params = [SamplingParams(temperature=1.0, seed=base + i, max_tokens=60, stop_token_ids=(EOS,),
                             grammar=GRAMMARS["json"]) for i in range(6)]
    accepted = 0
    for p, prompt in zip(params, _prompts(len(params), seed=base)):
        out = generate(model, prompt, p, num_drafts=3)
        assert out.finish_reason == "stop" and _matches("json", text(out.tokens[:-1]))
        assert out.tokens == generate(model, prompt, p, num_drafts=3).tokens       # seeded: reproducible
        accepted += out.num_accepted
    assert accepted > 0


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_every_draft_follows_the_grammar(model, monkeypatch, temperature):
    """Each pass's drafts continue its output grammatically, and with random sampling each draft's
    distribution q (kept for verification) has no mass outside the grammar (spies on the oracle's
    run_tail and on DraftStore.put)."""
    import model_shards.generate as oracle
    from model_shards.tail import DraftStore
    passes, real, real_put, qs = [], oracle.run_tail, DraftStore.put, []

    def spy(*args, **kwargs):
        qs.clear()
        res = real(*args, **kwargs)
        passes.append((list(res[0].new_tokens), list(res[0].drafts), qs[0] if qs else None))
        return res

    def put(self, seq_id, q):
        qs.append(q)
        return real_put(self, seq_id, q)

    monkeypatch.setattr(oracle, "run_tail", spy)
    monkeypatch.setattr(DraftStore, "put", put)
    base, checked = random.randrange(2**32), 0
    for i, prompt in enumerate(_prompts(4, base)):
        params = SamplingParams(temperature=temperature, seed=base + i, max_tokens=60, stop_token_ids=(EOS,),
                                grammar=GRAMMARS["json"])
        passes.clear()
        generate(model, prompt, params, num_drafts=3)
        outputs = []
        for new, drafts, q in passes:
            outputs += new
            seq = outputs + drafts
            seq = seq[:seq.index(EOS)] if EOS in seq else seq
            assert llguidance.LLMatcher(TOK, GRAMMARS["json"]).try_consume_tokens(seq) == len(seq), base
            checked += len(drafts)
            assert (q is None) == (temperature == 0 or not drafts)
            for j in range(len(drafts) if q is not None and EOS not in outputs else 0):
                outside = ~reference_allowed(GRAMMARS["json"], outputs + drafts[:j])
                assert float(q[j][outside].sum()) == 0.0, base
    assert checked > 0


def test_random_verification_follows_the_masked_target_distribution():
    """What run_tail does for a grammar row: mask the target and draft logits, then rejection-sample.
    The emitted token follows the masked target, even with drafts from the masked draft distribution."""
    vocab, n = 8, 20_000
    g = torch.Generator().manual_seed(random.randrange(2**32))
    allowed = torch.tensor([[True, False, True, True, False, True, False, True]] * 2)
    raw = 1.5 * torch.randn(2, vocab, generator=g)
    params = SamplingParams(temperature=0.9)
    q = probs_from_logits(grammar.apply(torch.randn(1, vocab, generator=g), allowed[:1]), params.temperature)
    drafts = draw_drafts(q, n, seed=int(torch.randint(2**31, (1,), generator=g)))
    target = probs_from_logits(grammar.apply(raw.clone(), allowed)[:1], params.temperature)[0]
    gen = torch.Generator().manual_seed(5)

    def verify(d):
        return speculative.verify(grammar.apply(raw.clone(), allowed), d.tolist(), q, params, gen)

    first, _, _ = collect_verified(verify, drafts)
    assert not (~allowed[0])[first].any()
    assert_follows(first, target, "first token")


def test_the_engine_with_mtp_preemption_and_batching_equals_the_oracle(preset_cache):
    """Through scheduler, stage worker and a tight KV cache (preemption by recompute): grammar and plain
    requests batched together, k=3 and k=0, each equal to the oracle's MTP-off tokens."""
    engine = AsyncEngine(EngineConfig(model="tiny", num_speculative_tokens=3, speculative_policy="fixed",
                                      num_kv_blocks=12, block_size=8, max_num_seqs=4, max_model_len=96,
                                      max_num_batched_tokens=32))
    m = engine.executor.worker.model
    names = list(GRAMMARS) + ["json"]
    cases = [SamplingParams(max_tokens=50, stop_token_ids=(EOS,), grammar=GRAMMARS[nm]) for nm in names]
    cases.append(SamplingParams(max_tokens=30, ignore_eos=True))
    prompts = _prompts(len(cases), seed=random.randrange(2**32))

    async def scenario():
        await engine.start()
        try:
            out = await asyncio.gather(*[collect(engine, f"r{i}", p, c, k=3 * (i % 2))
                                         for i, (p, c) in enumerate(zip(prompts, cases))])
            await collect(engine, "after", [3, 4], SamplingParams(max_tokens=2))   # its plans carry the releases
            return out
        finally:
            await engine.shutdown()

    results = asyncio.run(scenario())
    assert engine.scheduler.num_preemptions > 0
    for (p, c), (tokens, _) in zip(zip(prompts, cases), results):
        assert tokens == generate(m, p, c, num_drafts=0).tokens
    for name, (tokens, reason) in zip(names, results):
        assert reason == "stop" and _matches(name, text(tokens[:-1]))
    assert len(engine.executor.worker.store.grammars) == 0         # dropped with their sequences
