"""The MTP block runs for a sequence only when it drafts; the passes in between stash their settled pairs on
the last stage (model_shards/tail.py: DraftStore.stash), and the next drafting pass feeds them first.

Specification: a sequence that skipped the block for several passes and then drafts gets the very drafts,
and the MTP attention cache the very entries, of a sequence that fed the block every pass; the stash
is bounded, and a stash that does not end where the next pass begins (a recomputed sequence) is dropped.
"""
from __future__ import annotations

import torch

from cluster.worker import StageWorker
from model_shards.sampling_params import SamplingParams
from model_shards.tail import MAX_STASHED, DraftStore
from model_shards.weights import load_checkpoint
from cluster.contracts import SeqStep, StepPlan
from router.engine_config import resolve_checkpoint

BLOCK = 16
PROMPT = [1, 475, 285, 302, 14, 295, 32, 300, 475, 285, 302]


def _worker(model, draft_dtype: str = "auto") -> StageWorker:
    return StageWorker(model, num_blocks=16, block_size=BLOCK, num_slots=2, max_verify_positions=4,
                       draft_dtype=draft_dtype)


def _step(step_id: int, ids: list[int], pos: int, *, drafts=(), num_drafts=0, context=False, stash=False) -> StepPlan:
    s = SeqStep(0, list(ids) + list(drafts), pos, 0, list(range(8)), drafts=list(drafts),
                params=SamplingParams(max_tokens=64, ignore_eos=True).to_dict(), num_drafts=num_drafts,
                prompt_len=len(PROMPT), mtp_context=context, mtp_stash=stash)
    return StepPlan(step_id, 0, [s])


def _run(worker: StageWorker, mode: str, decode_passes: int):
    """Prompt, `decode_passes` one-token passes without drafts (the block fed every pass, or stashing), then
    a pass that proposes 3 drafts. Returns the tokens, the drafts and the MTP cache's k rows written."""
    fed = mode == "fed"
    out = worker.execute(_step(0, PROMPT, 0, context=fed, stash=not fed)).outputs[0]
    tokens, pos = list(out.new_tokens), len(PROMPT)
    for i in range(decode_passes):
        out = worker.execute(_step(1 + i, tokens[-1:], pos, context=fed, stash=not fed)).outputs[0]
        tokens += out.new_tokens
        pos += 1
    out = worker.execute(_step(99, tokens[-1:], pos, num_drafts=3)).outputs[0]
    tokens += out.new_tokens
    kv = worker.cache.kv["mtp"]
    rows = kv.k.view(-1, *kv.k.shape[2:])[:pos + 1 + 2]                # prompt, decodes, then 2 recursive drafts
    return tokens, out.drafts, rows.clone()


def test_stashed_passes_give_the_drafts_and_mtp_cache_of_feeding_every_pass():
    # Drafting in the model's float32 (the CPU default drafts in float16 up to 8 rows a call, so feeding 7
    # stashed rows at once would round differently from 7 calls of one row): the same numbers either way.
    model = load_checkpoint(resolve_checkpoint("default"))
    fed_tokens, fed_drafts, fed_rows = _run(_worker(model, "model"), "fed", 6)
    stash_worker = _worker(model, "model")
    st_tokens, st_drafts, st_rows = _run(stash_worker, "stash", 6)
    assert st_tokens == fed_tokens and len(fed_drafts) == 3
    assert st_drafts == fed_drafts
    torch.testing.assert_close(st_rows, fed_rows, rtol=1e-5, atol=1e-5)
    assert stash_worker.store.num_stashed(0) == 0                     # the drafting pass fed the stash


def test_with_the_default_float16_drafter_the_drafts_are_the_same():
    model = load_checkpoint(resolve_checkpoint("default"))
    assert _run(_worker(model), "stash", 6)[:2] == _run(_worker(model), "fed", 6)[:2]


def test_without_a_stash_the_mtp_cache_has_a_gap_the_stash_fills():
    """What the stash is for: a pass that neither feeds nor stashes leaves MTP positions unwritten."""
    w = _worker(load_checkpoint(resolve_checkpoint("default")))
    w.cache.kv["mtp"].k.fill_(7.0)
    out = w.execute(_step(0, PROMPT, 0)).outputs[0]                     # neither fed nor stashed
    kv = w.cache.kv["mtp"]
    assert bool((kv.k.view(-1, *kv.k.shape[2:])[:len(PROMPT)] == 7.0).all())
    assert out.new_tokens


def test_the_stash_is_bounded_and_dropped_when_it_does_not_end_where_the_pass_begins():
    store = DraftStore()
    h = torch.randn(MAX_STASHED + 10, 4)
    store.stash(5, 100, h[:40], list(range(40)))
    store.stash(5, 140, h[40:], list(range(40, MAX_STASHED + 10)))     # contiguous: appended, then trimmed
    assert store.num_stashed(5) == MAX_STASHED
    st = store.unstash(5, 100 + MAX_STASHED + 10)
    assert st.start == 110 and st.tokens[0] == 10 and torch.equal(st.h, h[10:])
    many = DraftStore()                                                   # one row a pass, 3 x MAX_STASHED passes:
    for p in range(3 * MAX_STASHED):                                      # old chunks are let go, not kept
        many.stash(7, p, h[p % 10:p % 10 + 1], [p])
    st = many.unstash(7, 3 * MAX_STASHED)
    assert len(st.chunks) == MAX_STASHED and st.tokens == list(range(2 * MAX_STASHED, 3 * MAX_STASHED))
    store.stash(5, 100, h[:3], [1, 2, 3])
    assert store.unstash(5, 50) is None                                   # recomputed from 50: stale, dropped
    assert store.num_stashed(5) == 0
    store.stash(5, 100, h[:3], [1, 2, 3])
    store.stash(5, 20, h[:2], [4, 5])                                     # not contiguous: replaced
    assert store.unstash(5, 22).tokens == [4, 5]
    store.stash(6, 0, h[:2], [1, 2])
    store.drop(6)
    assert store.num_stashed(6) == 0

