"""Causal depthwise conv1d (kernels/reference/conv1d.py) against an explicit sum over the kernel taps.

Definition, per channel c, with the state holding the K-1 inputs before x (oldest first):
    xs = [state | x];  y[t, c] = silu(bias[c] + sum_j weight[c, j] * xs[c, t + j]);  new state = last K-1 of xs.
The conv itself runs in the input dtype, so 16-bit tolerances cover a K-term sum rounded in that dtype.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kernels.reference.conv1d import causal_conv1d, causal_conv1d_update

TOL = {  # (atol, rtol) against the float64 formula
    torch.float32: (1e-5, 1e-5),
    torch.bfloat16: (3e-2, 2e-2),
    torch.float16: (4e-3, 4e-3),
}
DTYPES = list(TOL)
# (L, C, K): lengths shorter than the state, equal to it and longer; kernel sizes 2..4.
SHAPES = [(13, 24, 4), (1, 8, 4), (2, 16, 4), (3, 10, 4), (20, 10, 2), (9, 12, 3)]


def _nonzero(t: torch.Tensor, floor: float = 1e-2) -> torch.Tensor:
    return torch.where(t >= 0, t.clamp_min(floor), t.clamp_max(-floor))


def make_inputs(L, C, K, dtype, seed):
    """x in dtype; weight, bias float32 (parameters); a float32 state holding dtype-representable values,
    as the model's cache does."""
    g = torch.Generator().manual_seed(seed)
    x = _nonzero(torch.randn(L, C, generator=g)).to(dtype)
    w = _nonzero(torch.randn(C, K, generator=g) * 0.5).to(dtype).float()
    b = _nonzero(torch.randn(C, generator=g) * 0.5).to(dtype).float()
    state = _nonzero(torch.randn(C, K - 1, generator=g)).to(dtype).float()
    return x, w, b, state


def naive_conv(x, w, b, state, activation=True):
    L, C = x.shape
    K = w.shape[1]
    xs = torch.cat([state.double(), x.double().t()], dim=1)
    y = b.double()[:, None].expand(C, L).clone()                       # (C, L)
    for j in range(K):                                                   # tap j sees input t - (K-1) + j
        y += w[:, j].double()[:, None] * xs[:, j:j + L]
    y = y.t()
    return (F.silu(y) if activation else y), xs[:, -(K - 1):]


def check(actual, expected, dtype):
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(actual.double(), expected.double(), atol=atol, rtol=rtol)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "L{}-C{}-K{}".format(*s))
@pytest.mark.parametrize("with_state", [False, True], ids=["fresh", "initial_state"])
@pytest.mark.parametrize("activation", [True, False], ids=["silu", "linear"])
def test_causal_conv1d_equals_explicit_tap_sum(dtype, shape, with_state, activation):
    L, C, K = shape
    x, w, b, state = make_inputs(L, C, K, dtype, seed=10)
    s0 = state if with_state else None
    y, new_state = causal_conv1d(x, w, b, s0, activation=activation)
    y_ref, state_ref = naive_conv(x, w, b, state if with_state else torch.zeros(C, K - 1), activation)
    assert y.dtype == dtype and y.shape == (L, C) and new_state.shape == (C, K - 1)
    check(y, y_ref, dtype)
    # The new state is a copy of inputs: exact.
    assert torch.equal(new_state.double(), state_ref)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "L{}-C{}-K{}".format(*s))
def test_update_step_by_step_equals_full_sequence(dtype, shape):
    """Decoding one position at a time through the update reproduces the whole-sequence conv."""
    L, C, K = shape
    x, w, b, state = make_inputs(L, C, K, dtype, seed=11)
    y_full, s_full = causal_conv1d(x, w, b, state)
    s, ys = state, []
    for t in range(L):
        y_t, states_t = causal_conv1d_update(x[t:t + 1], s, w, b)
        assert states_t.shape == (1, C, K - 1)
        ys.append(y_t)
        s = states_t[-1].float()
    check(torch.cat(ys), y_full, dtype)
    assert torch.equal(s, s_full.float())


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("T", [1, 2, 4, 6])
def test_update_over_T_positions_returns_the_state_after_each(dtype, T):
    """states[t] of a T-position update == the state after x[:t+1]; y equals the full conv's."""
    C, K = 12, 4
    x, w, b, state = make_inputs(T, C, K, dtype, seed=12)
    y, states = causal_conv1d_update(x, state, w, b)
    y_ref, _ = naive_conv(x, w, b, state)
    check(y, y_ref, dtype)
    assert states.shape == (T, C, K - 1)
    for t in range(T):
        _, s_t = causal_conv1d(x[:t + 1], w, b, state)
        assert torch.equal(states[t], s_t)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("split", [1, 2, 3, 7, 12])
def test_full_conv_over_two_pieces_with_carried_state_equals_whole(dtype, split):
    C, K = 16, 4
    x, w, b, state = make_inputs(13, C, K, dtype, seed=13)
    y, s = causal_conv1d(x, w, b, state)
    y1, mid = causal_conv1d(x[:split], w, b, state)
    y2, s2 = causal_conv1d(x[split:], w, b, mid)
    check(torch.cat([y1, y2]), y, dtype)
    assert torch.equal(s2, s)


def test_update_leaves_the_input_state_unchanged():
    x, w, b, state = make_inputs(3, 8, 4, torch.float32, seed=14)
    before = state.clone()
    causal_conv1d_update(x, state, w, b)
    assert torch.equal(state, before)


def test_state_is_oldest_input_first():
    """With K=4, after inputs 1..5 the state is [3, 4, 5] (oldest first), whatever came before."""
    x = torch.arange(1.0, 6.0)[:, None]
    w, b = torch.ones(1, 4), torch.ones(1)
    _, s = causal_conv1d(x, w, b, torch.full((1, 3), 7.0))
    assert s.tolist() == [[3.0, 4.0, 5.0]]
    _, states = causal_conv1d_update(x[:2], torch.tensor([[7.0, 8.0, 9.0]]), w, b)
    assert states.tolist() == [[[8.0, 9.0, 1.0]], [[9.0, 1.0, 2.0]]]
