"""Causal GQA over a paged KV cache (kernels/reference/attention.py) against a per-query float64 loop.

    out[t, h] = softmax_s<=pos(t)( q[t, h] · k[s, h // (H / H_kv)] / sqrt(Dh) ) @ v[s, h // (H / H_kv)]
No rotary embedding (NoPE). Position p of a sequence lives in block table[p // block_size] at offset
p % block_size; blocks may be anywhere in the pool, in any order. 16-bit tolerances cover the rounding
of q, k, v and of the output (the softmax runs in float32).
"""
from __future__ import annotations

import math

import pytest
import torch

from kernels.reference.attention import attention_prefill, gather_kv, paged_attention, write_kv

TOL = {  # (atol, rtol) against the float64 loop
    torch.float32: (1e-5, 1e-5),
    torch.bfloat16: (2e-2, 2e-2),
    torch.float16: (3e-3, 3e-3),
}
DTYPES = list(TOL)
# (S total positions, H, H_kv, Dh, block_size)
SHAPES = [(19, 4, 2, 16, 4), (8, 4, 4, 8, 8), (33, 8, 1, 16, 5), (1, 2, 1, 8, 4)]


def _nonzero(t: torch.Tensor, floor: float = 1e-2) -> torch.Tensor:
    return torch.where(t >= 0, t.clamp_min(floor), t.clamp_max(-floor))


def make_qkv(S, H, Hkv, Dh, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    q = _nonzero(torch.randn(S, H, Dh, generator=g)).to(dtype)
    k = _nonzero(torch.randn(S, Hkv, Dh, generator=g)).to(dtype)
    v = _nonzero(torch.randn(S, Hkv, Dh, generator=g)).to(dtype)
    return q, k, v


def make_pool(num_blocks, bs, Hkv, Dh, dtype, seed):
    """A cache pool full of garbage: a wrong block lookup reads values that change the result."""
    g = torch.Generator().manual_seed(seed)
    k_cache = (torch.randn(num_blocks, bs, Hkv, Dh, generator=g) * 5 + 3).to(dtype)
    v_cache = (torch.randn(num_blocks, bs, Hkv, Dh, generator=g) * 5 - 3).to(dtype)
    return k_cache, v_cache


def shuffled_table(S, bs, num_blocks, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(num_blocks, generator=g)[:math.ceil(S / bs)]


def naive_attention(q, k, v, start_pos):
    """q holds positions start_pos.., k, v positions 0..; one query and one head at a time."""
    T, H, Dh = q.shape
    rep = H // k.shape[1]
    out = torch.empty(T, H, Dh, dtype=torch.float64)
    for t in range(T):
        n = start_pos + t + 1                                   # keys 0..pos(t)
        for h in range(H):
            kh, vh = k[:n, h // rep].double(), v[:n, h // rep].double()
            p = torch.softmax(kh @ q[t, h].double() / math.sqrt(Dh), dim=0)
            out[t, h] = p @ vh
    return out


def check(actual, expected, dtype):
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(actual.double(), expected.double(), atol=atol, rtol=rtol)


ids = lambda s: "S{}-H{}-Hkv{}-Dh{}-bs{}".format(*s)  # noqa: E731


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=ids)
def test_attention_prefill_equals_per_query_loop(dtype, shape):
    S, H, Hkv, Dh, _ = shape
    q, k, v = make_qkv(S, H, Hkv, Dh, dtype, seed=40)
    out = attention_prefill(q, k, v)
    assert out.dtype == dtype and out.shape == q.shape
    check(out, naive_attention(q, k, v, 0), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=ids)
@pytest.mark.parametrize("start_frac", [0.0, 0.5, 1.0], ids=["all", "half", "last"])
def test_paged_attention_with_shuffled_block_table_equals_dense_causal(dtype, shape, start_frac):
    S, H, Hkv, Dh, bs = shape
    start = min(int(S * start_frac), S - 1)
    q, k, v = make_qkv(S, H, Hkv, Dh, dtype, seed=41)
    num_blocks = 3 * math.ceil(S / bs) + 2
    k_cache, v_cache = make_pool(num_blocks, bs, Hkv, Dh, dtype, seed=42)
    table = shuffled_table(S, bs, num_blocks, seed=43)
    write_kv(k_cache, v_cache, k, v, table, 0)
    out = paged_attention(q[start:], k_cache, v_cache, table, start_pos=start)
    check(out, naive_attention(q[start:], k, v, start), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("chunk", [1, 3, 4, 7, 19])
def test_chunked_prefill_equals_unchunked(dtype, chunk):
    """Writing k, v chunk by chunk and attending each chunk at its start_pos == one causal pass."""
    S, H, Hkv, Dh, bs = 19, 4, 2, 16, 4
    q, k, v = make_qkv(S, H, Hkv, Dh, dtype, seed=44)
    num_blocks = 12
    k_cache, v_cache = make_pool(num_blocks, bs, Hkv, Dh, dtype, seed=45)
    table = shuffled_table(S, bs, num_blocks, seed=46)
    outs = []
    for s0 in range(0, S, chunk):
        s1 = min(s0 + chunk, S)
        write_kv(k_cache, v_cache, k[s0:s1], v[s0:s1], table, s0)
        outs.append(paged_attention(q[s0:s1], k_cache, v_cache, table, start_pos=s0))
    full = attention_prefill(q, k, v)
    check(torch.cat(outs), full, dtype)
    check(full, naive_attention(q, k, v, 0), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gather_returns_exactly_what_was_written(dtype):
    S, H, Hkv, Dh, bs = 23, 4, 2, 8, 4
    _, k, v = make_qkv(S, H, Hkv, Dh, dtype, seed=47)
    k_cache, v_cache = make_pool(16, bs, Hkv, Dh, dtype, seed=48)
    table = shuffled_table(S, bs, 16, seed=49)
    write_kv(k_cache, v_cache, k[:10], v[:10], table, 0)
    write_kv(k_cache, v_cache, k[10:], v[10:], table, 10)
    kg, vg = gather_kv(k_cache, v_cache, table, S)
    assert torch.equal(kg, k) and torch.equal(vg, v)


def test_sequences_in_disjoint_blocks_do_not_disturb_each_other():
    S, H, Hkv, Dh, bs = 13, 4, 2, 8, 4
    q, k, v = make_qkv(S, H, Hkv, Dh, torch.float32, seed=50)
    _, k2, v2 = make_qkv(S, H, Hkv, Dh, torch.float32, seed=51)
    k_cache, v_cache = make_pool(10, bs, Hkv, Dh, torch.float32, seed=52)
    perm = torch.randperm(10, generator=torch.Generator().manual_seed(53))
    table_a, table_b = perm[:4], perm[4:8]
    write_kv(k_cache, v_cache, k, v, table_a, 0)
    write_kv(k_cache, v_cache, k2, v2, table_b, 0)
    out = paged_attention(q, k_cache, v_cache, table_a, start_pos=0)
    check(out, naive_attention(q, k, v, 0), torch.float32)


def test_a_query_never_sees_later_positions():
    """Changing k, v after position p leaves the outputs of positions <= p unchanged."""
    S, H, Hkv, Dh = 12, 4, 2, 8
    q, k, v = make_qkv(S, H, Hkv, Dh, torch.float32, seed=54)
    out = attention_prefill(q, k, v)
    k2, v2 = k.clone(), v.clone()
    k2[7:] += 1.0
    v2[7:] -= 2.0
    out2 = attention_prefill(q, k2, v2)
    assert torch.equal(out2[:7], out[:7])
    assert not torch.allclose(out2[7:], out[7:], atol=1e-3)
