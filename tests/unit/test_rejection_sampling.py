"""Speculative verification keeps the target distribution (kernels/reference/sampling.py, speculative.verify).

Statistical rule used below: over N independent verifications (fixed seeds, so the tests are
deterministic), the empirical distribution of an emitted token must pass Pearson's chi-square
goodness-of-fit test against the target distribution at significance 0.001 (critical values in
CHI2_999), and, for samples of at least 20k tokens, its total variation distance from the target must
stay under TV_MAX. Each test also checks that the drafts' own distribution fails the chi-square test,
so the test can tell the two apart.
"""
from __future__ import annotations

import pytest
import torch

from kernels.reference.sampling import probs_from_logits, rejection_sample
from model_shards import speculative
from model_shards.sampling_params import SamplingParams

V = 8                      # vocabulary
TV_MAX = 0.02              # total variation bound for N >= 20k draws (expected TV at that N is ~0.008)
# 0.999 quantiles of chi-square with df = 1..7 degrees of freedom (significance 0.001).
CHI2_999 = {1: 10.828, 2: 13.816, 3: 16.266, 4: 18.467, 5: 20.515, 6: 22.458, 7: 24.322}


def chi_square(tokens: torch.Tensor, p: torch.Tensor) -> tuple[float, int]:
    """Pearson's statistic of observed tokens against p over p's support; (statistic, degrees of freedom).
    Tokens outside the support make it infinite."""
    counts = torch.bincount(tokens, minlength=p.numel()).double()
    support = p > 0
    if counts[~support].sum() > 0:
        return float("inf"), int(support.sum()) - 1
    expected = p.double()[support] * counts.sum()
    return float(((counts[support] - expected) ** 2 / expected).sum()), int(support.sum()) - 1


def tv(tokens: torch.Tensor, p: torch.Tensor) -> float:
    emp = torch.bincount(tokens, minlength=p.numel()).double() / tokens.numel()
    return 0.5 * float((emp - p.double()).abs().sum())


def assert_follows(tokens: torch.Tensor, p: torch.Tensor, what: str) -> None:
    stat, df = chi_square(tokens, p)
    limit = CHI2_999.get(df, 0.0) if df else 1e-9          # a one-token support: every token must be it
    assert stat < limit, f"{what}: chi-square {stat:.1f} >= {limit} (df {df}, n {tokens.numel()})"
    assert tv(tokens, p) < TV_MAX or tokens.numel() < 20_000, f"{what}: TV {tv(tokens, p):.4f}"


def assert_distinguishable(tokens: torch.Tensor, p: torch.Tensor) -> None:
    stat, df = chi_square(tokens, p)
    assert stat > CHI2_999[df], "the draft distribution is too close to the target for this test to mean anything"


def random_dists(k: int, seed: int):
    """Target p (k+1, V) and draft q (k, V), far apart, no zero probabilities."""
    g = torch.Generator().manual_seed(seed)
    p = torch.softmax(torch.randn(k + 1, V, generator=g), -1)
    q = torch.softmax(1.5 * torch.randn(k, V, generator=g), -1)
    return p, q


def draw_drafts(q: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    """n draft sequences (n, k), position i drawn from q[i]."""
    g = torch.Generator().manual_seed(seed)
    return torch.multinomial(q, n, replacement=True, generator=g).t().contiguous()


def collect(verify_one, drafts: torch.Tensor):
    """Run verification per draw; return the first, second (when >= 2 tokens) and bonus (all accepted) tokens."""
    k = drafts.shape[1]
    first, second, bonus = [], [], []
    for d in drafts:
        toks, n_acc = verify_one(d)
        assert len(toks) == n_acc + 1 and toks[:n_acc] == d[:n_acc].tolist()
        first.append(toks[0])
        if len(toks) >= 2:
            second.append(toks[1])
        if n_acc == k:
            bonus.append(toks[-1])
    return torch.tensor(first), torch.tensor(second), torch.tensor(bonus)


def test_rejection_sample_emits_the_target_distribution():
    """k=2 drafts from q, 30k verifications: token 1 ~ p[0]; token 2 (given two were emitted) ~ p[1];
    the bonus token after full acceptance ~ p[2]."""
    k, n = 2, 30_000
    p, q = random_dists(k, seed=60)
    drafts = draw_drafts(q, n, seed=61)
    g = torch.Generator().manual_seed(62)
    first, second, bonus = collect(lambda d: rejection_sample(p, d, q, generator=g), drafts)
    assert_distinguishable(drafts[:, 0], p[0])
    assert_follows(first, p[0], "first token")
    assert_follows(second, p[1], "second token")
    assert_follows(bonus, p[2], "bonus token")


@pytest.mark.parametrize("params", [SamplingParams(temperature=1.0),
                                    SamplingParams(temperature=0.7, top_k=6, top_p=0.9)],
                         ids=["plain", "temperature-topk-topp"])
def test_verify_emits_the_filtered_target_distribution(params):
    """speculative.verify from logits: the first token follows probs_from_logits(logits, params), drafts
    outside its support are never emitted."""
    k, n = 1, 20_000
    g = torch.Generator().manual_seed(63)
    logits = 1.5 * torch.randn(k + 1, V, generator=g)
    p = probs_from_logits(logits, params.temperature, params.top_k, params.top_p)
    q = torch.softmax(torch.randn(k, V, generator=g), -1)
    drafts = draw_drafts(q, n, seed=64)
    gen = torch.Generator().manual_seed(65)
    first, _, bonus = collect(lambda d: speculative.verify(logits, d.tolist(), q, params, gen), drafts)
    assert_distinguishable(drafts[:, 0], p[0])
    assert_follows(first, p[0], "first token")
    assert_follows(bonus, p[1], "bonus token")


def test_drafts_from_the_target_itself_are_always_accepted():
    k = 3
    p, _ = random_dists(k, seed=66)
    drafts = draw_drafts(p[:k], 500, seed=67)
    g = torch.Generator().manual_seed(68)
    for d in drafts:
        toks, n_acc = rejection_sample(p, d, p[:k], generator=g)
        assert n_acc == k and toks[:k] == d.tolist()


def test_a_draft_the_target_excludes_is_never_accepted():
    p = torch.softmax(torch.randn(2, V, generator=torch.Generator().manual_seed(69)), -1)
    p[0, 3] = 0.0
    p[0] /= p[0].sum()
    q = torch.full((1, V), 1.0 / V)
    g = torch.Generator().manual_seed(70)
    for _ in range(300):
        toks, n_acc = rejection_sample(p, torch.tensor([3]), q, generator=g)
        assert n_acc == 0 and toks[0] != 3


# ---- greedy ------------------------------------------------------------------------------------------------

def greedy_case(k: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(k + 1, V, generator=g)
    return logits, logits.argmax(-1)


@pytest.mark.parametrize("k", [1, 3, 5])
def test_greedy_accepts_the_longest_prefix_equal_to_argmax_then_emits_the_argmax(k):
    logits, target = greedy_case(k, seed=71)
    for j in range(k):                                   # first mismatch at draft j
        drafts = target[:k].clone()
        drafts[j] = (drafts[j] + 1) % V
        drafts[j + 1:] = target[j + 1:k]                # later matches must not count
        expected = (target[:j].tolist() + [int(target[j])], j)
        assert rejection_sample(logits, drafts, None) == expected
        assert speculative.verify(logits, drafts.tolist(), None, SamplingParams(), torch.Generator()) == expected


@pytest.mark.parametrize("k", [0, 1, 4])
def test_greedy_all_accepted_emits_the_bonus_argmax(k):
    logits, target = greedy_case(k, seed=72)
    expected = (target.tolist(), k)                      # k drafts + the argmax at position k
    assert rejection_sample(logits, target[:k], None) == expected
    assert speculative.verify(logits, target[:k].tolist(), None, SamplingParams(), torch.Generator()) == expected


# ---- filtering -------------------------------------------------------------------------------------------------

def _logits(seed: int, n: int = 32):
    return 2.0 * torch.randn(3, n, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("top_k", [1, 3, 10])
def test_top_k_keeps_exactly_the_k_largest_logits(top_k):
    logits = _logits(73)
    probs = probs_from_logits(logits, 0.8, top_k=top_k)
    expected = torch.zeros_like(probs, dtype=torch.bool).scatter(-1, logits.topk(top_k, -1).indices, True)
    assert torch.equal(probs > 0, expected)
    torch.testing.assert_close(probs, torch.softmax((logits / 0.8).masked_fill(~expected, -torch.inf), -1))


@pytest.mark.parametrize("top_p", [0.05, 0.5, 0.83, 0.99])
def test_top_p_keeps_the_smallest_prefix_of_sorted_probabilities_reaching_p(top_p):
    logits = _logits(74)
    probs = probs_from_logits(logits, 1.3, top_p=top_p)
    full = torch.softmax(logits / 1.3, -1)
    for row in range(logits.shape[0]):
        sorted_p, order = full[row].sort(descending=True)
        m = int((sorted_p.cumsum(0) < top_p).sum()) + 1   # smallest m with cumsum[m-1] >= top_p
        keep = set(order[:m].tolist())
        assert set(torch.nonzero(probs[row]).flatten().tolist()) == keep
        torch.testing.assert_close(probs[row, list(keep)], full[row, list(keep)] / full[row, list(keep)].sum())


def test_top_k_then_top_p_applies_top_p_to_the_top_k_distribution():
    logits = _logits(75)
    probs = probs_from_logits(logits, 1.0, top_k=5, top_p=0.7)
    topk = probs_from_logits(logits, 1.0, top_k=5)
    for row in range(logits.shape[0]):
        sorted_p, order = topk[row].sort(descending=True)
        m = int((sorted_p.cumsum(0) < 0.7).sum()) + 1
        assert set(torch.nonzero(probs[row]).flatten().tolist()) == set(order[:m].tolist())


def test_temperature_scales_logits():
    logits = _logits(76)
    for t in (0.5, 1.0, 2.0):
        torch.testing.assert_close(probs_from_logits(logits, t), torch.softmax(logits / t, -1))
