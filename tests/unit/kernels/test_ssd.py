"""Mamba-2 SSD references (kernels/reference/ssd.py) against a naive per-timestep recurrence in float64.

The chunked scan and the recurrent update are two formulations of
    dt = softplus(dt + dt_bias) (clamped to dt_limit);  state = exp(dt*A)*state + dt * x ⊗ B;  y = state·C + D*x
with head h reading B, C of group h // (H / G). Inputs are cast to the dtype under test; the naive
recurrence reads the same rounded values in float64, so the tolerance only covers the op's own error
(float32 accumulation, and the rounding of y to a 16-bit dtype).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kernels.reference.ssd import ssd_chunk_scan, ssd_state_update

# (atol, rtol) of y against the float64 recurrence; the state is float32 whatever the input dtype.
TOL = {
    torch.float32: (2e-5, 2e-5),
    torch.bfloat16: (3e-2, 2e-2),
    torch.float16: (2e-3, 2e-3),
}
STATE_TOL = (1e-4, 1e-4)
DTYPES = list(TOL)

# (L, H, P, G, N, chunk_size): lengths below, at and across chunk boundaries, n_groups 1 and > 1.
SHAPES = [
    (37, 4, 8, 2, 16, 8),
    (16, 4, 8, 1, 8, 16),
    (5, 6, 4, 3, 8, 8),
    (50, 8, 16, 4, 16, 16),
    (1, 4, 8, 2, 8, 4),
]


def _nonzero(t: torch.Tensor, floor: float = 1e-2) -> torch.Tensor:
    """Push values away from 0 (keeps signs): no zero ever hides a missing term."""
    return torch.where(t >= 0, t.clamp_min(floor), t.clamp_max(-floor))


def make_inputs(L, H, P, G, N, dtype, seed, *, with_state=True):
    g = torch.Generator().manual_seed(seed)
    x = _nonzero(torch.randn(L, H, P, generator=g)).to(dtype)
    dt = _nonzero(torch.randn(L, H, generator=g) * 0.5).to(dtype)
    # Decay rates from slow (state survives many chunks) to fast.
    A = -torch.exp(torch.empty(H).uniform_(-3.0, 1.5, generator=g))
    B = _nonzero(torch.randn(L, G, N, generator=g)).to(dtype)
    C = _nonzero(torch.randn(L, G, N, generator=g)).to(dtype)
    D = _nonzero(torch.randn(H, generator=g))
    dt_bias = _nonzero(torch.rand(H, generator=g) * 2 - 1.5)
    state = _nonzero(torch.randn(H, P, N, generator=g)) if with_state else None
    return dict(x=x, dt=dt, A=A, B=B, C=C, D=D, dt_bias=dt_bias), state


def naive_recurrence(x, dt, A, B, C, D, dt_bias, state=None, dt_limit=(0.0, float("inf"))):
    """One timestep and one head at a time, float64. Returns y (L, H, P) and the states after each step."""
    L, H, P = x.shape
    G, N = B.shape[1:]
    x, B, C = x.double(), B.double(), C.double()
    dt = F.softplus(dt.double() + dt_bias.double()).clamp(*dt_limit)
    s = torch.zeros(H, P, N, dtype=torch.float64) if state is None else state.double().clone()
    ys, states = torch.empty(L, H, P, dtype=torch.float64), []
    for t in range(L):
        for h in range(H):
            grp = h // (H // G)
            s[h] = torch.exp(dt[t, h] * A[h].double()) * s[h] + dt[t, h] * torch.outer(x[t, h], B[t, grp])
            ys[t, h] = s[h] @ C[t, grp] + D[h].double() * x[t, h]
        states.append(s.clone())
    return ys, torch.stack(states)


def check(actual, expected, tol):
    atol, rtol = tol
    torch.testing.assert_close(actual.double(), expected.double(), atol=atol, rtol=rtol)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "L{}-H{}-P{}-G{}-N{}-cs{}".format(*s))
@pytest.mark.parametrize("with_state", [False, True], ids=["fresh", "initial_state"])
def test_chunk_scan_equals_per_timestep_recurrence(dtype, shape, with_state):
    L, H, P, G, N, cs = shape
    inp, s0 = make_inputs(L, H, P, G, N, dtype, seed=1, with_state=with_state)
    y, final = ssd_chunk_scan(**inp, chunk_size=cs, initial_state=s0)
    y_ref, states_ref = naive_recurrence(**inp, state=s0)
    assert y.dtype == dtype and y.shape == (L, H, P)
    assert final.dtype == torch.float32 and final.shape == (H, P, N)
    check(y, y_ref, TOL[dtype])
    check(final, states_ref[-1], STATE_TOL)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("split", [1, 7, 8, 13, 36])
def test_chunk_scan_with_initial_state_equals_two_halves_in_sequence(dtype, split):
    """Scanning [0, split) then [split, L) from its final state gives the whole scan's y and state."""
    L, H, P, G, N, cs = 37, 4, 8, 2, 16, 8
    inp, s0 = make_inputs(L, H, P, G, N, dtype, seed=2)
    y, final = ssd_chunk_scan(**inp, chunk_size=cs, initial_state=s0)
    first = {k: (v[:split] if k in ("x", "dt", "B", "C") else v) for k, v in inp.items()}
    second = {k: (v[split:] if k in ("x", "dt", "B", "C") else v) for k, v in inp.items()}
    y1, mid = ssd_chunk_scan(**first, chunk_size=cs, initial_state=s0)
    y2, final2 = ssd_chunk_scan(**second, chunk_size=cs, initial_state=mid)
    check(torch.cat([y1, y2]), y, TOL[dtype])
    check(final2, final, STATE_TOL)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_chunk_scan_does_not_depend_on_chunk_size(dtype):
    L, H, P, G, N = 45, 4, 8, 2, 16
    inp, s0 = make_inputs(L, H, P, G, N, dtype, seed=3)
    y_ref, s_ref = ssd_chunk_scan(**inp, chunk_size=64, initial_state=s0)
    for cs in (1, 4, 7, 16):
        y, s = ssd_chunk_scan(**inp, chunk_size=cs, initial_state=s0)
        check(y, y_ref, TOL[dtype])
        check(s, s_ref, STATE_TOL)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES[:3], ids=lambda s: "L{}-H{}-P{}-G{}-N{}-cs{}".format(*s))
def test_state_update_equals_per_timestep_recurrence(dtype, shape):
    L, H, P, G, N, _ = shape
    T = min(L, 6)
    inp, s0 = make_inputs(T, H, P, G, N, dtype, seed=4)
    y, states = ssd_state_update(s0, **inp)
    y_ref, states_ref = naive_recurrence(**inp, state=s0)
    assert y.dtype == dtype and states.shape == (T, H, P, N) and states.dtype == torch.float32
    check(y, y_ref, TOL[dtype])
    check(states, states_ref, STATE_TOL)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("k", [0, 1, 3, 5])
def test_state_update_over_k_plus_1_positions_equals_k_plus_1_single_updates(dtype, k):
    """Verification's per-position states are exactly the states decode would have reached."""
    H, P, G, N = 6, 8, 3, 16
    inp, s0 = make_inputs(k + 1, H, P, G, N, dtype, seed=5)
    y, states = ssd_state_update(s0, **inp)
    s = s0
    for t in range(k + 1):
        step = {n: (v[t:t + 1] if n in ("x", "dt", "B", "C") else v) for n, v in inp.items()}
        y_t, s_t = ssd_state_update(s, **step)
        check(y[t], y_t[0], TOL[dtype])
        check(states[t], s_t[0], STATE_TOL)
        s = s_t[0]


def test_state_update_leaves_the_input_state_unchanged():
    inp, s0 = make_inputs(4, 4, 8, 2, 8, torch.float32, seed=6)
    before = s0.clone()
    ssd_state_update(s0, **inp)
    assert torch.equal(s0, before)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_chunk_scan_equals_recurrent_update(dtype):
    """Prefill (chunked) and decode (recurrent) formulations agree on y and the final state."""
    L, H, P, G, N, cs = 21, 4, 8, 2, 16, 8
    inp, s0 = make_inputs(L, H, P, G, N, dtype, seed=7)
    y_c, s_c = ssd_chunk_scan(**inp, chunk_size=cs, initial_state=s0)
    y_r, s_r = ssd_state_update(s0, **inp)
    check(y_c, y_r, TOL[dtype])
    check(s_c, s_r[-1], STATE_TOL)


@pytest.mark.parametrize("dt_limit", [(0.3, float("inf")), (0.0, 0.5), (0.2, 0.9)])
def test_dt_limit_clamps_the_softplus_time_step(dt_limit):
    L, H, P, G, N, cs = 19, 4, 8, 2, 8, 8
    inp, s0 = make_inputs(L, H, P, G, N, torch.float32, seed=8)
    y_ref, st_ref = naive_recurrence(**inp, state=s0, dt_limit=dt_limit)
    y_free, _ = naive_recurrence(**inp, state=s0)
    assert not torch.allclose(y_ref, y_free, atol=1e-3), "the limit must bind for this test to mean anything"
    y, s = ssd_chunk_scan(**inp, chunk_size=cs, initial_state=s0, dt_limit=dt_limit)
    check(y, y_ref, TOL[torch.float32])
    check(s, st_ref[-1], STATE_TOL)
    y_u, s_u = ssd_state_update(s0, **inp, dt_limit=dt_limit)
    check(y_u, y_ref, TOL[torch.float32])
    check(s_u, st_ref, STATE_TOL)
