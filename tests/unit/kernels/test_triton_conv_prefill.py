"""The prefill conv in Triton (kernels/triton/conv1d.py: causal_conv1d_varlen, causal_conv1d) gives the
reference's numbers (kernels/reference/conv1d.py: causal_conv1d per sequence), and the Mamba mixer uses it
for all its long prompt chunks in one call when the Triton kernels are chosen.

Under Triton's interpreter without a GPU (TRITON_INTERPRET=1, conftest.py); fresh seed per test, values
pushed away from zero, outputs NaN-poisoned first. The final windows are copies of inputs, so they must
match bit for bit; y is a K-term sum and SiLU, compared with per-dtype tolerances (the reference rounds
the conv to x's dtype before SiLU, the kernel rounds once).
"""
from __future__ import annotations

import collections

import pytest
import torch
from tests.kernel_inputs import nonzero

pytest.importorskip("triton", reason="triton is not installed (pyproject installs it on Linux only)")

from kernels import ops  # noqa: E402
from kernels import triton as tk  # noqa: E402
from kernels.reference import conv1d as ref  # noqa: E402
from kernels.triton import conv1d as tri  # noqa: E402

CUDA = torch.cuda.is_available() and not tk.INTERPRET
DEVICE = "cuda" if CUDA else "cpu"
TOL = {torch.float32: (3e-5, 3e-5), torch.float16: (4e-3, 4e-3), torch.bfloat16: (3e-2, 2e-2)}
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if CUDA else [])   # bf16: GPU only (test_triton_kernels)
# Lengths shorter than the window (1, 2: the final window keeps part of the initial one), one block of 16
# exactly, and several blocks with a ragged tail (37).
LENGTHS = [5, 1, 37, 2, 16]
CASES = [(40, 4, True, True), (40, 4, False, False), (24, 2, True, True), (33, 3, True, False)]


def case_id(c):
    return "C{}-K{}-{}-{}".format(c[0], c[1], "bias" if c[2] else "nobias", "silu" if c[3] else "linear")


@pytest.fixture(autouse=True)
def poisoned_outputs(poison_triton_outputs):
    """Every output the wrappers allocate starts as NaN (conftest.py): an element never written fails."""


def _rand(g, *shape, scale=1.0, dtype=torch.float32):
    return nonzero(torch.randn(*shape, generator=g) * scale).to(dtype).to(DEVICE)


def _inputs(g, lengths, Cdim, K, dtype, with_bias, init):
    """x (sum L, C) strided rows (a column slice, as xBC is of in_proj's output); float32 weight and bias
    (parameters); float32 initial windows holding dtype-representable values, as the cache does:
    init "fresh" (None), "state", or "mixed" (every other sequence fresh: a zero window)."""
    x = _rand(g, sum(lengths), Cdim + 5, dtype=dtype)[:, 2:Cdim + 2]
    w = _rand(g, Cdim, K, scale=0.5)
    b = _rand(g, Cdim, scale=0.5) if with_bias else None
    states = None
    if init != "fresh":
        states = _rand(g, len(lengths), Cdim, K - 1, dtype=dtype).float()
        if init == "mixed":
            states[::2] = 0.0
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device=DEVICE)
    return x, w, b, states, cu


def _close(actual, expected, dtype, what):
    atol, rtol = TOL[dtype]
    assert actual.dtype == expected.dtype == dtype, (what, actual.dtype, expected.dtype)
    torch.testing.assert_close(actual.float(), expected.float(), atol=atol, rtol=rtol, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=case_id)
@pytest.mark.parametrize("init", ["fresh", "state", "mixed"])
def test_varlen_kernel_equals_the_reference_per_sequence(seed, dtype, case, init):
    """Five sequences flat in one batch: each one's y against causal_conv1d on its own rows and window, its
    final window bit for bit; the initial windows are left alone."""
    Cdim, K, with_bias, silu = case
    g = torch.Generator().manual_seed(seed)
    x, w, b, states, cu = _inputs(g, LENGTHS, Cdim, K, dtype, with_bias, init)
    before = None if states is None else states.clone()
    y, final = tri.causal_conv1d_varlen(x, w, b, cu, states, activation=silu)
    assert y.shape == x.shape and final.shape == (len(LENGTHS), Cdim, K - 1) and final.dtype == dtype
    bounds = cu.tolist()
    for s, (lo, hi) in enumerate(zip(bounds, bounds[1:])):
        y_ref, final_ref = ref.causal_conv1d(x[lo:hi], w, b, None if states is None else states[s], activation=silu)
        _close(y[lo:hi], y_ref, dtype, f"y of sequence {s} ({hi - lo} positions)")
        assert torch.equal(final[s], final_ref), f"final window of sequence {s} ({hi - lo} positions)"
    if states is not None:
        assert torch.equal(states, before)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("fresh", [False, True], ids=["state", "fresh"])
def test_one_sequence_has_the_reference_signature(seed, dtype, fresh):
    """causal_conv1d (x (L, C), window (C, K-1) or None), as kernels/ops.py binds it for the Triton family."""
    g = torch.Generator().manual_seed(seed)
    x, w, b, states, _ = _inputs(g, [21], 40, 4, dtype, True, "fresh" if fresh else "state")
    state = None if fresh else states[0]
    y, final = tri.causal_conv1d(x, w, b, state)
    y_ref, final_ref = ref.causal_conv1d(x, w, b, state)
    _close(y, y_ref, dtype, "y")
    assert torch.equal(final, final_ref)


@pytest.mark.parametrize("forced", ["reference", "fast", "triton"])
def test_ops_dispatch_of_the_prefill_conv(seed, monkeypatch, forced):
    """kernels/ops.py: both entries give the reference's numbers under every choice, and the model is told
    to batch its prompt chunks exactly when the Triton kernel is the one that runs."""
    g = torch.Generator().manual_seed(seed)
    x, w, b, states, cu = _inputs(g, LENGTHS, 24, 4, torch.float32, True, "mixed")
    y_ref, final_ref = ref.causal_conv1d_varlen(x, w, b, cu, states)
    monkeypatch.setenv(ops.ENV, forced)
    assert ops.prefill_conv_batched(x) == (forced == "triton")
    y, final = ops.causal_conv1d_varlen(x, w, b, cu, states, max_seqlen=max(LENGTHS))
    _close(y, y_ref, torch.float32, f"causal_conv1d_varlen, {forced}")
    assert torch.equal(final, final_ref)
    y1, final1 = ops.causal_conv1d(x[:5], w, b, states[0])
    _close(y1, y_ref[:5], torch.float32, f"causal_conv1d, {forced}")
    assert torch.equal(final1, final_ref[0])
    monkeypatch.delenv(ops.ENV)
    assert ops.prefill_conv_batched(x) == CUDA         # unset: Triton on a GPU only


@torch.no_grad()
def test_mamba_mixer_convolves_its_long_prompt_chunks_in_one_triton_call(seed, monkeypatch):
    """The `tiny` preset's first Mamba mixer over three prompt chunks longer than a short chunk (one fresh,
    two continuing from their slots' states) and an idle slot: HYBRIDSERVE_KERNELS=triton makes one
    causal_conv1d_varlen launch and no per-sequence conv, with the reference path's outputs and states."""
    from model_shards.batch import BatchLayout, SeqSlice
    from model_shards.cache import MambaStateCache
    from model_shards.model import HybridModel
    from model_shards.presets import get_preset

    cfg = get_preset("tiny")
    mixer = HybridModel(cfg).init_random(seed % 1000).backbone.layers["0"].mixer.to(DEVICE).eval()
    g = torch.Generator().manual_seed(seed)
    h = _rand(g, 31, cfg.hidden_size)
    table = torch.zeros(1, dtype=torch.long, device=DEVICE)
    batch = BatchLayout([SeqSlice(0, 10, 0, 2, table, False), SeqSlice(10, 12, 5, 0, table, False),
                         SeqSlice(22, 9, 3, 3, table, False)])
    store = MambaStateCache(cfg, 1, num_slots=4, device=DEVICE)
    store.conv.copy_(_rand(g, *store.conv.shape))
    store.ssm.copy_(_rand(g, *store.ssm.shape, scale=0.1))
    calls: collections.Counter = collections.Counter()
    for name in ("causal_conv1d", "causal_conv1d_varlen"):
        def counted(*args, _fn=tk.OPS[name], _name=name, **kwargs):
            calls[_name] += 1
            return _fn(*args, **kwargs)
        monkeypatch.setitem(tk.OPS, name, counted)

    def run(mode):
        monkeypatch.setenv(ops.ENV, mode)
        cache = MambaStateCache(cfg, 1, num_slots=4, device=DEVICE)
        cache.conv.copy_(store.conv)
        cache.ssm.copy_(store.ssm)
        return mixer(h, batch, cache.layer(0)), cache

    y_ref, ref_cache = run("reference")
    y, cache = run("triton")
    assert calls == {"causal_conv1d_varlen": 1}
    torch.testing.assert_close(y, y_ref, atol=1e-4, rtol=1e-4)
    assert torch.equal(cache.conv, ref_cache.conv)          # copies of inputs: the same bits
    torch.testing.assert_close(cache.ssm, ref_cache.ssm, atol=1e-4, rtol=1e-4)
    assert torch.equal(cache.conv[0, 1], store.conv[0, 1]) and torch.equal(cache.ssm[0, 1], store.ssm[0, 1])
