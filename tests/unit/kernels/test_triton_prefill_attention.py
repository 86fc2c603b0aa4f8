"""Varlen prefill attention (kernels/triton/attention.py prefill_attention): the queries of S sequences in one
flat batch, each attending causally over its own paged keys, against the reference (a loop of the
per-sequence paged_attention, kernels/reference/attention.py); the op's dispatch through kernels/ops.py; and
the attention layer that calls it once for every multi-token sequence of a pass.

Conventions as in test_triton_kernels.py: the interpreter on CPU tensors (conftest.py), a fresh printed seed
per test (HYBRIDSERVE_TEST_SEED=<n> replays it), values away from zero, outputs poisoned (NaN-filled),
float32 and float16 (bfloat16 on a GPU only), per-dtype tolerances. The cache pool is garbage everywhere
(a wrong block lookup changes the result), block tables are shuffled, padded with other sequences' blocks,
and passed column-major; sequences have different lengths (one empty) and start positions, and span
several query tiles and key tiles.
"""
from __future__ import annotations

import math

import pytest
import torch
from tests.kernel_inputs import nonzero

pytest.importorskip("triton", reason="triton is not installed (pyproject installs it on Linux only)")

from kernels import ops  # noqa: E402
from kernels import triton as tk  # noqa: E402
from kernels.fast import attention as fast_attn  # noqa: E402
from kernels.reference import attention as ref_attn  # noqa: E402
from kernels.triton import attention as tri_attn  # noqa: E402

CUDA = torch.cuda.is_available() and not tk.INTERPRET
DEVICE = "cuda" if CUDA else "cpu"
if not CUDA and not tk.INTERPRET:
    raise RuntimeError("kernels.triton was imported before TRITON_INTERPRET=1 was set (see conftest.py)")

TOL = {  # (atol, rtol); fp16/bf16 on a GPU multiply in the input dtype (tensor cores), p rounded to it
    torch.float32: (3e-5, 3e-5),
    torch.float16: (4e-3, 4e-3),
    torch.bfloat16: (3e-2, 2e-2),
}
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if CUDA else [])

# (H, H_kv, Dh, block_size): GQA groups of 2, 8 and 1; Dh not a power of 2; blocks under, at and not
# dividing the 16-key tile.
SHAPES = [(4, 2, 16, 4), (8, 1, 24, 16), (4, 4, 16, 5)]
shape_ids = lambda s: "H{}-Hkv{}-Dh{}-bs{}".format(*s)  # noqa: E731
# (start position, number of queries): a prompt from 0 over 3 query tiles, one query, a verification pass
# deep in a sequence, a mid-sequence chunk, an empty sequence, a chunk ending on a block boundary.
SEQS = [(0, 19), (7, 1), (30, 5), (2, 11), (5, 0), (13, 7)]


@pytest.fixture(autouse=True)
def poisoned_outputs(poison_triton_outputs):
    """Every test here runs with the wrappers' outputs NaN-filled first (conftest.py)."""


_nonzero = nonzero


def _close(actual, expected, dtype, what=""):
    atol, rtol = TOL[dtype]
    assert actual.dtype == expected.dtype, (what, actual.dtype, expected.dtype)
    torch.testing.assert_close(actual.float(), expected.float(), atol=atol, rtol=rtol,
                               msg=lambda m: f"{what}: {m}")


def _batch(g, seqs, H, hkv, Dh, bs, dtype):
    """A garbage pool, shuffled block tables (S, n) padded with blocks of other sequences and laid out
    column-major, flat queries (a column slice of a wider tensor, as projections give), cu_seqlens."""
    need = [math.ceil((start + T) / bs) for start, T in seqs]
    num_blocks = sum(need) + 3
    k_cache = (torch.randn(num_blocks, bs, hkv, Dh, generator=g) * 5 + 3).to(dtype).to(DEVICE)
    v_cache = (torch.randn(num_blocks, bs, hkv, Dh, generator=g) * 5 - 3).to(dtype).to(DEVICE)
    perm = torch.randperm(num_blocks, generator=g)
    width = max(need)
    rows, used = [], 0
    for n in need:
        own = perm[used:used + n]
        others = perm[torch.randperm(num_blocks, generator=g)][:width]
        pad = others[~torch.isin(others, own)][:width - n]          # padding: real blocks, never read
        rows.append(torch.cat([own, pad]))
        used += n
    tables = torch.stack(rows).t().contiguous().t().to(DEVICE)      # strides (1, S)
    cu = [0]
    for _, T in seqs:
        cu.append(cu[-1] + T)
    wide = _nonzero(torch.randn(cu[-1], H * Dh + 3, generator=g)).to(dtype).to(DEVICE)
    q = wide[:, 1:H * Dh + 1].unflatten(-1, (H, Dh))
    return q, k_cache, v_cache, tables, [start for start, _ in seqs], cu


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=shape_ids)
@pytest.mark.parametrize("args", ["tensors", "lists"])
def test_prefill_attention_over_sequences_of_different_lengths_and_starts(seed, dtype, shape, args):
    H, hkv, Dh, bs = shape
    g = torch.Generator().manual_seed(seed)
    seqs = [SEQS[i] for i in torch.randperm(len(SEQS), generator=g).tolist()]      # a fresh order each time
    q, k_cache, v_cache, tables, starts, cu = _batch(g, seqs, H, hkv, Dh, bs, dtype)
    before = (k_cache.clone(), v_cache.clone())
    if args == "tensors":
        out = tri_attn.prefill_attention(q, k_cache, v_cache, tables, torch.tensor(starts, device=DEVICE),
                                         torch.tensor(cu, dtype=torch.int32, device=DEVICE))
    else:
        out = tri_attn.prefill_attention(q, k_cache, v_cache, tables, starts, cu, max_seqlen=max(T for _, T in seqs))
    ref = ref_attn.prefill_attention(q, k_cache, v_cache, tables, starts, cu)
    assert out.shape == q.shape and out.dtype == dtype
    for s, (start, T) in enumerate(seqs):
        _close(out[cu[s]:cu[s + 1]], ref[cu[s]:cu[s + 1]], dtype, f"sequence {s} (start {start}, {T} queries)")
        if T:                                   # the reference loop is the per-sequence op, by definition
            one = tri_attn.paged_attention(q[cu[s]:cu[s + 1]], k_cache, v_cache, tables[s], start_pos=start)
            _close(out[cu[s]:cu[s + 1]], one, dtype, f"sequence {s} against the per-sequence kernel")
    assert torch.equal(k_cache, before[0]) and torch.equal(v_cache, before[1])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", ["verification", "single-queries", "one-long"])
def test_prefill_attention_batch_kinds(seed, dtype, kind):
    """Verification passes of k+1 = 4 queries each; sequences of one query each (every row in its own
    sequence); one sequence of 40 queries (several query tiles and key tiles in one program column)."""
    H, hkv, Dh, bs = 8, 2, 16, 4
    g = torch.Generator().manual_seed(seed)
    seqs = {"verification": [(9, 4), (0, 4), (22, 4)],
            "single-queries": [(0, 1), (17, 1), (3, 1), (8, 1)],
            "one-long": [(6, 40)]}[kind]
    q, k_cache, v_cache, tables, starts, cu = _batch(g, seqs, H, hkv, Dh, bs, dtype)
    out = tri_attn.prefill_attention(q, k_cache, v_cache, tables, starts, cu)
    _close(out, ref_attn.prefill_attention(q, k_cache, v_cache, tables, starts, cu), dtype, kind)


@pytest.mark.parametrize("forced", ["reference", "fast", "triton"])
def test_ops_prefill_attention_dispatch(seed, monkeypatch, forced):
    """kernels/ops.py: each forced choice gives the reference's numbers; the fast choice loops the fast
    per-sequence paged_attention; unset on a CPU tensor: the fast path."""
    H, hkv, Dh, bs = SHAPES[0]
    g = torch.Generator().manual_seed(seed)
    q, k_cache, v_cache, tables, starts, cu = _batch(g, SEQS, H, hkv, Dh, bs, torch.float32)
    expected = ref_attn.prefill_attention(q, k_cache, v_cache, tables, starts, cu)
    monkeypatch.setenv(ops.ENV, forced)
    out = ops.prefill_attention(q, k_cache, v_cache, tables, starts, cu, max_seqlen=19)
    _close(out, expected, torch.float32, forced)
    if not CUDA:
        monkeypatch.delenv(ops.ENV)
        assert ops._pick("prefill_attention", q) is ops._FAST["prefill_attention"]
    assert ops._REFERENCE["prefill_attention"] is ref_attn.prefill_attention
    assert tk.OPS["prefill_attention"] is tri_attn.prefill_attention
    got = ops._FAST["prefill_attention"](q, k_cache, v_cache, tables, torch.tensor(starts), torch.tensor(cu))
    for s, start in enumerate(starts):
        if cu[s + 1] > cu[s]:
            torch.testing.assert_close(got[cu[s]:cu[s + 1]], fast_attn.paged_attention(
                q[cu[s]:cu[s + 1]], k_cache, v_cache, tables[s], start_pos=start))


@torch.no_grad()
@pytest.mark.parametrize("order", ["interleaved", "packed"])
def test_attention_layer_calls_prefill_attention_once_for_the_multi_token_sequences(seed, monkeypatch, order):
    """model_shards/attention.py: a pass with decode steps and prefill chunks / verification passes (rows
    interleaved with the decode steps, or packed after them) makes one prefill_attention call over the
    multi-token sequences; HYBRIDSERVE_KERNELS=triton gives the =reference layer's output and cache."""
    from model_shards.attention import Attention
    from model_shards.batch import BatchLayout, SeqSlice
    from model_shards.cache import PagedKVCache
    from model_shards.presets import get_preset

    cfg = get_preset("tiny")
    g = torch.Generator().manual_seed(seed)
    layer = Attention(cfg)
    for w in layer.parameters():
        w.copy_(torch.randn(w.shape, generator=g) * 0.3)
    layer = layer.to(DEVICE)
    bs, num_blocks = 4, 32
    perm = torch.randperm(num_blocks, generator=g).to(DEVICE)
    tables = [perm[i::4] for i in range(4)]                                  # 8 blocks each
    # (num_tokens, start_pos): chunks of 6 and 5 (verification) tokens, decode steps of 1.
    kinds = [(6, 3), (1, 9), (5, 12), (1, 4)] if order == "interleaved" else [(1, 9), (1, 4), (6, 3), (5, 12)]
    seqs, offset = [], 0
    for i, (n, start) in enumerate(kinds):
        seqs.append(SeqSlice(offset, n, start, i, tables[i]))
        offset += n
    h = _nonzero(torch.randn(offset, cfg.hidden_size, generator=g)).to(DEVICE)
    calls = []
    real = ops.prefill_attention

    def spy(q, *args, **kwargs):
        calls.append(q.shape[0])
        return real(q, *args, **kwargs)

    def run(mode):
        monkeypatch.setenv(ops.ENV, mode)
        cache = PagedKVCache(cfg, num_blocks, bs, device=DEVICE)
        g2 = torch.Generator().manual_seed(seed + 1)
        cache.k.copy_(torch.randn(cache.k.shape, generator=g2))              # earlier positions: garbage
        cache.v.copy_(torch.randn(cache.v.shape, generator=g2))
        return layer(h, BatchLayout(seqs), cache), cache

    monkeypatch.setattr(ops, "prefill_attention", spy)
    ref, ref_cache = run("reference")
    out, cache = run("triton")
    assert calls == [11, 11]
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    assert torch.equal(cache.k, ref_cache.k) and torch.equal(cache.v, ref_cache.v)
