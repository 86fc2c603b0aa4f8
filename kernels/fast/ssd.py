"""Mamba-2 SSD for decoding, batched over sequences: one step of S sequences, and verification of T = k+1
positions of S sequences that never materialises the T intermediate states. Reference: kernels/reference/ssd.py
(ssd_state_update returns all T states; these three functions together give the same numbers).

Shapes, per sequence (a leading S on each): state (H, P, N) float32 (None: all fresh, zeros); x (T, H, P); dt (T, H);
A, D, dt_bias (H,) float32; B, C (T, G, N), each group shared by R = H / G consecutive heads.
    dt_t        = softplus(dt_t + dt_bias), clamped to dt_limit
    cum[t]      = sum_{i<=t} dt_i A                     (H, T)   log-decay since the pass began
    state_t     = exp(cum[t]) state + sum_{j<=t} exp(cum[t] - cum[j]) dt_j x_j B_j^T
    y_t         = state_t C_t + D x_t
Verification needs every y_t but, once the accepted count is known, only one state_t: ssd_verify
computes the y_t in the "dual" (attention-like) form, from C_t.B_j and the pass's initial state, and
returns (cum, dt x) so that ssd_state_at (a batch of sequences) or ssd_advance_ (one sequence, every layer
at once, in place) can build the one state that is committed. cum is
non-increasing (A < 0, dt > 0), so every exponent taken below is <= 0.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

_UPPER: dict[tuple[int, torch.device], torch.Tensor] = {}


def _strict_upper(T: int, device: torch.device) -> torch.Tensor:
    """(T, T) bool, True where j > t: the entries masked out of the decay matrix (cached per T, device)."""
    key = (T, device)
    if key not in _UPPER:
        _UPPER[key] = torch.ones(T, T, dtype=torch.bool, device=device).triu(1)
    return _UPPER[key]


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
    new = x.new_zeros(S, H, P, B.shape[2], dtype=torch.float32) if state is None else state.float().clone()
    return ssd_update_(new, x, dt, A, B, C, D, dt_bias, dt_limit=dt_limit), new


def ssd_update_(state, x, dt, A, B, C, D, dt_bias, *, dt_limit=(0.0, float("inf")), live=None):
    """ssd_step in place: state (S, H, P, N) float32, contiguous (a range of cache slots, no copy) is
    advanced one position per row; returns y (S, H, P) in x's dtype. Three passes over the state
    (decay, += dt x B^T as a broadcast multiply-add, y = state C) instead of five with gather and scatter.

    live (S,) bool or None: rows where it is False keep their state bit for bit (their dt is taken as 0:
    decay exp(0) = 1, update 0), so a caller can step a range of slots that has holes in it."""
    S, H, P = x.shape
    G, N = B.shape[1], B.shape[2]
    R = H // G
    dt = _prep_dt(dt, dt_bias, dt_limit)                                        # (S, H)
    if live is not None:
        dt = dt * live[:, None]
    state.mul_((dt * A).exp()[..., None, None])                                 # (S, H, P, N) *= decay
    xf = x.float()
    flat = state.view(S * G, R * P, N)
    flat.addcmul_((dt[..., None] * xf).view(S * G, R * P, 1), B.float().reshape(S * G, 1, N))   # += dt x B^T
    # y = state C as (1, N) @ (N, R*P) per (sequence, group): MKL runs this layout of the batched GEMV
    # 3x faster than state @ C as a column (the state is read once either way).
    y = torch.bmm(C.float().reshape(S * G, 1, N), flat.transpose(1, 2)).view(S, H, P)
    return y.add_(xf * D[:, None]).to(x.dtype)


def ssd_verify(state, x, dt, A, B, C, D, dt_bias, *, dt_limit=(0.0, float("inf"))):
    """T positions of each of S sequences from `state` (S, H, P, N) or None (all fresh), not modified.
    x (S, T, H, P); dt (S, T, H); B, C (S, T, G, N). Returns y (S, T, H, P) in x's dtype (a view),
    and, heads-major and float32, cum (S, H, T) and dtx = dt x (S, H, T, P): with B they determine every
    intermediate state (ssd_state_at, ssd_advance_). Products are 3-D bmm over (sequence, head or group)
    with the layouts prepared once: at T = 4 torch.matmul's broadcasting costs more copies than the math."""
    S, T, H, P = x.shape
    G, N = B.shape[2], B.shape[3]
    R = H // G
    dtT = _prep_dt(dt, dt_bias, dt_limit).transpose(1, 2)              # (S, H, T)
    cum = (dtT * A[:, None]).cumsum(-1)                                 # (S, H, T)
    decay = (cum[..., :, None] - cum[..., None, :]).masked_fill_(_strict_upper(T, x.device), float("-inf")).exp_()
    xT = x.float().transpose(1, 2)                                      # (S, H, T, P) view; decay (S, H, t, j)
    dtx = torch.mul(xT, dtT[..., None], out=torch.empty(S, H, T, P, device=x.device))
    Cg = C.float().permute(0, 2, 1, 3).reshape(S * G, T, N)
    CB = torch.bmm(Cg, B.float().permute(0, 2, 3, 1).reshape(S * G, N, T))   # (S*G, T, T): C_t . B_j
    M = decay.view(S, G, R, T, T).mul_(CB.view(S, G, 1, T, T))
    y = torch.bmm(M.view(S * H, T, T), dtx.view(S * H, T, P)).view(S, H, T, P)   # from this pass
    if state is not None:                                               # + exp(cum_t) state C_t
        from_state = torch.bmm(state.reshape(S * G, R * P, N), Cg.transpose(1, 2))   # (S*G, R*P, T)
        y.addcmul_(from_state.view(S, H, P, T).transpose(-1, -2), cum.exp()[..., None])
    y.addcmul_(xT, D[:, None, None])
    return y.transpose(1, 2).to(x.dtype), cum, dtx


def ssd_state_at(state, cum, dtx, B, index: torch.Tensor):
    """The state after position index[s] of each sequence's verified pass. state (S, H, P, N) or None:
    the states the pass started from; cum (S, H, T), dtx (S, H, T, P) from ssd_verify; B (S, T, G, N)
    what it saw; index (S,) int64. Returns (S, H, P, N) float32."""
    S, H, T, P = dtx.shape
    G, N = B.shape[2], B.shape[3]
    R = H // G
    last = cum.gather(2, index.view(S, 1, 1).expand(S, H, 1))          # (S, H, 1) log-decay at index
    after = torch.arange(T, device=cum.device)[None, :] > index[:, None]   # (S, T) positions not taken
    w = (last - cum).masked_fill_(after[:, None], float("-inf")).exp_()    # (S, H, T) decay from j to index
    u = (dtx * w[..., None]).view(S, G, R, T, P).transpose(-1, -2).reshape(S * G, R * P, T)
    new = torch.bmm(u, B.float().transpose(1, 2).reshape(S * G, T, N)).view(S, H, P, N)
    if state is not None:
        new = new + last.view(S, H, 1, 1).exp() * state
    return new


def ssd_advance_(state, cum, dtx, B, index: int) -> None:
    """In place, one sequence: state (L, H, P, N) float32, a stack of L states (e.g. every Mamba layer of
    a stage; any strides that view as (L, G, R*P, N)) becomes the state after position `index` of the
    verified pass; cum (L, H, T), dtx (L, H, T, P), B (L, T, G, N) are what ssd_verify returned/saw.
    The same numbers as ssd_state_at, in ~8 ops over the stack and without copying the states: the commit
    after every verification pass at one sequence."""
    L, H, P, N = state.shape
    G = B.shape[2]
    R, n = H // G, index + 1
    last = cum[..., index]                                               # (L, H) log-decay at index
    w = (last[..., None] - cum[..., :n]).exp_()                          # (L, H, n) decay from j to index
    u = (dtx[:, :, :n] * w[..., None]).view(L, G, R, n, P).transpose(-1, -2).reshape(L, G, R * P, n)
    state.mul_(last.exp()[:, :, None, None])
    state.view(L, G, R * P, N).add_(torch.matmul(u, B[:, :n].float().transpose(1, 2)))   # + sum_j u_j B_j^T
