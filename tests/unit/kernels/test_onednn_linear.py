"""The oneDNN product (kernels/fast/linear.py): a Parameter's reordered copy gives F.linear's numbers,
follows every change of the weight, and never stands in for the weight where autograd needs it."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kernels.fast import linear as fast_linear
from kernels.fast import moe as fast_moe
from kernels.reference import moe as ref_moe

needs_onednn = pytest.mark.skipif(not fast_linear.ONEDNN, reason="this torch has no oneDNN linear")


def _param(g, *shape):
    return torch.nn.Parameter((torch.rand(*shape, generator=g) - 0.5) * 0.4, requires_grad=False)


@needs_onednn
@pytest.mark.parametrize("shape", [(8, 48), (9, 48), (33, 48), (3, 5, 48)])
def test_a_parameter_goes_through_its_reordered_copy_with_torch_numbers(shape):
    g = torch.Generator().manual_seed(sum(shape) + torch.seed() % 1000)
    x, w = torch.rand(*shape, generator=g) + 0.1, _param(g, 40, 48)
    out = fast_linear.linear(x, w)
    assert out.shape == (*shape[:-1], 40)
    assert getattr(w, "_onednn_packed", None) is not None               # the path was taken
    torch.testing.assert_close(out, F.linear(x, w), atol=1e-5, rtol=1e-5)


@needs_onednn
@pytest.mark.parametrize("rows", [1, 2, 7])
def test_fewer_rows_stay_with_mkl(rows):
    g = torch.Generator().manual_seed(3 + rows)
    x, w = torch.rand(rows, 48, generator=g) + 0.1, _param(g, 40, 48)
    torch.testing.assert_close(fast_linear.linear(x, w), F.linear(x, w), atol=1e-5, rtol=1e-5)
    assert getattr(w, "_onednn_packed", None) is None


@needs_onednn
@pytest.mark.parametrize("change", ["in place", "new data", "load_state_dict"])
def test_the_copy_follows_every_change_of_the_weight(change):
    g = torch.Generator().manual_seed(11)
    x, w = torch.rand(16, 48, generator=g) + 0.1, _param(g, 40, 48)
    fast_linear.linear(x, w)                                            # reordered once
    fresh = (torch.rand(40, 48, generator=g) - 0.5) * 0.4
    if change == "in place":
        with torch.no_grad():
            w.copy_(fresh)
    elif change == "new data":
        w.data = fresh.clone()
    else:
        layer = torch.nn.Linear(48, 40, bias=False)
        layer.weight = w
        layer.load_state_dict({"weight": fresh})
    torch.testing.assert_close(fast_linear.linear(x, w), F.linear(x, fresh), atol=1e-5, rtol=1e-5)


def test_autograd_reaches_the_weight_not_a_copy():
    g = torch.Generator().manual_seed(5)
    x = torch.rand(12, 48, generator=g) + 0.1
    w = torch.nn.Parameter(_param(g, 40, 48).detach().clone())
    fast_linear.linear(x, w).square().sum().backward()
    ref = w.detach().clone().requires_grad_(True)
    F.linear(x, ref).square().sum().backward()
    torch.testing.assert_close(w.grad, ref.grad)


def test_the_every_expert_schedule_is_inference_only():
    """hybrid-mini's shape at 32 rows takes the dense schedule; under autograd the sorted one, whose
    gradients reach the stacked expert weights."""
    g = torch.Generator().manual_seed(9)
    T, k, E, D, I = 32, 2, 8, 24, 16
    x = torch.rand(T, D, generator=g) + 0.1
    ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)])
    wts = torch.rand(T, k, generator=g) + 0.1
    up = torch.nn.Parameter((torch.rand(E, I, D, generator=g) - 0.5) * 0.4)
    down = torch.nn.Parameter((torch.rand(E, D, I, generator=g) - 0.5) * 0.4)
    with torch.no_grad():
        dense = fast_moe.grouped_experts(x, wts, ids, up, down)
    assert getattr(up, "every_expert_up", None) is not None            # the dense schedule ran
    out = fast_moe.grouped_experts(x, wts, ids, up, down)
    out.sum().backward()
    assert up.grad is not None and up.grad.abs().sum() > 0 and down.grad.abs().sum() > 0
    ref = ref_moe.grouped_experts(x, wts, ids, up.detach(), down.detach())
    torch.testing.assert_close(dense, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.detach(), ref, atol=1e-5, rtol=1e-5)
