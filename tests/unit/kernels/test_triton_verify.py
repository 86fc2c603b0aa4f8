"""Batched speculative verification: the Triton kernels (kernels/triton/verify.py) against the batched torch
reference (kernels/reference/sampling.py verify_greedy, verify_random), exactly (counts and tokens) for the
same inputs and uniforms; greedy against the per-sequence rejection_sample; the reference's output
distribution against the target (the Leviathan guarantee); the ops' dispatch (kernels/ops.py).

Conventions as in test_triton_kernels.py: the interpreter on CPU tensors (conftest.py), a fresh printed
seed per test (HYBRIDSERVE_TEST_SEED=<n> replays it) except for the distribution test (a fixed seed: a
statistical test at significance 0.001 would otherwise fail one run in a thousand), outputs poisoned
(a value no count or token takes), float32 and float16 inputs (bfloat16 on a GPU only). Small
vocabularies read in blocks of 4 (several blocks, a ragged last one), and one default tile.
"""
from __future__ import annotations


import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed (pyproject installs it on Linux only)")

from kernels import ops  # noqa: E402
from kernels import triton as tk  # noqa: E402
from kernels.reference import sampling as ref  # noqa: E402
from kernels.triton import verify as tri  # noqa: E402

CUDA = torch.cuda.is_available() and not tk.INTERPRET
DEVICE = "cuda" if CUDA else "cpu"
if not CUDA and not tk.INTERPRET:
    raise RuntimeError("kernels.triton was imported before TRITON_INTERPRET=1 was set (see conftest.py)")

DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if CUDA else [])
# (V, block_v): 13 and 37 tokens in tiles of 4 (ragged last tile), 16 in one default tile.
VOCABS = [(13, 4), (37, 4), (16, None)]
vocab_ids = lambda c: f"V{c[0]}-tile{c[1] or 'default'}"  # noqa: E731
CHI2_999 = {1: 10.828, 2: 13.816, 3: 16.266, 4: 18.467, 5: 20.515, 6: 22.458, 7: 24.322}
TV_MAX = 0.02


@pytest.fixture(autouse=True)
def poisoned_outputs(poison_triton_outputs):
    """Every test here runs with the wrappers' outputs NaN-filled first (conftest.py)."""


def _dists(g, *shape, sharp=2.0, dtype=torch.float32):
    """Random distributions over the last axis, no zero probabilities (in float32 and in dtype)."""
    p = torch.softmax(torch.randn(*shape, generator=g) * sharp, -1).clamp_min(1e-3)
    return (p / p.sum(-1, keepdim=True)).to(dtype)


def _random_case(g, S, k, V, dtype):
    """p (S, k+1, V), q (S, k, V), drafts drawn from q, num_drafts covering 0..k, uniforms (S, k+1),
    with the corner cases planted in sequence 0..3 (when there are drafts):
      0: a draft with q = 0 (rejected whatever u); p = q at that position, so the residual is all zero
         and the corrected token comes from p;
      1: sparse p and q (top-3 supports): zero-mass tokens must never be picked;
      2: all drafts accepted (u = 0), the bonus token's draw at u just under 1 (the last token with mass);
      3: the first draft has p = 0 < q, tested at u = 0: rejected (min(1, p/q) = 0)."""
    p = _dists(g, S, k + 1, V, dtype=torch.float32)
    q = _dists(g, S, k, V, dtype=torch.float32)
    num = torch.randint(0, k + 1, (S,), generator=g)
    num[: min(S, 2)] = k
    u = torch.rand(S, k + 1, generator=g)
    if k:
        num[2] = k
        zero = 5 % V
        q[0, 0, zero] = 0.0
        q[0, 0] /= q[0, 0].sum()
        p[0, 0] = q[0, 0]
        for t in (p[1], q[1]):                                   # top-3 supports
            keep = t.topk(3, dim=-1).indices
            t.copy_(torch.zeros_like(t).scatter(-1, keep, t.gather(-1, keep)))
            t /= t.sum(-1, keepdim=True)
        u[2, :k] = 0.0
        u[2, k] = 1.0 - 2.0 ** -24
    drafts = (torch.multinomial(q.reshape(-1, V), 1, generator=g).view(S, k) if k
              else torch.zeros(S, 0, dtype=torch.long))
    if k:
        drafts[0, 0] = 5 % V
        p[3, 0, drafts[3, 0]] = 0.0
        p[3, 0] /= p[3, 0].sum()
        u[3, 0] = 0.0
    p, q = p.to(dtype), q.to(dtype)
    return [t.to(DEVICE) for t in (p, q, drafts, num, u)]


def _equal(got, want, what):
    for name, a, b in zip(("count", "token"), got, want):
        assert a.dtype == torch.int64 and a.shape == b.shape, (what, name, a.dtype, a.shape)
        assert torch.equal(a.cpu(), b.cpu()), f"{what}: {name} {a.tolist()} != reference {b.tolist()}"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("vocab", VOCABS, ids=vocab_ids)
@pytest.mark.parametrize("k", [0, 1, 3])
def test_verify_random_kernel_equals_the_reference(seed, dtype, vocab, k):
    V, block_v = vocab
    g = torch.Generator().manual_seed(seed)
    for rep in range(3):
        p, q, drafts, num, u = _random_case(g, 9, k, V, dtype)
        want = ref.verify_random(p, q, drafts, num, u)
        _equal(tri.verify_random(p, q, drafts, num, u, block_v=block_v), want, f"repetition {rep}")
        n, tok = want
        assert bool((n <= num.to(n.device)).all()) and bool(((tok >= 0) & (tok < V)).all())
        if k:
            assert int(n[0]) == 0 and int(n[2]) == k and (int(num[3]) == 0 or int(n[3]) == 0)
            row = p[0, 0].float()                                # the residual is zero: drawn from p
            assert float(row[int(tok[0])]) > 0
            if int(n[1]) < int(num[1]):
                j = int(n[1])
                assert float((p[1, j].float() - q[1, j].float()).clamp_min(0)[int(tok[1])]) > 0
            else:
                assert float(p[1, int(n[1])].float()[int(tok[1])]) > 0
            assert int(tok[2]) == int(torch.nonzero(p[2, k].float()).max())


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("vocab", VOCABS, ids=vocab_ids)
@pytest.mark.parametrize("k", [0, 1, 4])
@pytest.mark.parametrize("target_kind", ["logits", "ids"])
def test_verify_greedy_kernel_equals_the_reference_and_rejection_sample(seed, dtype, vocab, k, target_kind):
    """Logits with ties (the maximum repeated in a later tile: the first index wins, as torch.argmax) and
    -inf entries; drafts mostly the target's argmax, some not; each sequence's result equals the per-sequence
    greedy rejection_sample."""
    V, block_v = vocab
    S = 8
    g = torch.Generator().manual_seed(seed)
    for rep in range(2):
        logits = (torch.randn(S, k + 1, V, generator=g) * 3).to(dtype)
        logits[0, :, V - 1] = float("-inf")
        top = logits[1].float().amax(-1)
        logits[1, :, V - 2] = top.to(dtype)                        # a tie in the last tile
        logits[1, :, 1] = top.to(dtype)                            # ... and one in the first: index 1 wins
        argmax = logits.argmax(-1)
        drafts = torch.where(torch.rand(S, k, generator=g) < 0.75, argmax[:, :k],
                             torch.randint(0, V, (S, k), generator=g))
        num = torch.randint(0, k + 1, (S,), generator=g)
        num[2] = k
        if k:
            drafts[2] = argmax[2, :k]                                # all accepted: the bonus token
        logits, drafts, num = logits.to(DEVICE), drafts.to(DEVICE), num.to(DEVICE)
        target = logits if target_kind == "logits" else argmax.to(DEVICE)
        want = ref.verify_greedy(target, drafts, num)
        _equal(tri.verify_greedy(target, drafts, num, block_v=block_v), want, f"repetition {rep}")
        assert int(want[0][2]) == k
        for s in range(S):
            n = int(num[s])
            toks, acc = ref.rejection_sample(logits[s, :n + 1].cpu(), drafts[s, :n].cpu(), None)
            assert (acc, toks) == (int(want[0][s]), drafts[s, :acc].tolist() + [int(want[1][s])]), f"sequence {s}"


def _chi_square(tokens: torch.Tensor, p: torch.Tensor) -> tuple[float, int]:
    counts = torch.bincount(tokens, minlength=p.numel()).double()
    expected = p.double() * counts.sum()
    return float(((counts - expected) ** 2 / expected).sum()), p.numel() - 1


def _tv(tokens: torch.Tensor, p: torch.Tensor) -> float:
    return 0.5 * float((torch.bincount(tokens, minlength=p.numel()).double() / tokens.numel() - p.double()).abs().sum())


def test_batched_random_verification_emits_the_target_distribution():
    """60k sequences share p (3 positions) and q (2 drafts, far from p), drafts drawn from q, uniforms from
    torch.rand: the first emitted token (draft 1 if accepted, else the corrected token) follows p at
    position 0 and the second (where one was emitted) p at position 1 (chi-square at significance 0.001,
    TV < 0.02), while the drafts themselves fail that test; with no drafts, the inverse-CDF draw alone
    follows p. The reference only (the kernel equals it exactly, tested above): the interpreter runs one
    program per sequence in Python."""
    V, k, N = 8, 2, 60_000
    g = torch.Generator().manual_seed(20240611)
    p = torch.softmax(torch.randn(k + 1, V, generator=g), -1)
    q = torch.softmax(1.5 * torch.randn(k, V, generator=g), -1)
    drafts = torch.stack([torch.multinomial(q[j], N, replacement=True, generator=g) for j in range(k)], 1)
    u = torch.rand(N, k + 1, generator=g)
    num = torch.full((N,), k)
    n, tok = ref.verify_random(p.expand(N, k + 1, V), q.expand(N, k, V), drafts, num, u)
    first = torch.where(n >= 1, drafts[:, 0], tok)
    second = torch.where(n >= 2, drafts[:, 1], tok)[n >= 1]
    _, alone = ref.verify_random(p[None, :1].expand(N, 1, V), q[None, :0].expand(N, 0, V), drafts[:, :0],
                                 torch.zeros(N, dtype=torch.long), u[:, :1])
    for what, tokens, target in [("first token", first, p[0]), ("second token", second, p[1]),
                                 ("no drafts", alone, p[0])]:
        stat, df = _chi_square(tokens, target)
        assert stat < CHI2_999[df], f"{what}: chi-square {stat:.1f} >= {CHI2_999[df]} (n {tokens.numel()})"
        assert _tv(tokens, target) < TV_MAX, f"{what}: TV {_tv(tokens, target):.4f}"
    stat, df = _chi_square(drafts[:, 0], p[0])
    assert stat > CHI2_999[df], "q is too close to p for this test to tell them apart"
    assert 0.1 < float((n == 0).float().mean()) < 0.9, "rejections and acceptances both happen"


@pytest.mark.parametrize("forced", ["reference", "fast", "triton"])
def test_ops_verify_dispatch(seed, monkeypatch, forced):
    """kernels/ops.py: every forced choice gives the reference's counts and tokens; the fast path is the
    batched reference; unset on a CPU tensor: the fast path."""
    g = torch.Generator().manual_seed(seed)
    p, q, drafts, num, u = _random_case(g, 6, 3, 11, torch.float32)
    want_r = ref.verify_random(p, q, drafts, num, u)
    want_g = ref.verify_greedy(p, drafts, num)
    monkeypatch.setenv(ops.ENV, forced)
    _equal(ops.verify_random(p, q, drafts, num, u), want_r, f"{forced} verify_random")
    _equal(ops.verify_greedy(p, drafts, num), want_g, f"{forced} verify_greedy")
    for name, r, t in [("verify_greedy", ref.verify_greedy, tri.verify_greedy),
                       ("verify_random", ref.verify_random, tri.verify_random)]:
        assert ops._FAST[name] is r and ops._REFERENCE[name] is r and tk.OPS[name] is t
        if not CUDA:
            monkeypatch.delenv(ops.ENV, raising=False)
            assert ops._pick(name, p) is r
