"""Mamba-2 mixer over a ragged batch, with recurrent state kept in a MambaLayerCache slot per sequence."""
from __future__ import annotations

import torch
from torch import nn

from kernels import ops

from .batch import BatchLayout
from .cache import MambaLayerCache
from .config import ModelConfig
from .linear import Linear


# Prefill chunks of at most SHORT_CHUNK_MAX tokens run batched in the SSD dual form, whose (S, H, T, T)
# decay matrix is capped at SHORT_CHUNK_ELEMENTS floats per call; longer ones use the chunked scan.
SHORT_CHUNK_MAX = 64
SHORT_CHUNK_ELEMENTS = 1 << 22


class GatedRMSNorm(nn.Module):
    def __init__(self, dim: int, group_size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.group_size, self.eps = group_size, eps

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return ops.gated_rms_norm(x, z, self.weight, group_size=self.group_size, eps=self.eps)


class Mamba2Mixer(nn.Module):
    """in_proj -> [z | xBC | dt]; xBC -> causal conv + SiLU -> x, B, C; SSD; gated norm with z; out_proj.

    Parameter names follow the checkpoint (`backbone.layers.{i}.mixer.*`).
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        H, P, N, G = cfg.mamba_num_heads, cfg.mamba_head_dim, cfg.ssm_state_size, cfg.n_groups
        self.H, self.P, self.N, self.G = H, P, N, G
        self.in_proj = Linear(cfg.hidden_size, cfg.mamba_in_proj_dim)
        self.conv1d = nn.Conv1d(cfg.conv_dim, cfg.conv_dim, cfg.conv_kernel, groups=cfg.conv_dim,
                                bias=cfg.use_conv_bias)  # holds weight (C, 1, K) and bias; never called
        self.A_log = nn.Parameter(torch.log(torch.arange(1, H + 1, dtype=torch.float32)))
        self.D = nn.Parameter(torch.ones(H))
        self.dt_bias = nn.Parameter(torch.ones(H))
        self.norm = GatedRMSNorm(cfg.d_inner, cfg.d_inner // G, cfg.layer_norm_epsilon)
        self.out_proj = Linear(cfg.d_inner, cfg.hidden_size)
        self.short_chunk = min(cfg.chunk_size, SHORT_CHUNK_MAX)   # prefill chunks this short go batched

    def forward(self, h: torch.Tensor, batch: BatchLayout, cache: MambaLayerCache) -> torch.Tensor:
        """h (T, d) -> (T, d). Reads and advances each sequence's state slot (or its scratch)."""
        cfg = self.cfg
        zxbcdt = self.in_proj(h)                                             # (T, d_inner + conv_dim + H)
        z, xBC, dt = torch.split(zxbcdt, [cfg.d_inner, cfg.conv_dim, self.H], dim=-1)
        A = -torch.exp(self.A_log.float())                                   # (H,)
        D, dt_bias = self.D.float(), self.dt_bias.float()
        conv_w = self.conv1d.weight[:, 0, :]                                 # (C, K)
        y = torch.empty(h.shape[0], cfg.d_inner, dtype=h.dtype, device=h.device)
        if batch.slots is not None:                        # a CUDA-graph decode pass: slots on the device
            self._decode_rows(batch.slots, xBC, dt, A, D, dt_bias, conv_w, cache, y)
            return self.out_proj(self.norm(y, z))
        steps = [s for s in batch.seqs if s.num_tokens == 1 and not s.keep_states]
        if steps:                                          # decode steps of all sequences at once
            self._decode_steps(steps, xBC, dt, A, D, dt_bias, conv_w, cache, y)
        verifies: dict[int, list] = {}                     # verification passes, grouped by length
        for s in batch.seqs:
            if s.keep_states:
                verifies.setdefault(s.num_tokens, []).append(s)
        for group in verifies.values():
            self._verify(group, xBC, dt, A, D, dt_bias, conv_w, cache, y)
        short: dict[int, list] = {}                        # short prefill chunks, grouped by length
        for s in batch.seqs:
            if not s.keep_states and 1 < s.num_tokens <= self.short_chunk:
                short.setdefault(s.num_tokens, []).append(s)
        for group in short.values():
            per_call = max(1, SHORT_CHUNK_ELEMENTS // (self.H * group[0].num_tokens ** 2))
            for i in range(0, len(group), per_call):
                self._prefill_short(group[i:i + per_call], xBC, dt, A, D, dt_bias, conv_w, cache, y)
        longs = [s for s in batch.seqs                     # longer prefill chunks: one chunked scan for all
                 if not s.keep_states and s.num_tokens > 1 and s.num_tokens > self.short_chunk]
        if longs:
            dev, cu, xbcs = h.device, [0], []
            if ops.prefill_conv_batched(xBC):              # the Triton kernel: one call for all the chunks
                for s in longs:
                    cu.append(cu[-1] + s.num_tokens)
                xbcs = [self._prefill_conv(longs, cu, xBC, conv_w, cache)]
            else:
                for s in longs:                            # the conv per sequence (its own window)
                    xbc, conv_state = ops.causal_conv1d(xBC[s.offset:s.end], conv_w, self.conv1d.bias,
                                                        None if s.start_pos == 0 else cache.conv[s.mamba_slot])
                    cache.conv[s.mamba_slot] = conv_state.float()
                    xbcs.append(xbc)
                    cu.append(cu[-1] + s.num_tokens)
            one = len(longs) == 1
            x, B, C = self._split_xbc(xbcs[0] if len(xbcs) == 1 else torch.cat(xbcs))
            dts = dt[longs[0].offset:longs[0].end] if one else torch.cat([dt[s.offset:s.end] for s in longs])
            slots = torch.tensor([s.mamba_slot for s in longs], device=dev)
            fresh = [s.start_pos == 0 for s in longs]
            ssm0 = None                                    # all fresh: zeros
            if not all(fresh):
                ssm0 = cache.ssm.index_select(0, slots)
                if any(fresh):                             # a fresh sequence starts from zeros (no host sync)
                    keep = torch.tensor([not f for f in fresh], device=dev)
                    ssm0 = torch.where(keep[:, None, None, None], ssm0, 0.0)
            ys, ssm_states = ops.ssd_chunk_scan_varlen(
                x, dts, A, B, C, D, dt_bias, cu_seqlens=torch.tensor(cu, dtype=torch.int32, device=dev),
                chunk_size=cfg.chunk_size, initial_states=ssm0, dt_limit=cfg.time_step_limit)
            ys = ys.reshape(cu[-1], cfg.d_inner)
            for i, (s, lo) in enumerate(zip(longs, cu)):   # per slot (training backpropagates through these)
                cache.ssm[s.mamba_slot] = ssm_states[i]
                y[s.offset:s.end] = ys[lo:lo + s.num_tokens]
        return self.out_proj(self.norm(y, z))

    def _prefill_conv(self, seqs, cu, xBC, conv_w, cache: MambaLayerCache) -> torch.Tensor:
        """The conv of the prompt chunks `seqs` (rows cu[i]:cu[i+1] of the result) in one causal_conv1d_varlen
        call: windows gathered from the slots (zeros for a fresh sequence), the final ones written back."""
        dev = xBC.device
        slots = torch.tensor([s.mamba_slot for s in seqs], device=dev)
        fresh = [s.start_pos == 0 for s in seqs]
        conv0 = None                                       # all fresh: zeros
        if not all(fresh):
            conv0 = cache.conv.index_select(0, slots)      # (S, C, K-1)
            if any(fresh):
                keep = torch.tensor([not f for f in fresh], device=dev)
                conv0 = torch.where(keep[:, None, None], conv0, 0.0)
        xbc = (xBC[seqs[0].offset:seqs[0].end] if len(seqs) == 1     # (sum L, C)
               else torch.cat([xBC[s.offset:s.end] for s in seqs]))
        y, final = ops.causal_conv1d_varlen(xbc, conv_w, self.conv1d.bias,
                                            torch.tensor(cu, dtype=torch.int32, device=dev), conv0,
                                            max_seqlen=max(s.num_tokens for s in seqs))
        cache.conv.index_copy_(0, slots, final.float())
        return y

    def _decode_steps(self, steps, xBC, dt, A, D, dt_bias, conv_w, cache: MambaLayerCache, y) -> None:
        """One token of each sequence in `steps`: one batched update. The SSM states (the big tensor) are
        updated in place on the range of slots the steps span when it is dense enough (the allocator hands
        out the lowest free slot, so it usually is): no gather, no scatter; otherwise gathered and scattered."""
        for s in steps:
            if s.start_pos == 0:
                cache.reset(s.mamba_slot)                  # a one-token prompt starts from zeros
        n, dev = len(steps), xBC.device
        slot_ids = [s.mamba_slot for s in steps]
        if ops.mamba_decode_(cache.conv, cache.ssm, slot_ids, [s.offset for s in steps], xBC, dt, conv_w,
                             self.conv1d.bias, A, D, dt_bias, y, dt_limit=self.cfg.time_step_limit):
            return                                         # one fused call, in place on the slots
        rows = torch.tensor([s.offset for s in steps], device=dev)
        slots = torch.tensor(slot_ids, device=dev)
        lo, hi = min(slot_ids), max(slot_ids) + 1
        dense = slot_ids == list(range(lo, hi))            # slots lo..hi-1 in batch order: views, in place
        conv = cache.conv[lo:hi] if dense else cache.conv.index_select(0, slots)
        xbc = ops.conv_step_(conv, xBC.index_select(0, rows), conv_w, self.conv1d.bias)
        if not dense:
            cache.conv.index_copy_(0, slots, conv)
        x, B, C = self._split_xbc(xbc)
        dts = dt.index_select(0, rows)
        if dense:
            ys = ops.ssd_update_(cache.ssm[lo:hi], x, dts, A, B, C, D, dt_bias, dt_limit=self.cfg.time_step_limit)
        elif hi - lo > 2 * n:                              # sparse slots: gather, update, scatter
            state = cache.ssm.index_select(0, slots)
            ys = ops.ssd_update_(state, x, dts, A, B, C, D, dt_bias, dt_limit=self.cfg.time_step_limit)
            cache.ssm.index_copy_(0, slots, state)
        else:                                              # the slot range, holes left bit-exact (live=False)
            span, pos = hi - lo, slots - lo
            live = torch.zeros(span, dtype=torch.bool, device=dev).index_fill_(0, pos, True)

            def spread(t):                                 # (n, ...) -> (span, ...) by slot
                return t.new_zeros(span, *t.shape[1:]).index_copy_(0, pos, t)
            ys = ops.ssd_update_(cache.ssm[lo:hi], spread(x), spread(dts), A, spread(B), spread(C), D, dt_bias,
                                 dt_limit=self.cfg.time_step_limit, live=live).index_select(0, pos)
        y.index_copy_(0, rows, ys.reshape(n, self.cfg.d_inner).to(y.dtype))

    def _decode_rows(self, slots: torch.Tensor, xBC, dt, A, D, dt_bias, conv_w, cache: MambaLayerCache, y) -> None:
        """Row r: one decode token of the sequence in slot slots[r] (n,) int64 on the device. The same kernels
        as _decode_steps' gather-and-scatter path, with nothing decided on the host, so that a CUDA graph
        can record it; rows sharing a slot (cuda_graphs.py's padding, all on its scratch slot) write it in
        any order."""
        n = xBC.shape[0]
        conv = cache.conv.index_select(0, slots)                            # (n, C, K-1)
        xbc = ops.conv_step_(conv, xBC.contiguous(), conv_w, self.conv1d.bias)
        cache.conv.index_copy_(0, slots, conv)
        x, B, C = self._split_xbc(xbc)
        state = cache.ssm.index_select(0, slots)                            # (n, H, P, N)
        ys = ops.ssd_update_(state, x, dt.contiguous(), A, B, C, D, dt_bias, dt_limit=self.cfg.time_step_limit)
        cache.ssm.index_copy_(0, slots, state)
        y.copy_(ys.reshape(n, self.cfg.d_inner))

    def _prefill_short(self, seqs, xBC, dt, A, D, dt_bias, conv_w, cache: MambaLayerCache, y) -> None:
        """Prompt chunks of the same length T <= short_chunk of several sequences at once: the chunk in the
        SSD dual form (ssd_verify: all T outputs from C.B within the chunk plus the starting state), then
        the state after its last position (ssd_state_at) written to each slot. At these lengths one
        batched pass costs what one sequence's chunked scan (kernels/reference) does."""
        S, T = len(seqs), seqs[0].num_tokens
        dev = xBC.device
        rows = torch.tensor([s.offset + t for s in seqs for t in range(T)], device=dev)
        slots = torch.tensor([s.mamba_slot for s in seqs], device=dev)
        fresh = [s.start_pos == 0 for s in seqs]
        conv0 = None if all(fresh) else cache.conv.index_select(0, slots)
        ssm0 = None if all(fresh) else cache.ssm.index_select(0, slots)
        if conv0 is not None and any(fresh):               # a fresh sequence starts from zeros
            keep = torch.tensor([not f for f in fresh], device=dev, dtype=conv0.dtype)
            conv0.mul_(keep[:, None, None])
            ssm0.mul_(keep[:, None, None, None])
        xbc, conv_states = ops.causal_conv1d_update(xBC.index_select(0, rows).view(S, T, -1), conv0, conv_w,
                                                    self.conv1d.bias)
        x, B, C = self._split_xbc(xbc.reshape(S * T, -1))
        x, B, C = x.view(S, T, self.H, self.P), B.view(S, T, self.G, self.N), C.view(S, T, self.G, self.N)
        ys, cum, dtx = ops.ssd_verify(ssm0, x, dt.index_select(0, rows).view(S, T, -1), A, B, C, D, dt_bias,
                                      dt_limit=self.cfg.time_step_limit)
        last = torch.full((S,), T - 1, dtype=torch.long, device=dev)
        cache.ssm.index_copy_(0, slots, ops.ssd_state_at(ssm0, cum, dtx, B, last))
        cache.conv.index_copy_(0, slots, conv_states[:, T - 1].float())
        y.index_copy_(0, rows, ys.reshape(S * T, self.cfg.d_inner).to(y.dtype))

    def _verify(self, seqs, xBC, dt, A, D, dt_bias, conv_w, cache: MambaLayerCache, y) -> None:
        """T tokens of each sequence in `seqs` (same T) under verification: outputs now, and scratch
        from which the next pass's commit builds the accepted position's state; the slots' states stay."""
        S, T = len(seqs), seqs[0].num_tokens
        for s in seqs:
            if s.start_pos == 0:
                cache.reset(s.mamba_slot)                  # commit builds on the slot's state
        slot_ids = [s.mamba_slot for s in seqs]
        if ops.mamba_verify_(cache.conv, cache.ssm, cache.scratch, slot_ids, [s.offset for s in seqs], T, xBC, dt,
                             conv_w, self.conv1d.bias, A, D, dt_bias, y, dt_limit=self.cfg.time_step_limit):
            cache.mark_kept(slot_ids, T)                   # one fused call wrote outputs and scratch
            return
        if S == 1:                                         # one sequence: rows and slot as views, no gathers
            rows, slots = slice(seqs[0].offset, seqs[0].end), slice(seqs[0].mamba_slot, seqs[0].mamba_slot + 1)
        else:
            rows = torch.tensor([s.offset + t for s in seqs for t in range(T)], device=xBC.device)
            slots = torch.tensor([s.mamba_slot for s in seqs], device=xBC.device)
        xbc, conv_states = ops.causal_conv1d_update(xBC[rows].reshape(S, T, -1), cache.conv[slots], conv_w,
                                                    self.conv1d.bias)
        x, B, C = self._split_xbc(xbc.reshape(S * T, -1))
        x, B, C = x.view(S, T, self.H, self.P), B.view(S, T, self.G, self.N), C.view(S, T, self.G, self.N)
        ys, cum, dtx = ops.ssd_verify(cache.ssm[slots], x, dt[rows].reshape(S, T, -1), A, B, C, D, dt_bias,
                                      dt_limit=self.cfg.time_step_limit)
        cache.keep(slots, conv_states, cum, dtx, B)
        if S == 1:
            y[rows].view(1, T, self.H, self.P).copy_(ys)
        else:
            y[rows] = ys.reshape(S * T, self.cfg.d_inner).to(y.dtype)

    def _split_xbc(self, xbc: torch.Tensor):
        """(T, conv_dim) -> x (T, H, P), B (T, G, N), C (T, G, N)."""
        T = xbc.shape[0]
        GN = self.G * self.N
        x, B, C = torch.split(xbc, [self.H * self.P, GN, GN], dim=-1)
        return x.reshape(T, self.H, self.P), B.reshape(T, self.G, self.N), C.reshape(T, self.G, self.N)
