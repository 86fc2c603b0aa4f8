"""The prefill chunked scan over variable-length sequences in one flat batch (ssd_chunk_scan_varlen):
the Triton kernel (kernels/triton/ssd_prefill.py) against the reference (kernels/reference/ssd.py), and the
reference itself against one ssd_chunk_scan per sequence and against the plain recurrence.

Same rules as test_triton_kernels.py: without a GPU the kernel runs under Triton's interpreter
(TRITON_INTERPRET=1, set by this folder's conftest.py); a fresh seed per test (printed; replay with
HYBRIDSERVE_TEST_SEED=<n>); values pushed away from zero; the wrapper's outputs NaN-poisoned, so an element
the kernel never writes fails; float32 and float16 (bfloat16 only on a GPU) with per-dtype tolerances.
Sequences of length 0, 1, a partial chunk, exactly one chunk and several chunks plus a partial one, in
one batch; head dims and state sizes that are not powers of two, G < H, chunk sizes below, at and not
a power of two of the kernel's 16-wide tile; initial states for all, some (others fresh: zeros) or none.
"""
from __future__ import annotations


import pytest
import torch
from tests.kernel_inputs import nonzero

pytest.importorskip("triton", reason="triton is not installed (pyproject installs it on Linux only)")

from kernels import ops  # noqa: E402
from kernels import triton as tk  # noqa: E402
from kernels.reference import ssd as ref_ssd  # noqa: E402
from kernels.triton import ssd_prefill as tri  # noqa: E402

CUDA = torch.cuda.is_available() and not tk.INTERPRET
DEVICE = "cuda" if CUDA else "cpu"
if not CUDA and not tk.INTERPRET:
    raise RuntimeError("kernels.triton was imported before TRITON_INTERPRET=1 was set (see conftest.py)")

TOL = {  # (atol, rtol) of the kernel's y against the reference's (both float32 inside, other sum orders)
    torch.float32: (3e-5, 3e-5),
    torch.float16: (4e-3, 4e-3),
    torch.bfloat16: (3e-2, 2e-2),
}
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if CUDA else [])
STATE_TOL = dict(atol=1e-4, rtol=1e-4)     # float32 final states
LIMITS = [(0.0, float("inf")), (0.05, 0.8)]

# (H, P, G, N, chunk_size): P over 2 blocks of 16 and not a power of two, N not a power of two, G < H;
# chunk sizes below the 16-wide tile, at it, and not a power of two.
SHAPES = [(4, 24, 2, 20, 8), (6, 12, 3, 10, 16), (4, 24, 1, 20, 12)]
shape_ids = lambda s: "H{}-P{}-G{}-N{}-cs{}".format(*s)  # noqa: E731


def lengths(cs: int) -> list[int]:
    """1, a partial chunk, an empty sequence, exactly one chunk, several chunks + a partial one, 2."""
    return [1, cs - 3, 0, cs, 3 * cs + 3, 2]


@pytest.fixture(autouse=True)
def poisoned_outputs(poison_triton_outputs):
    """Every test here runs with the wrappers' outputs NaN-filled first (conftest.py)."""


_nonzero = nonzero


def _rand(g, *shape, scale=1.0, dtype=torch.float32):
    return _nonzero(torch.randn(*shape, generator=g) * scale).to(dtype).to(DEVICE)


def _strided(g, *shape, dtype, scale=1.0):
    """Rows strided as the model's x, B, C, dt are (column slices of one projection's output)."""
    *lead, last = shape
    return _rand(g, *lead, last + 3, dtype=dtype, scale=scale)[..., 1:last + 1]


def _inputs(g, lens, H, P, G, N, dtype, init: str):
    """x (T, H, P), dt (T, H), B, C (T, G, N) strided; A, D, dt_bias (H,) float32; cu_seqlens (S+1,) int32;
    initial states (S, H, P, N) float32 (a strided slice of a larger cache) or None; init: "none",
    "some" (every other sequence fresh: zeros), "all"."""
    T, S = sum(lens), len(lens)
    x = _strided(g, T, H * P, dtype=dtype).unflatten(-1, (H, P))
    B = _strided(g, T, G * N, dtype=dtype).unflatten(-1, (G, N))
    C = _strided(g, T, G * N, dtype=dtype).unflatten(-1, (G, N))
    dt = _strided(g, T, H, dtype=dtype, scale=0.5)
    A = (-torch.exp(torch.empty(H).uniform_(-3.0, 1.5, generator=g))).to(DEVICE)   # slow to fast decay
    D = _rand(g, H)
    dt_bias = _nonzero(torch.rand(H, generator=g) * 2 - 1.5).to(DEVICE)
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32, device=DEVICE)
    states = None
    if init != "none":
        states = _rand(g, 2, S, H, P, N)[1]
        if init == "some":
            states[::2] = 0.0
    return (x, dt, A, B, C, D, dt_bias), cu, states


def _close(actual, expected, dtype, what):
    atol, rtol = TOL[dtype]
    assert actual.dtype == expected.dtype, (what, actual.dtype, expected.dtype)
    torch.testing.assert_close(actual.float(), expected.float(), atol=atol, rtol=rtol, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=shape_ids)
@pytest.mark.parametrize("init", ["none", "some", "all"])
def test_kernel_equals_the_reference(seed, dtype, shape, init):
    H, P, G, N, cs = shape
    g = torch.Generator().manual_seed(seed)
    lens = lengths(cs)
    args, cu, s0 = _inputs(g, lens, H, P, G, N, dtype, init)
    before = None if s0 is None else s0.clone()
    dt_limit = LIMITS[init == "some"]                 # "some": dt clamped; "none", "all": not
    y, fin = tri.ssd_chunk_scan_varlen(*args, cu_seqlens=cu, chunk_size=cs, initial_states=s0, dt_limit=dt_limit)
    y_ref, fin_ref = ref_ssd.ssd_chunk_scan_varlen(*args, cu_seqlens=cu, chunk_size=cs, initial_states=before,
                                                   dt_limit=dt_limit)
    assert y.shape == (sum(lens), H, P) and fin.shape == (len(lens), H, P, N) and fin.dtype == torch.float32
    assert not y.isnan().any() and not fin.isnan().any(), "an output element was never written"
    if s0 is not None:
        assert torch.equal(s0, before), "the initial states were modified"
    bounds = cu.tolist()
    for s in range(len(lens)):
        lo, hi = bounds[s], bounds[s + 1]
        _close(y[lo:hi], y_ref[lo:hi], dtype, f"y of sequence {s} (length {hi - lo})")
        torch.testing.assert_close(fin[s], fin_ref[s], **STATE_TOL, msg=lambda m: f"final state {s}: {m}")


def test_one_sequence_and_the_op_through_kernels_ops(seed, monkeypatch):
    """One sequence of several chunks, fresh, through kernels/ops.py: HYBRIDSERVE_KERNELS=triton and
    =reference agree (and the default on a CPU tensor is the reference)."""
    H, P, G, N, cs = SHAPES[0]
    g = torch.Generator().manual_seed(seed)
    args, cu, _ = _inputs(g, [2 * cs + 5], H, P, G, N, torch.float32, "none")
    monkeypatch.setenv(ops.ENV, "reference")
    y_ref, fin_ref = ops.ssd_chunk_scan_varlen(*args, cu_seqlens=cu, chunk_size=cs)
    monkeypatch.setenv(ops.ENV, "triton")
    y, fin = ops.ssd_chunk_scan_varlen(*args, cu_seqlens=cu, chunk_size=cs)
    _close(y, y_ref, torch.float32, "y")
    torch.testing.assert_close(fin, fin_ref, **STATE_TOL)
    monkeypatch.delenv(ops.ENV)
    assert ops._pick("ssd_chunk_scan_varlen", args[0]) is (tk.OPS if CUDA else ops._FAST)["ssd_chunk_scan_varlen"]


# ---- the reference ------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_reference_equals_one_chunk_scan_per_sequence(seed, dtype):
    H, P, G, N, cs = SHAPES[0]
    g = torch.Generator().manual_seed(seed)
    lens = lengths(cs)
    args, cu, s0 = _inputs(g, lens, H, P, G, N, dtype, "some")
    x, dt, A, B, C, D, dt_bias = args
    y, fin = ref_ssd.ssd_chunk_scan_varlen(*args, cu_seqlens=cu, chunk_size=cs, initial_states=s0)
    bounds = cu.tolist()
    for s in range(len(lens)):
        lo, hi = bounds[s], bounds[s + 1]
        if lo == hi:
            assert torch.equal(fin[s], s0[s])
            continue
        r = slice(lo, hi)
        y_s, fin_s = ref_ssd.ssd_chunk_scan(x[r], dt[r], A, B[r], C[r], D, dt_bias, chunk_size=cs,
                                            initial_state=s0[s])
        assert torch.equal(y[r], y_s) and torch.equal(fin[s], fin_s), s


def test_reference_equals_the_step_by_step_recurrence(seed):
    """The definition, independently of ssd_chunk_scan: state = exp(dt A) state + dt x B^T, y = state C + D x,
    one position at a time (ssd_state_update with T = 1), per sequence, from its initial state or zeros."""
    H, P, G, N, cs = 4, 6, 2, 5, 4
    g = torch.Generator().manual_seed(seed)
    lens = [3, 11, 1, 0, 4]
    args, cu, s0 = _inputs(g, lens, H, P, G, N, torch.float32, "some")
    x, dt, A, B, C, D, dt_bias = args
    dt_limit = LIMITS[1]
    y, fin = ref_ssd.ssd_chunk_scan_varlen(*args, cu_seqlens=cu, chunk_size=cs, initial_states=s0, dt_limit=dt_limit)
    bounds = cu.tolist()
    for s in range(len(lens)):
        state = s0[s].clone()
        for t in range(bounds[s], bounds[s + 1]):
            r = slice(t, t + 1)
            y_t, states = ref_ssd.ssd_state_update(state, x[r], dt[r], A, B[r], C[r], D, dt_bias, dt_limit=dt_limit)
            state = states[0]
            torch.testing.assert_close(y[r], y_t, atol=1e-5, rtol=1e-5, msg=lambda m: f"y of row {t}: {m}")
        torch.testing.assert_close(fin[s], state, **STATE_TOL, msg=lambda m: f"final state {s}: {m}")
