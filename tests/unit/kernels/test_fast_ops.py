"""The CPU fast paths (kernels/fast/) give the references' numbers (kernels/reference/).

Each fast op is a rewrite of its reference with fewer torch calls, so it is checked against that
reference on random inputs (fresh seeds, values pushed away from zero) in every dtype the model runs
in. Tolerances are per dtype: the two compute the same float32 math in a different order, and in
16-bit dtypes both round their outputs. The references themselves are checked against naive float64
formulations in the neighbouring test files.
"""
from __future__ import annotations

import pytest
import torch

from kernels.fast import attention as fast_attn
from kernels.fast import conv1d as fast_conv
from kernels.fast import linear as fast_linear
from kernels.fast import moe as fast_moe
from kernels.fast import norm as fast_norm
from kernels.fast import ssd as fast_ssd
from kernels.reference import attention as ref_attn
from kernels.reference import conv1d as ref_conv
from kernels.reference import moe as ref_moe
from kernels.reference import norm as ref_norm
from kernels.reference import ssd as ref_ssd

TOL = {  # (atol, rtol) of fast against reference
    torch.float32: (2e-5, 2e-5),
    torch.bfloat16: (3e-2, 2e-2),
    torch.float16: (3e-3, 3e-3),
}
DTYPES = list(TOL)
STATE_TOL = (1e-4, 1e-4)                # float32 states, summed in another order


def _nonzero(t: torch.Tensor, floor: float = 1e-2) -> torch.Tensor:
    return torch.where(t >= 0, t.clamp_min(floor), t.clamp_max(-floor))


def _rand(g, *shape, scale=1.0):
    return _nonzero(torch.randn(*shape, generator=g) * scale)


def _close(a, b, dtype):
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(a.float(), b.float(), atol=atol, rtol=rtol)


# ---- SSD: decode step, verification, state at the accepted position -------------------------------
def _ssd_inputs(T, H, P, G, N, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    A = -torch.exp(torch.empty(H).uniform_(-3.0, 1.5, generator=g))
    args = dict(x=_rand(g, T, H, P).to(dtype), dt=_rand(g, T, H, scale=0.5).to(dtype), A=A,
                B=_rand(g, T, G, N).to(dtype), C=_rand(g, T, G, N).to(dtype), D=_rand(g, H),
                dt_bias=_nonzero(torch.rand(H, generator=g) * 2 - 1.5))
    return args, _rand(g, H, P, N)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("H,P,G,N", [(8, 16, 2, 8), (6, 4, 3, 8), (4, 8, 1, 16)])
@pytest.mark.parametrize("fresh", [False, True])
@pytest.mark.parametrize("dt_limit", [(0.0, float("inf")), (0.05, 0.8)])
def test_batched_ssd_step_is_the_reference_update_of_each_sequence(dtype, H, P, G, N, fresh, dt_limit):
    """S sequences, one token each, in one call: sequence i gets what the reference gives it alone."""
    S = 3
    seqs = [_ssd_inputs(1, H, P, G, N, dtype, seed=hash((H, G, fresh, i)) % 1000) for i in range(S)]
    cat = {name: torch.cat([a[name] for a, _ in seqs]) for name in ("x", "dt", "B", "C")}
    shared = {name: seqs[0][0][name] for name in ("A", "D", "dt_bias")}
    states = None if fresh else torch.stack([st for _, st in seqs])
    y, new = fast_ssd.ssd_step(states, **cat, **shared, dt_limit=dt_limit)
    for i, (args, state) in enumerate(seqs):
        args = {**args, **shared}
        y_ref, states_ref = ref_ssd.ssd_state_update(torch.zeros_like(state) if fresh else state, **args,
                                                     dt_limit=dt_limit)
        _close(y[i:i + 1], y_ref, dtype)
        torch.testing.assert_close(new[i], states_ref[0], atol=STATE_TOL[0], rtol=STATE_TOL[1])


@pytest.mark.parametrize("dtype", DTYPES)
def test_in_place_ssd_update_steps_live_rows_and_leaves_the_others_bit_for_bit(dtype):
    """ssd_update_ on a range of slots with holes: live rows get ssd_step's state and y, the rest keep theirs."""
    H, P, G, N, S = 8, 16, 2, 8, 5
    seqs = [_ssd_inputs(1, H, P, G, N, dtype, seed=70 + i) for i in range(S)]
    cat = {name: torch.cat([a[name] for a, _ in seqs]) for name in ("x", "dt", "B", "C")}
    shared = {name: seqs[0][0][name] for name in ("A", "D", "dt_bias")}
    states = torch.stack([st for _, st in seqs])
    live = torch.tensor([True, False, True, True, False])
    y_step, new_step = fast_ssd.ssd_step(states, **cat, **shared)
    inplace = states.clone()
    y = fast_ssd.ssd_update_(inplace, **cat, **shared, live=live)
    for i in range(S):
        if live[i]:
            _close(y[i:i + 1], y_step[i:i + 1], dtype)
            torch.testing.assert_close(inplace[i], new_step[i], atol=STATE_TOL[0], rtol=STATE_TOL[1])
        else:
            assert torch.equal(inplace[i], states[i])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T", [1, 2, 4, 5])
@pytest.mark.parametrize("H,P,G,N", [(8, 16, 2, 8), (6, 4, 3, 8), (4, 8, 1, 16)])
@pytest.mark.parametrize("fresh", [False, True])
def test_ssd_verify_outputs_and_every_committable_state_match_the_reference(dtype, T, H, P, G, N, fresh):
    """S sequences verified in one call; any mix of accepted positions is committed in one call."""
    S = 3
    seqs = [_ssd_inputs(T, H, P, G, N, dtype, seed=T * 31 + H + 7 * i) for i in range(S)]
    stack = {name: torch.stack([a[name] for a, _ in seqs]) for name in ("x", "dt", "B", "C")}
    shared = {name: seqs[0][0][name] for name in ("A", "D", "dt_bias")}
    s0 = None if fresh else torch.stack([st for _, st in seqs])
    y, cum, dtx = fast_ssd.ssd_verify(s0, **stack, **shared)
    refs = [ref_ssd.ssd_state_update(torch.zeros_like(st) if fresh else st, **{**a, **shared}) for a, st in seqs]
    for i, (y_ref, _) in enumerate(refs):
        _close(y[i], y_ref, dtype)
    for j in range(T):                                               # every sequence at j, j+1, ... (mod T)
        index = torch.tensor([(j + i) % T for i in range(S)])
        got = fast_ssd.ssd_state_at(s0, cum, dtx, stack["B"], index)
        for i, (_, states_ref) in enumerate(refs):
            torch.testing.assert_close(got[i], states_ref[int(index[i])], atol=STATE_TOL[0], rtol=STATE_TOL[1])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T", [1, 4])
@pytest.mark.parametrize("H,P,G,N", [(8, 16, 2, 8), (6, 4, 3, 8)])
def test_ssd_advance_commits_one_sequence_of_a_layer_stack_in_place(dtype, T, H, P, G, N):
    """The one-sequence commit: a stack of layers' states, viewed out of a (L, slots, ...) cache
    (not contiguous), advanced in place to each verified position equals the reference's state there."""
    L, slots, slot = 3, 4, 2
    layers = [_ssd_inputs(T, H, P, G, N, dtype, seed=T * 13 + H + 5 * i) for i in range(L)]
    shared = {name: layers[0][0][name] for name in ("A", "D", "dt_bias")}
    stack = {name: torch.stack([a[name] for a, _ in layers]) for name in ("x", "dt", "B", "C")}
    start = torch.stack([st for _, st in layers])                       # (L, H, P, N)
    _, cum, dtx = fast_ssd.ssd_verify(start, **stack, **shared)
    refs = [ref_ssd.ssd_state_update(st, **{**a, **shared})[1] for a, st in layers]
    for index in range(T):
        cache = torch.full((L, slots, H, P, N), 7.0)
        cache[:, slot] = start
        fast_ssd.ssd_advance_(cache[:, slot], cum, dtx, stack["B"], index)
        for layer in range(L):
            torch.testing.assert_close(cache[layer, slot], refs[layer][index], atol=STATE_TOL[0], rtol=STATE_TOL[1])
        assert torch.all(cache[:, [s for s in range(slots) if s != slot]] == 7.0)    # other slots untouched


# ---- conv1d update ----------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,C,K", [(1, 24, 4), (4, 10, 4), (5, 8, 3), (2, 6, 2)])
@pytest.mark.parametrize("with_bias", [True, False])
def test_conv_update_matches_the_reference(dtype, T, C, K, with_bias):
    g = torch.Generator().manual_seed(T * 100 + C)
    S = 2
    x, state = _rand(g, S, T, C).to(dtype), _rand(g, S, C, K - 1).to(dtype).float()
    w, b = _rand(g, C, K), (_rand(g, C) if with_bias else None)
    y, states = fast_conv.causal_conv1d_update(x, state, w, b)
    y0, _ = fast_conv.causal_conv1d_update(x, None, w, b)                 # fresh: zero states
    for i in range(S):
        y_ref, states_ref = ref_conv.causal_conv1d_update(x[i], state[i], w, b)
        _close(y[i], y_ref, dtype)
        torch.testing.assert_close(states[i].float(), states_ref.float(), atol=0, rtol=0)   # a copy: exact
        _close(y0[i], ref_conv.causal_conv1d_update(x[i], torch.zeros_like(state[i]), w, b)[0], dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_batched_conv_step_is_the_reference_update_of_each_sequence(dtype):
    g = torch.Generator().manual_seed(11)
    S, C, K = 4, 12, 4
    x, states = _rand(g, S, C).to(dtype), _rand(g, S, C, K - 1).to(dtype).float()
    w, b = _rand(g, C, K), _rand(g, C)
    y, new = fast_conv.conv_step(x, states, w, b)
    for i in range(S):
        y_ref, states_ref = ref_conv.causal_conv1d_update(x[i:i + 1], states[i], w, b)
        _close(y[i:i + 1], y_ref, dtype)
        assert torch.equal(new[i].float(), states_ref[0].float())


# ---- grouped experts: both schedules (few rows, many rows), one shard of many ------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,k,E", [(1, 2, 8), (1, 4, 16), (4, 2, 8), (5, 4, 16), (3, 1, 4), (40, 2, 8)])
@pytest.mark.parametrize("shard", [None, (2, 4)])                  # (first_expert, experts owned)
def test_grouped_experts_match_the_reference_on_either_schedule(dtype, T, k, E, shard):
    g = torch.Generator().manual_seed(T * 7 + k * 3 + E)
    D, I = 24, 32
    x = _rand(g, T, D).to(dtype)
    ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)])
    w = torch.rand(T, k, generator=g) + 0.1
    first, n = (0, E) if shard is None else shard
    up, down = (_rand(g, n, I, D, scale=0.2).to(dtype), _rand(g, n, D, I, scale=0.2).to(dtype))
    got = fast_moe.grouped_experts(x, w, ids, up, down, first_expert=first)
    ref = ref_moe.grouped_experts(x, w, ids, up, down, first_expert=first)
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(got.float(), ref.float(), atol=atol, rtol=rtol)
    assert got.abs().sum() > 0


# ---- norms -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
def test_norms_match_the_reference(dtype):
    g = torch.Generator().manual_seed(5)
    x, z, w = _rand(g, 3, 64).to(dtype), _rand(g, 3, 64).to(dtype), _rand(g, 64)
    _close(fast_norm.rms_norm(x, w, 1e-5), ref_norm.rms_norm(x, w, 1e-5), dtype)
    _close(fast_norm.gated_rms_norm(x, z, w, group_size=16, eps=1e-5),
           ref_norm.gated_rms_norm(x, z, w, group_size=16, eps=1e-5), dtype)


# ---- paged KV writes and attention ---------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("start,T", [(0, 7), (13, 1), (13, 4), (16, 3), (0, 1), (0, 30), (9, 20)])
def test_paged_writes_and_attention_match_the_reference(dtype, start, T):
    g = torch.Generator().manual_seed(start * 10 + T)
    H, Hkv, Dh, bs, nb = 4, 2, 8, 4, 16
    table = torch.randperm(nb, generator=g)[:(start + T + bs - 1) // bs]   # blocks anywhere, any order
    caches = {name: [_rand(g, nb, bs, Hkv, Dh).to(dtype) for _ in range(2)] for name in ("fast", "ref")}
    caches["ref"] = [c.clone() for c in caches["fast"]]
    q, k, v = _rand(g, T, H, Dh).to(dtype), _rand(g, T, Hkv, Dh).to(dtype), _rand(g, T, Hkv, Dh).to(dtype)
    fast_attn.write_kv(*caches["fast"], k, v, table, start)
    ref_attn.write_kv(*caches["ref"], k, v, table, start)
    for a, b in zip(caches["fast"], caches["ref"]):
        assert torch.equal(a, b)                                         # same rows written, nothing else
    out = fast_attn.paged_attention(q, *caches["fast"], table, start_pos=start)
    _close(out, ref_attn.paged_attention(q, *caches["ref"], table, start_pos=start), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_batched_decode_attention_is_each_sequence_alone(dtype):
    """Sequences of different lengths, blocks scattered over the pool, one new token each."""
    g = torch.Generator().manual_seed(21)
    H, Hkv, Dh, bs, nb = 4, 2, 8, 4, 32
    positions = [0, 5, 13, 8]                                          # the new token's position
    perm = torch.randperm(nb, generator=g)
    tables, at = [], 0
    for p in positions:
        n = p // bs + 1 + (1 if p == 5 else 0)                         # one table longer than it needs
        tables.append(perm[at:at + n])
        at += n
    cache = [_rand(g, nb, bs, Hkv, Dh).to(dtype) for _ in range(2)]
    ref_cache = [c.clone() for c in cache]
    S = len(positions)
    q, k, v = _rand(g, S, H, Dh).to(dtype), _rand(g, S, Hkv, Dh).to(dtype), _rand(g, S, Hkv, Dh).to(dtype)
    out = fast_attn.decode_attention(q, k, v, *cache, tables, positions)
    for i, (t, p) in enumerate(zip(tables, positions)):
        ref_attn.write_kv(*ref_cache, k[i:i + 1], v[i:i + 1], t, p)
        _close(out[i:i + 1], ref_attn.paged_attention(q[i:i + 1], *ref_cache, t, start_pos=p), dtype)
    for a, b in zip(cache, ref_cache):
        assert torch.equal(a, b)


# ---- linear for a few rows ------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T", [1, 2, 4, 8, 9, 33])
def test_linear_is_torch_linear_for_any_row_count(dtype, T):
    g = torch.Generator().manual_seed(T)
    x, w = _rand(g, T, 48).to(dtype), _rand(g, 40, 48, scale=0.2).to(dtype)
    out = fast_linear.linear(x, w)
    assert out.shape == (T, 40) and out.is_contiguous()
    _close(out, torch.nn.functional.linear(x, w), dtype)


# ---- several sequences' short chunks in one call (verification, MTP catch-up) --------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("chunks", [[(13, 4), (0, 4), (30, 4)], [(5, 2), (17, 8), (0, 1), (9, 3)],
                                    [(40, 3), (2, 5)]])                 # (start position, tokens) each
def test_short_chunks_of_several_sequences_equal_each_sequence_alone(dtype, chunks):
    """The batched path of prefill_attention (kernels/fast/attention.py short_chunks_attention) gives each
    sequence what paged attention over its own blocks gives; block tables of different lengths, padded
    with garbage blocks, blocks scattered over a pool of garbage (fresh seed per run)."""
    g = torch.Generator().manual_seed(torch.seed() % 100_000)
    H, Hkv, Dh, bs, nb = 4, 2, 8, 4, 48
    perm, at, tables = torch.randperm(nb, generator=g), 0, []
    for start, n in chunks:
        need = (start + n + bs - 1) // bs
        tables.append(perm[at:at + need])
        at += need
    padded = torch.nn.utils.rnn.pad_sequence(tables, batch_first=True, padding_value=int(perm[-1]))
    cache = [_rand(g, nb, bs, Hkv, Dh).to(dtype) for _ in range(2)]
    total = sum(n for _, n in chunks)
    q = _rand(g, total, H, Dh).to(dtype)
    starts, lengths = [s for s, _ in chunks], [n for _, n in chunks]
    out = fast_attn.short_chunks_attention(q, *cache, padded, starts, lengths)
    row = 0
    for (start, n), table in zip(chunks, tables):
        ref = ref_attn.paged_attention(q[row:row + n], *cache, table, start_pos=start)
        _close(out[row:row + n], ref, dtype)
        row += n
