"""Mamba-2 SSD: chunked scan for whole sequences and a recurrent update over 1..k+1 positions.

Shapes (one sequence; the model loops over sequences of a ragged batch):
  x  (L, H, P)   inputs per head, P = head_dim
  dt (L, H)      raw time steps (before dt_bias and softplus)
  A  (H,)        negative decay rates, A = -exp(A_log)
  B, C (L, G, N) input/output projections shared by H/G heads each, N = d_state
  D  (H,)        skip
  state (H, P, N) float32 recurrent state
The math (per head h, time t): dA = exp(dt*A); state = dA*state + dt * x ⊗ B; y = state·C + D*x.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _prep_dt(dt: torch.Tensor, dt_bias: torch.Tensor, dt_limit: tuple[float, float]) -> torch.Tensor:
    dt = F.softplus(dt.float() + dt_bias.float())
    lo, hi = dt_limit
    if lo > 0.0 or hi != float("inf"):
        dt = dt.clamp(lo, hi)
    return dt


def _segsum(x: torch.Tensor) -> torch.Tensor:
    """Stable segment sums: out[..., i, j] = sum(x[..., j+1:i+1]) for j <= i, -inf above the diagonal."""
    T = x.size(-1)
    x = x[..., None].expand(*x.shape, T)
    mask = torch.tril(torch.ones(T, T, dtype=torch.bool, device=x.device), diagonal=-1)
    x = x.masked_fill(~mask, 0)
    out = torch.cumsum(x, dim=-2)
    mask = torch.tril(torch.ones(T, T, dtype=torch.bool, device=x.device), diagonal=0)
    return out.masked_fill(~mask, float("-inf"))


def ssd_chunk_scan(x, dt, A, B, C, D, dt_bias, *, chunk_size: int, initial_state=None,
                   dt_limit=(0.0, float("inf"))):
    """Whole-sequence SSD in chunks (the ssd_minimal algorithm). Returns y (L, H, P) and the final state.

    Computes in float32; y is returned in x's dtype.
    """
    L, H, P = x.shape
    G, N = B.shape[1], B.shape[2]
    dtype = x.dtype
    dt = _prep_dt(dt, dt_bias, dt_limit)                       # (L, H)
    rep = H // G
    Bh = B.float().repeat_interleave(rep, dim=1)                # (L, H, N)
    Ch = C.float().repeat_interleave(rep, dim=1)                # (L, H, N)
    xf = x.float()
    pad = (-L) % chunk_size
    if pad:
        xf, Bh, Ch = (F.pad(t, (0, 0, 0, 0, 0, pad)) for t in (xf, Bh, Ch))
        dt = F.pad(dt, (0, 0, 0, pad))
    nc = (L + pad) // chunk_size
    Xd = (xf * dt[..., None]).view(nc, chunk_size, H, P)        # x*dt, chunked
    Ad = (dt * A.float()[None]).view(nc, chunk_size, H).permute(2, 0, 1)  # (H, nc, cs)
    Bc = Bh.view(nc, chunk_size, H, N)
    Cc = Ch.view(nc, chunk_size, H, N)
    A_cum = torch.cumsum(Ad, dim=-1)                            # (H, nc, cs)

    # 1. Within-chunk outputs (diagonal blocks).
    Lmat = torch.exp(_segsum(Ad))                               # (H, nc, cs, cs)
    Y_diag = torch.einsum("clhn,cshn,hcls,cshp->clhp", Cc, Bc, Lmat, Xd)
    # 2. State at the end of each chunk from that chunk's inputs alone.
    decay_states = torch.exp(A_cum[..., -1:] - A_cum)           # (H, nc, cs)
    states = torch.einsum("clhn,hcl,clhp->chpn", Bc, decay_states, Xd)  # (nc, H, P, N)
    # 3. Carry states across chunk boundaries, starting from the initial state.
    if initial_state is None:
        initial_state = torch.zeros(H, P, N, dtype=torch.float32, device=x.device)
    states = torch.cat([initial_state.float()[None], states], dim=0)    # (nc+1, H, P, N)
    chunk_decay = torch.exp(_segsum(F.pad(A_cum[..., -1], (1, 0))))    # (H, nc+1, nc+1)
    new_states = torch.einsum("hzc,chpn->zhpn", chunk_decay, states)
    states, final_state = new_states[:-1], new_states[-1]
    # 4. Contribution of the carried-in state to each position.
    state_decay_out = torch.exp(A_cum)                          # (H, nc, cs)
    Y_off = torch.einsum("clhn,chpn,hcl->clhp", Cc, states, state_decay_out)
    y = (Y_diag + Y_off).reshape(nc * chunk_size, H, P)[:L]
    y = y + x.float() * D.float()[None, :, None]
    return y.to(dtype), final_state


def ssd_state_update(state, x, dt, A, B, C, D, dt_bias, *, dt_limit=(0.0, float("inf"))):
    """Recurrent SSD over T positions (T = 1 for decode, k+1 for verification).

    state (H, P, N) float32 is not modified. Returns y (T, H, P) and the state after each position,
    states (T, H, P, N), so that verification can commit any accepted position.
    All T states at once (T is small): s_t = exp(sum_{i<=t} dt_i A) s_0 + sum_{j<=t} L[t, j] dt_j x_j B_j^T
    with L[t, j] = exp(sum_{j<i<=t} dt_i A), the same segment sums as the chunked scan.
    """
    T, H, P = x.shape
    G = B.shape[1]
    rep = H // G
    dt = _prep_dt(dt, dt_bias, dt_limit)                        # (T, H)
    Bh = B.float().repeat_interleave(rep, dim=1)                # (T, H, N)
    Ch = C.float().repeat_interleave(rep, dim=1)
    xf = x.float()
    if T == 1:                                                  # decode: the recurrence itself, cheapest
        s = state.float() * torch.exp(dt[0] * A.float())[:, None, None] \
            + (dt[0][:, None] * xf[0])[..., None] * Bh[0][:, None, :]
        y = torch.einsum("hpn,hn->hp", s, Ch[0]) + D.float()[:, None] * xf[0]
        return y[None].to(x.dtype), s[None]
    dAt = (dt * A.float()[None]).t()                            # (H, T) log-decay per step
    L = torch.exp(_segsum(dAt))                                 # (H, T, T) decay from j to t
    decay0 = torch.exp(torch.cumsum(dAt, dim=-1))               # (H, T) decay of the initial state
    dBx = torch.einsum("jh,jhp,jhn->jhpn", dt, xf, Bh)          # (T, H, P, N) each step's input
    states = (torch.einsum("htj,jhpn->thpn", L, dBx)
              + decay0.t()[:, :, None, None] * state.float()[None])
    y = torch.einsum("thpn,thn->thp", states, Ch) + D.float()[None, :, None] * xf
    return y.to(x.dtype), states


def ssd_chunk_scan_varlen(x, dt, A, B, C, D, dt_bias, *, cu_seqlens, chunk_size: int, initial_states=None,
                          dt_limit=(0.0, float("inf"))):
    """ssd_chunk_scan over S sequences packed in one flat batch: sequence s is rows
    cu_seqlens[s]:cu_seqlens[s+1]; its chunks start at its own first row.

    Shapes (T = T_total, the sum of the lengths):
      x (T, H, P); dt (T, H); B, C (T, G, N); A, D, dt_bias (H,)
      cu_seqlens (S+1,) int, cu_seqlens[0] = 0, cu_seqlens[S] = T, non-decreasing (empty sequences allowed)
      initial_states (S, H, P, N) float32, or None (every sequence starts from zeros)
    Returns y (T, H, P) in x's dtype and the final states (S, H, P, N) float32 (an empty sequence's:
    its initial state). The definition: one ssd_chunk_scan per sequence.
    """
    T, H, P = x.shape
    N = B.shape[2]
    cu = [int(v) for v in cu_seqlens.tolist()]
    S = len(cu) - 1
    assert S >= 0 and cu[0] == 0 and cu[-1] == T and all(a <= b for a, b in zip(cu, cu[1:])), cu
    y = torch.empty_like(x)
    finals = torch.empty(S, H, P, N, dtype=torch.float32, device=x.device)
    for s in range(S):
        lo, hi = cu[s], cu[s + 1]
        init = None if initial_states is None else initial_states[s]
        if hi == lo:
            finals[s] = 0.0 if init is None else init.float()
            continue
        ys, fin = ssd_chunk_scan(x[lo:hi], dt[lo:hi], A, B[lo:hi], C[lo:hi], D, dt_bias, chunk_size=chunk_size,
                                 initial_state=init, dt_limit=dt_limit)
        y[lo:hi] = ys
        finals[s] = fin
    return y, finals
