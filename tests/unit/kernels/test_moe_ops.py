"""MoE routing and grouped relu² experts (kernels/reference/moe.py) against per-token float64 loops.

    route:  s = sigmoid(logits); ids = top-k of s + correction_bias (the bias only selects);
            weights = s[ids], normalised to sum 1 if asked, times routed_scaling_factor.
    grouped_experts: out[t] = sum_k weights[t, k] * down_e(relu(up_e(x[t]))^2), e = ids[t, k], counting
            only experts first_expert .. first_expert + E_local - 1 (one expert-parallel shard).
The experts compute in the input dtype (as a GEMM kernel would), so 16-bit tolerances cover two GEMMs.
"""
from __future__ import annotations

import pytest
import torch

from kernels.reference.moe import grouped_experts, route

TOL = {  # (atol, rtol) of expert outputs against the float64 loop
    torch.float32: (1e-5, 1e-5),
    torch.bfloat16: (5e-2, 3e-2),
    torch.float16: (6e-3, 6e-3),
}
DTYPES = list(TOL)


def _nonzero(t: torch.Tensor, floor: float = 1e-2) -> torch.Tensor:
    return torch.where(t >= 0, t.clamp_min(floor), t.clamp_max(-floor))


def make_experts(T, D, I, E, k, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    x = _nonzero(torch.randn(T, D, generator=g)).to(dtype)
    up = _nonzero(torch.randn(E, I, D, generator=g) * D ** -0.5, 1e-3).to(dtype)
    down = _nonzero(torch.randn(E, D, I, generator=g) * I ** -0.5, 1e-3).to(dtype)
    ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)])
    w = torch.rand(T, k, generator=g) + 0.1
    return x, w, ids, up, down


def naive_experts(x, w, ids, up, down, lo=0, hi=None):
    hi = up.shape[0] if hi is None else hi
    out = torch.zeros(x.shape, dtype=torch.float64)
    for t in range(x.shape[0]):
        for j in range(ids.shape[1]):
            e = int(ids[t, j])
            if lo <= e < hi:
                h = torch.relu(up[e].double() @ x[t].double()).square()
                out[t] += w[t, j].double() * (down[e].double() @ h)
    return out


def check(actual, expected, dtype):
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(actual.double(), expected.double(), atol=atol, rtol=rtol)


# (T, D_in, I, E, k)
SHAPES = [(1, 16, 8, 4, 1), (7, 32, 16, 8, 2), (20, 24, 12, 8, 3), (5, 16, 8, 6, 6)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "T{}-D{}-I{}-E{}-k{}".format(*s))
def test_grouped_experts_equals_per_token_loop(dtype, shape):
    x, w, ids, up, down = make_experts(*shape, dtype, seed=30)
    y = grouped_experts(x, w, ids, up, down)
    assert y.dtype == dtype and y.shape == x.shape
    check(y, naive_experts(x, w, ids, up, down), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bounds", [(0, 3, 5, 8), (0, 1, 2, 3, 4, 5, 6, 7, 8), (0, 4, 8)], ids=str)
def test_expert_shards_summed_equal_all_experts_at_once(dtype, bounds):
    """Each shard holds experts [lo, hi) and skips the rest; the shards' outputs add up to the full MoE."""
    x, w, ids, up, down = make_experts(9, 32, 16, 8, 3, dtype, seed=31)
    full = grouped_experts(x, w, ids, up, down)
    total = torch.zeros(x.shape, dtype=torch.float64)
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        part = grouped_experts(x, w, ids, up[lo:hi], down[lo:hi], first_expert=lo)
        check(part, naive_experts(x, w, ids, up, down, lo, hi), dtype)
        total += part.double()
    check(total, full, dtype)


def test_a_shard_owning_no_chosen_expert_contributes_nothing():
    x, w, _, up, down = make_experts(4, 16, 8, 8, 2, torch.float32, seed=32)
    ids = torch.tensor([[0, 1], [1, 2], [2, 0], [3, 1]])
    part = grouped_experts(x, w, ids, up[4:], down[4:], first_expert=4)
    assert torch.equal(part, torch.zeros_like(x))


def naive_route(logits, bias, top_k, normalize, scaling):
    s = torch.sigmoid(logits.double())
    choice = s + (0 if bias is None else bias.double())
    ids = [sorted(range(s.shape[1]), key=lambda e: -float(choice[t, e]))[:top_k] for t in range(s.shape[0])]
    ids = torch.tensor(ids)
    w = s.gather(1, ids)
    if normalize:
        w = w / w.sum(-1, keepdim=True)
    return w * scaling, ids


@pytest.mark.parametrize("logit_dtype", DTYPES, ids=str)
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("top_k", [1, 2, 5])
def test_route_equals_sigmoid_topk_with_selection_only_bias(logit_dtype, normalize, top_k):
    g = torch.Generator().manual_seed(33)
    logits = _nonzero(torch.randn(11, 8, generator=g) * 2).to(logit_dtype)
    bias = _nonzero(torch.randn(8, generator=g) * 0.3)
    w, ids = route(logits, bias, top_k=top_k, normalize=normalize, scaling=2.5)
    w_ref, ids_ref = naive_route(logits, bias, top_k, normalize, 2.5)
    assert w.dtype == torch.float32 and ids.dtype == torch.int64 and ids.shape == (11, top_k)
    assert torch.equal(ids.sort(-1).values, ids_ref.sort(-1).values)
    # Compare weights expert by expert (order within the top-k does not matter).
    torch.testing.assert_close(w.double().sort(-1).values, w_ref.sort(-1).values, atol=1e-6, rtol=1e-6)


def test_correction_bias_changes_selection_but_not_weights():
    """A bias favouring the lowest-scoring experts picks them, and they are weighed by their raw scores."""
    g = torch.Generator().manual_seed(34)
    logits = _nonzero(torch.randn(6, 8, generator=g) * 2)
    s = torch.sigmoid(logits)
    _, ids_plain = route(logits, None, top_k=2, normalize=False, scaling=1.0)
    weakest = s.mean(0).argsort()[:2]                  # experts to force in
    bias = torch.zeros(8)
    bias[weakest] = 10.0
    w, ids = route(logits, bias, top_k=2, normalize=False, scaling=1.0)
    assert (ids.sort(-1).values == weakest.sort().values).all()
    assert not torch.equal(ids.sort(-1).values, ids_plain.sort(-1).values)
    torch.testing.assert_close(w, s.gather(1, ids))      # unbiased sigmoid scores, not score + bias


@pytest.mark.parametrize("scaling", [1.0, 2.5, 5.0])
def test_normalised_weights_sum_to_routed_scaling_factor(scaling):
    g = torch.Generator().manual_seed(35)
    logits = _nonzero(torch.randn(9, 16, generator=g) * 2)
    bias = _nonzero(torch.randn(16, generator=g) * 0.1)
    w, _ = route(logits, bias, top_k=4, normalize=True, scaling=scaling)
    torch.testing.assert_close(w.sum(-1), torch.full((9,), scaling), atol=1e-5, rtol=1e-5)
    w_raw, _ = route(logits, bias, top_k=4, normalize=False, scaling=scaling)
    assert not torch.allclose(w_raw.sum(-1), torch.full((9,), scaling), atol=1e-2)
