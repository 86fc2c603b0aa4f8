"""Mamba-2 SSD for decoding: one step of many sequences at once, and verification of T = k+1 positions
of one sequence that never materialises the T intermediate states. Reference: kernels/reference/ssd.py
(ssd_state_update returns all T states; these three functions together give the same numbers).

Shapes (verification, one sequence): state (H, P, N) float32, or None for a fresh sequence (zeros);
x (T, H, P); dt (T, H);
A, D, dt_bias (H,) float32; B, C (T, G, N), each group shared by R = H / G consecutive heads.
    dt_t        = softplus(dt_t + dt_bias), clamped to dt_limit
    cum[t]      = sum_{i<=t} dt_i A                     (T, H)   log-decay since the pass began
    state_t     = exp(cum[t]) state + sum_{j<=t} exp(cum[t] - cum[j]) dt_j x_j B_j^T
    y_t         = state_t C_t + D x_t
Verification needs every y_t but, once the accepted count is known, only one state_t: ssd_verify
computes the y_t in the "dual" (attention-like) form, from C_t.B_j and the pass's initial state, and
returns (cum, dt x) so that ssd_state_at can build the one state that is committed. cum is
non-increasing (A < 0, dt > 0), so every exponent taken below is <= 0.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

_UPPER: dict[int, torch.Tensor] = {}


def _strict_upper(T: int) -> torch.Tensor:
    """(T, T) bool, True where j > t: the entries masked out of the decay matrix."""
    if T not in _UPPER:
        _UPPER[T] = torch.ones(T, T, dtype=torch.bool).triu(1)
    return _UPPER[T]


def _prep_dt(dt, dt_bias, dt_limit):
    dt = F.softplus(dt.float() + dt_bias)
    lo, hi = dt_limit
    if lo > 0.0 or hi != float("inf"):
        dt = dt.clamp(lo, hi)
    return dt


def ssd_step(state, x, dt, A, B, C, D, dt_bias, *, dt_limit=(0.0, float("inf"))):
    """One position of each of S sequences (batched decode): state (S, H, P, N) or None (all fresh),
    x (S, H, P), dt (S, H), B, C (S, G, N). Returns y (S, H, P) in x's dtype, new states (S, H, P, N)."""
    S, H, P = x.shape
    G, N = B.shape[1], B.shape[2]
    R = H // G
    dt = _prep_dt(dt, dt_bias, dt_limit).view(S, G, R)
    xf = x.float().view(S, G, R, P)
    new = (dt[..., None] * xf)[..., None] * B.float().view(S, G, 1, 1, N)        # (S, G, R, P, N) dt x B^T
    if state is not None:
        new = new + (dt * A.view(G, R)).exp()[..., None, None] * state.view(S, G, R, P, N)
    y = torch.matmul(new, C.float().view(S, G, 1, N, 1)).view(S, H, P) + D[:, None] * xf.view(S, H, P)
    return y.to(x.dtype), new.view(S, H, P, N)


def ssd_verify(state, x, dt, A, B, C, D, dt_bias, *, dt_limit=(0.0, float("inf"))):
    """T positions from `state` (not modified). Returns y (T, H, P) in x's dtype, cum (T, H) and
    dtx = dt x (T, H, P), float32: with B they determine every intermediate state (ssd_state_at)."""
    T, H, P = x.shape
    G, N = B.shape[1], B.shape[2]
    R = H // G
    dt = _prep_dt(dt, dt_bias, dt_limit)                                # (T, H)
    cum = (dt * A).cumsum(0)                                            # (T, H)
    decay = (cum[:, None] - cum[None]).masked_fill_(_strict_upper(T)[..., None], float("-inf")).exp_()  # (t, j, H)
    xf = x.float()
    dtx = xf * dt[..., None]                                            # (T, H, P)
    Cf = C.float()
    CB = torch.einsum("tgn,jgn->gtj", Cf, B.float())                   # (G, T, T)
    M = decay.permute(2, 0, 1).reshape(G, R, T, T) * CB[:, None]       # (G, R, t, j)
    y = torch.matmul(M, dtx.permute(1, 0, 2).reshape(G, R, T, P))       # (G, R, T, P) from this pass's inputs
    if state is not None:                                               # + exp(cum_t) state C_t
        from_state = torch.matmul(state.view(G, R, P, N), Cf.permute(1, 2, 0)[:, None])  # (G, R, P, T)
        y = y + from_state.transpose(-1, -2) * cum.exp().t().reshape(G, R, T, 1)
    y = y.reshape(H, T, P).transpose(0, 1) + xf * D[:, None]
    return y.to(x.dtype), cum, dtx


def ssd_state_at(state, cum, dtx, B, index: int):
    """The state after position `index` of a verified pass: state (H, P, N) or None is the state the
    pass started from, cum (T, H), dtx (T, H, P), B (T, G, N) what ssd_verify saw. Returns (H, P, N)."""
    _, H, P = dtx.shape
    G, N = B.shape[1], B.shape[2]
    R = H // G
    c = cum[:index + 1]                                                 # (J, H)
    w = (c[-1] - c).exp()                                               # (J, H) decay from j to index
    u = (dtx[:index + 1] * w[..., None]).permute(1, 2, 0).reshape(G, R, P, index + 1)
    new = torch.matmul(u, B[:index + 1].float().permute(1, 0, 2)[:, None])   # (G, R, P, N)
    new = new.reshape(H, P, N)
    if state is not None:
        new = new + c[-1].exp()[:, None, None] * state
    return new
