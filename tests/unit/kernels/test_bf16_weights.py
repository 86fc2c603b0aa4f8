"""The product from exact bfloat16 weights (kernels/fast/native/linear.c's packed kernel through
kernels/fast/linear.py): where a float32 weight holds bfloat16 values (a checkpoint stored in bfloat16),
1 to PACKED_MAX_ROWS rows read its packed bfloat16 bits and give F.linear's numbers up to the order of the
sums; more rows, any other weight, and autograd, keep the torch products."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kernels.fast import linear as fast_linear
from kernels.fast import moe as fast_moe
from kernels.fast import native
from kernels.reference import moe as ref_moe

pytestmark = pytest.mark.skipif(native.library() is None, reason=f"native kernels not built: {native.why_not()}")


def _nonzero(t, floor=1e-2):
    return torch.where(t >= 0, t.clamp_min(floor), t.clamp_max(-floor))


def _weight(g, *shape, exact=True):
    w = _nonzero(torch.randn(*shape, generator=g) * 0.1)
    return torch.nn.Parameter(w.to(torch.bfloat16).float() if exact else w, requires_grad=False)


@pytest.fixture
def calls(monkeypatch):
    """How many products went through the native kernel."""
    n = [0]
    real = native.linear_bf16_packed

    def counted(*a):
        n[0] += 1
        return real(*a)
    monkeypatch.setattr(native, "linear_bf16_packed", counted)
    return n


@pytest.mark.parametrize("rows", [1, 2, 5, 8, 9, 17, fast_linear.PACKED_MAX_ROWS])
@pytest.mark.parametrize("out_features,in_features", [(40, 24), (300, 256), (7, 513)])
def test_few_rows_from_exact_bf16_weights_are_f_linear(seed, calls, rows, out_features, in_features):
    g = torch.Generator().manual_seed(seed)
    w = _weight(g, out_features, in_features)
    x = _nonzero(torch.randn(rows, in_features, generator=g))
    torch.testing.assert_close(fast_linear.linear(x, w), F.linear(x, w), atol=2e-5, rtol=2e-5)
    assert calls[0] == 1
    x3 = _nonzero(torch.randn(1, rows, in_features, generator=g))[:, :, :]     # leading dims kept
    assert fast_linear.linear(x3, w).shape == (1, rows, out_features)


def test_more_rows_than_the_cap_keep_the_torch_product(seed, calls):
    g = torch.Generator().manual_seed(seed)
    w = _weight(g, 40, 24)
    x = _nonzero(torch.randn(fast_linear.PACKED_MAX_ROWS + 1, 24, generator=g))
    with torch.no_grad():
        torch.testing.assert_close(fast_linear.linear(x, w), F.linear(x, w), atol=2e-5, rtol=2e-5)
    assert calls[0] == 0


def test_packing_puts_sixteen_features_last_and_zeros_past_the_end():
    bits = torch.arange(3 * 20 * 5, dtype=torch.int16).view(3, 20, 5)            # (E, O, I)
    p = fast_linear.pack16(bits)
    assert p.shape == (3, 2, 5, 16)
    assert torch.equal(p[1, 0, 2], bits[1, :16, 2]) and torch.equal(p[1, 1, 2, :4], bits[1, 16:, 2])
    assert not p[:, 1, :, 4:].any()


def test_a_weight_that_is_not_bf16_keeps_the_torch_product(seed, calls):
    g = torch.Generator().manual_seed(seed)
    w = _weight(g, 64, 32, exact=False)
    x = _nonzero(torch.randn(3, 32, generator=g))
    assert fast_linear.bf16_bits(w) is None
    torch.testing.assert_close(fast_linear.linear(x, w), F.linear(x, w))
    assert calls[0] == 0


def test_the_bits_follow_the_weight_when_it_changes(seed, calls):
    g = torch.Generator().manual_seed(seed)
    w = _weight(g, 48, 32)
    x = _nonzero(torch.randn(2, 32, generator=g))
    fast_linear.linear(x, w)
    with torch.no_grad():
        w.mul_(2.0)                                       # still bfloat16-exact; a new version
    torch.testing.assert_close(fast_linear.linear(x, w), F.linear(x, w), atol=2e-5, rtol=2e-5)
    with torch.no_grad():
        w.add_(1e-4)                                      # no longer exact: back to the torch product
    before = calls[0]
    torch.testing.assert_close(fast_linear.linear(x, w), F.linear(x, w))
    assert calls[0] == before


def test_an_expert_of_a_stack_reads_its_own_bits(seed, calls):
    g = torch.Generator().manual_seed(seed)
    stack = _weight(g, 4, 24, 16)
    x = _nonzero(torch.randn(3, 16, generator=g))
    for e in range(4):
        torch.testing.assert_close(fast_linear.expert_linear(x, stack, e), F.linear(x, stack[e]), atol=2e-5, rtol=2e-5)
    assert calls[0] == 4


def test_autograd_and_the_switch_keep_the_torch_product(seed, calls, monkeypatch):
    g = torch.Generator().manual_seed(seed)
    w = _weight(g, 16, 8)
    w.requires_grad_(True)
    x = _nonzero(torch.randn(2, 8, generator=g))
    fast_linear.linear(x, w).sum().backward()             # the weight gets its gradient
    torch.testing.assert_close(w.grad, x.sum(0).expand(16, 8))
    assert calls[0] == 0
    monkeypatch.setattr(fast_linear, "BF16_WEIGHTS", False)
    with torch.no_grad():
        fast_linear.linear(x, w)
    assert calls[0] == 0


def test_a_weight_made_in_inference_mode_has_no_version_counter_and_still_works(seed, calls):
    g = torch.Generator().manual_seed(seed)
    with torch.inference_mode():
        w = _weight(g, 32, 16)
        x = _nonzero(torch.randn(2, 16, generator=g))
        torch.testing.assert_close(fast_linear.linear(x, w), F.linear(x, w), atol=2e-5, rtol=2e-5)
    assert calls[0] == 1


@pytest.mark.parametrize("T,shard", [(1, None), (32, None), (fast_moe.NATIVE_MAX_ROWS, (2, 4)),
                                     (fast_moe.NATIVE_MAX_ROWS + 1, None)])
def test_exact_bf16_experts_take_the_native_kernel_up_to_its_row_cap(seed, monkeypatch, T, shard):
    """A decode pass of 32 sequences (hybrid-mini: 8 experts, top 2) runs only the chosen experts in C, not
    every expert densely; past the cap (stack scratch) the torch schedules; the reference's numbers either way."""
    n = [0]
    real = native.moe_experts
    monkeypatch.setattr(native, "moe_experts", lambda *a: (n.__setitem__(0, n[0] + 1), real(*a))[1])
    g = torch.Generator().manual_seed(seed)
    E, k, D, I = 8, 2, 48, 32
    first, owned = (0, E) if shard is None else shard
    up, down = _weight(g, owned, I, D), _weight(g, owned, D, I)
    x = _nonzero(torch.randn(T, D, generator=g))
    ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)])
    wts = torch.rand(T, k, generator=g) + 0.1
    with torch.no_grad():
        got = fast_moe.grouped_experts(x, wts, ids, up, down, first_expert=first)
    ref = ref_moe.grouped_experts(x, wts, ids, up, down, first_expert=first)
    torch.testing.assert_close(got, ref, atol=2e-5, rtol=2e-5)
    assert n[0] == (1 if T <= fast_moe.NATIVE_MAX_ROWS else 0)
