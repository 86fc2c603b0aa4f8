"""The tail verifies every sequence's drafts at once (speculative.verify_batch): on CUDA one ops.verify_greedy
and one ops.verify_random call (Triton kernels); on a CPU greedy chains from one argmax compared on the
host, and seeded random per sequence as before (its draws cannot be the op's). Batching must not change
any sequence's tokens."""
from __future__ import annotations

import pytest
import torch

from kernels import ops
from model_shards import speculative
from model_shards.batch import BatchLayout, SeqSlice
from model_shards.model import HybridModel
from model_shards.presets import PRESETS
from model_shards.sampling_params import SamplingParams
from model_shards.speculative import VerifyJob, verify_batch
from model_shards.tail import DraftStore, TailRequest, run_tail

V = 11
GREEDY = SamplingParams(max_tokens=8)
RANDOM = SamplingParams(max_tokens=8, temperature=0.9, top_k=7, seed=1)


def _jobs(seed: int, params: SamplingParams, lengths=(3, 1, 1, 2, 3)):
    """Logits (R, V) with ties (small integers) and one job per length; drafts follow the argmax for a
    while, then (sometimes) leave it, so accepted counts vary."""
    g = torch.Generator().manual_seed(seed)
    rows = sum(n + 1 for n in lengths)
    logits = torch.randint(0, 4, (rows, V), generator=g).float()
    jobs, at = [], 0
    for i, n in enumerate(lengths):
        top = logits[at:at + n].argmax(-1).tolist()
        drafts = [t if c < (seed + i + 1) % (n + 1) else (t + 1) % V for c, t in enumerate(top)]
        q = None if params.greedy else torch.softmax(torch.randn(n, V, generator=g), -1)
        gen = None if params.greedy else speculative.step_generator(seed, i)
        jobs.append(VerifyJob(at, drafts, q, params, gen))
        at += n + 1
    return logits, jobs


def _one_by_one(logits, jobs, seed: int = 0):
    """speculative.verify per job, each random one with a fresh generator seeded as _jobs seeds it."""
    return [speculative.verify(logits[j.row0:j.row0 + len(j.drafts) + 1], j.drafts, j.draft_probs, j.params,
                               None if j.gen is None else speculative.step_generator(seed, i))
            for i, j in enumerate(jobs)]


@pytest.mark.parametrize("device_path", [False, True], ids=["cpu", "device-op"])
@pytest.mark.parametrize("seed", range(4))
def test_greedy_batch_gives_each_sequence_the_per_sequence_tokens(seed, device_path, monkeypatch):
    """A CPU compares the argmax chains on the host; a GPU makes one ops.verify_greedy call (forced here:
    the reference op, or the Triton kernel under HYBRIDSERVE_KERNELS=triton)."""
    monkeypatch.setattr(speculative, "on_device", lambda device: device_path)
    logits, jobs = _jobs(seed, GREEDY)
    calls = []
    real = ops.verify_greedy
    monkeypatch.setattr(ops, "verify_greedy", lambda *a: calls.append(a[0].shape) or real(*a))
    got = verify_batch(logits, jobs)
    assert calls == ([(len(jobs), 4)] if device_path else [])     # all sequences at once, (S, k+1) token ids
    assert got == _one_by_one(logits, jobs)
    assert {n for _, n in got} != {0}         # some drafts accepted: the comparison means something


@pytest.mark.parametrize("seed", range(4))
def test_random_on_a_cpu_keeps_the_per_sequence_draws(seed, monkeypatch):
    logits, jobs = _jobs(seed, RANDOM)
    monkeypatch.setattr(ops, "verify_random", lambda *a: pytest.fail("a CPU must keep the per-sequence draws"))
    assert verify_batch(logits, jobs) == _one_by_one(logits, jobs, seed)


def test_batched_random_is_one_call_and_independent_of_the_batch(monkeypatch):
    """What a GPU runs (forced here on a CPU: the reference op): one ops.verify_random call; each
    sequence's tokens are those it gets verified alone (its uniforms come from its own generator)."""
    monkeypatch.setattr(speculative, "on_device", lambda device: True)
    calls = []
    real = ops.verify_random
    monkeypatch.setattr(ops, "verify_random", lambda *a: calls.append(a[0].shape) or real(*a))
    logits, jobs = _jobs(5, RANDOM, lengths=(3, 1, 2, 3, 3, 2))
    together = verify_batch(logits, jobs)
    assert calls == [(6, 4, V)]
    alone = []
    for i, j in enumerate(jobs):
        j = VerifyJob(j.row0, j.drafts, j.draft_probs, j.params, speculative.step_generator(5, i))
        alone += verify_batch(logits, [j])
    assert together == alone
    for (toks, n), j in zip(together, jobs):
        assert toks[:n] == j.drafts[:n] and len(toks) == n + 1


def test_the_tail_verifies_all_draft_carrying_sequences_at_once(monkeypatch):
    """run_tail over four sequences with drafts (greedy and random) gives what it gives them one at a time,
    with one verify_batch call per pass."""
    torch.manual_seed(0)
    model = HybridModel(PRESETS["tiny"]).init_random(0).eval()
    cfg, d = model.cfg, model.cfg.hidden_size
    cache = model.make_cache(num_blocks=8, block_size=16, num_slots=4, max_verify_positions=4)
    lengths, params = [4, 2, 3, 4], [GREEDY, RANDOM, GREEDY, RANDOM]
    h = torch.randn(sum(lengths), d)
    g = torch.Generator().manual_seed(1)
    drafts = [torch.randint(0, cfg.vocab_size, (n - 1,), generator=g).tolist() for n in lengths]
    qs = [torch.softmax(torch.randn(n - 1, cfg.vocab_size, generator=g), -1) for n in lengths]

    def run(idx):
        store, seqs, reqs, off = DraftStore(), [], [], 0
        for i in idx:
            seqs.append(SeqSlice(off, lengths[i], 10, i, torch.arange(2), keep_states=True))
            reqs.append(TailRequest(i, [5] + drafts[i], drafts[i], True, None, params[i], 7 + i, 0, 3))
            store.put(i, None if params[i].greedy else qs[i])
            off += lengths[i]
        rows = torch.cat([h[sum(lengths[:i]):sum(lengths[:i + 1])] for i in idx])
        return [(r.new_tokens, r.num_accepted) for r in run_tail(model, cache, rows, BatchLayout(seqs), reqs, store)]

    calls = []
    real = speculative.verify_batch
    monkeypatch.setattr(speculative, "verify_batch", lambda lg, jobs: calls.append(len(jobs)) or real(lg, jobs))
    together = run(range(4))
    assert calls == [4]
    assert together == [run([i])[0] for i in range(4)]


def test_batched_random_emits_the_filtered_target_distribution(monkeypatch):
    """The device path (forced here: the reference op), 10k sequences in one call: the first token follows
    the filtered target at position 0, the second p at 1, the bonus token p at 2."""
    from tests.unit.test_rejection_sampling import assert_distinguishable, assert_follows, draw_drafts

    monkeypatch.setattr(speculative, "on_device", lambda device: True)
    params, k, n, v = SamplingParams(temperature=0.7, top_k=6, top_p=0.95), 2, 10_000, 8
    g = torch.Generator().manual_seed(63)
    logits = 1.5 * torch.randn(k + 1, v, generator=g)
    p = speculative.probs(logits, params)
    q = torch.softmax(torch.randn(k, v, generator=g), -1)
    drafts = draw_drafts(q, n, seed=64)
    jobs = [VerifyJob(0, d.tolist(), q, params, speculative.step_generator(7, i)) for i, d in enumerate(drafts)]
    res = verify_batch(logits, jobs)
    first = torch.tensor([t[0] for t, _ in res])
    second = torch.tensor([t[1] for t, _ in res if len(t) > 1])
    bonus = torch.tensor([t[-1] for t, acc in res if acc == k])
    assert_distinguishable(drafts[:, 0], p[0])
    assert_follows(first, p[0], "first token")
    assert_follows(second, p[1], "second token")
    assert_follows(bonus, p[2], "bonus token")
