"""The Triton kernels (kernels/triton/) give their references' numbers (kernels/reference/, or kernels/fast/
where the fast path's contract is the definition: ssd_verify's (cum, dt x) scratch).

Without a GPU they run under Triton's interpreter on CPU tensors (TRITON_INTERPRET=1, set by this
folder's conftest.py before kernels.triton is imported); with one, compiled on it. Every test draws a
fresh seed (printed, and shown by pytest when the test fails; HYBRIDSERVE_TEST_SEED=<n> replays it),
pushes values away from zero, and runs with the wrappers' outputs poisoned (NaN-filled), so an output
element a kernel never writes fails the comparison. In-place state updates are checked row by row:
updated rows against the reference, every other row bit for bit.

Dtypes: float32 and float16 everywhere; bfloat16 only on a GPU: the interpreter rounds float32 ->
bfloat16 casts toward zero (torch and GPUs round to nearest even), so the bf16 numbers it produces are
not the kernel's, and its tl.dot is wrong for bf16 operands. Shapes are small (the interpreter runs
each program in Python) but odd: head dims, channel counts and group sizes that are not powers of two,
several blocks along each tiled axis, block sizes below and at the key tile.
"""
from __future__ import annotations

import math

import pytest
import torch
from tests.kernel_inputs import nonzero

pytest.importorskip("triton", reason="triton is not installed (pyproject installs it on Linux only)")

from kernels import ops  # noqa: E402
from kernels import triton as tk  # noqa: E402
from kernels.fast import conv1d as fast_conv  # noqa: E402
from kernels.fast import ssd as fast_ssd  # noqa: E402
from kernels.reference import attention as ref_attn  # noqa: E402
from kernels.reference import conv1d as ref_conv  # noqa: E402
from kernels.reference import moe as ref_moe  # noqa: E402
from kernels.reference import norm as ref_norm  # noqa: E402
from kernels.reference import ssd as ref_ssd  # noqa: E402
from kernels.triton import attention as tri_attn  # noqa: E402
from kernels.triton import conv1d as tri_conv  # noqa: E402
from kernels.triton import moe as tri_moe  # noqa: E402
from kernels.triton import norm as tri_norm  # noqa: E402
from kernels.triton import ssd as tri_ssd  # noqa: E402

CUDA = torch.cuda.is_available() and not tk.INTERPRET
DEVICE = "cuda" if CUDA else "cpu"
if not CUDA and not tk.INTERPRET:
    raise RuntimeError("kernels.triton was imported before TRITON_INTERPRET=1 was set (see conftest.py)")

TOL = {  # (atol, rtol) of a kernel's outputs against the reference's
    torch.float32: (3e-5, 3e-5),
    torch.float16: (4e-3, 4e-3),
    torch.bfloat16: (3e-2, 2e-2),
}
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if CUDA else [])
STATE_TOL = dict(atol=1e-4, rtol=1e-4)     # float32 states, summed in another order


@pytest.fixture(autouse=True)
def poisoned_outputs(poison_triton_outputs):
    """Every test here runs with the wrappers' outputs NaN-filled first (conftest.py)."""


_nonzero = nonzero


def _rand(g, *shape, scale=1.0, dtype=torch.float32):
    return _nonzero(torch.randn(*shape, generator=g) * scale).to(dtype).to(DEVICE)


def _close(actual, expected, dtype, what=""):
    atol, rtol = TOL[dtype]
    assert actual.dtype == expected.dtype, (what, actual.dtype, expected.dtype)
    torch.testing.assert_close(actual.float(), expected.float(), atol=atol, rtol=rtol,
                               msg=lambda m: f"{what}: {m}")


def _state_close(actual, expected, what=""):
    torch.testing.assert_close(actual, expected.float(), **STATE_TOL, msg=lambda m: f"{what}: {m}")


def _strided(g, *shape, dtype):
    """A random tensor of `shape` whose rows are strided (a column slice of a wider tensor, as the model's
    x, B, C, z are slices of one projection's output)."""
    *lead, last = shape
    wide = _rand(g, *lead, last + 3, dtype=dtype)
    return wide[..., 1:last + 1]


# ---- SSD: the selective state update, verification, commit -----------------------------------------------

SSD_SHAPES = [(4, 24, 2, 12), (6, 8, 3, 16)]      # (H, P, G, N): P over 2 blocks of 16, N not a power of 2
ssd_ids = lambda s: "H{}-P{}-G{}-N{}".format(*s)  # noqa: E731
LIMITS = [(0.0, float("inf")), (0.05, 0.8)]


def _ssd_inputs(g, S, T, H, P, G, N, dtype):
    """x (S, T, H, P), dt (S, T, H), B, C (S, T, G, N) as strided views; A, D, dt_bias (H,) float32."""
    x = _strided(g, S, T, H * P, dtype=dtype).unflatten(-1, (H, P))
    B = _strided(g, S, T, G * N, dtype=dtype).unflatten(-1, (G, N))
    C = _strided(g, S, T, G * N, dtype=dtype).unflatten(-1, (G, N))
    dt = _strided(g, S, T, H, dtype=dtype) * 0.5
    A = (-torch.exp(torch.empty(H).uniform_(-3.0, 1.5, generator=g))).to(DEVICE)
    D = _rand(g, H)
    dt_bias = _nonzero(torch.rand(H, generator=g) * 2 - 1.5).to(DEVICE)
    return x, dt, A, B, C, D, dt_bias


def _ref_step(state_row, x, dt, A, B, C, D, dt_bias, s, dt_limit):
    """Reference decode step of row s: y (1, H, P), new state (H, P, N)."""
    y, states = ref_ssd.ssd_state_update(state_row, x[s:s + 1], dt[s:s + 1], A, B[s:s + 1], C[s:s + 1], D, dt_bias,
                                         dt_limit=dt_limit)
    return y, states[0]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SSD_SHAPES, ids=ssd_ids)
@pytest.mark.parametrize("dt_limit", LIMITS, ids=["no-limit", "limit"])
@pytest.mark.parametrize("layout", ["rows", "live-mask", "slots"])
def test_selective_state_update_in_place(seed, dtype, shape, dt_limit, layout):
    """ssd_update_ on S rows in place (the model's dense slot range), with a live mask (a slot range with
    holes: dead rows keep their state bit for bit), and through slot indices into a larger cache."""
    H, P, G, N = shape
    S, num_slots = 4, 7
    g = torch.Generator().manual_seed(seed)
    x, dt, A, B, C, D, dt_bias = _ssd_inputs(g, S, 1, H, P, G, N, dtype)
    x, dt, B, C = x[:, 0], dt[:, 0], B[:, 0], C[:, 0]
    cache = _rand(g, 2, num_slots, H, P, N)[1]                 # one layer's slots of a (L, slots, ...) stack
    before = cache.clone()
    rows = torch.randperm(num_slots, generator=g)[:S] if layout == "slots" else torch.arange(S)
    live = torch.tensor([True, False, True, False], device=DEVICE) if layout == "live-mask" else None
    if layout == "slots":
        y = tri_ssd.ssd_update_(cache, x, dt, A, B, C, D, dt_bias, dt_limit=dt_limit, slots=rows.to(DEVICE))
    else:
        y = tri_ssd.ssd_update_(cache[:S], x, dt, A, B, C, D, dt_bias, dt_limit=dt_limit, live=live)
    assert y.shape == (S, H, P) and y.dtype == dtype and not y.isnan().any()
    for s in range(S):
        slot = int(rows[s])
        if live is not None and not live[s]:
            assert torch.equal(cache[slot], before[slot]), f"dead row {s} changed"
            continue
        y_ref, st_ref = _ref_step(before[slot], x, dt, A, B, C, D, dt_bias, s, dt_limit)
        _close(y[s:s + 1], y_ref, dtype, f"y of row {s}")
        _state_close(cache[slot], st_ref, f"state of row {s} (slot {slot})")
    for slot in set(range(num_slots)) - {int(rows[s]) for s in range(S)}:
        assert torch.equal(cache[slot], before[slot]), f"untouched slot {slot} changed"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("fresh", [False, True], ids=["state", "fresh"])
def test_ssd_step_returns_new_states_and_leaves_the_input_alone(seed, dtype, fresh):
    H, P, G, N = SSD_SHAPES[0]
    S = 3
    g = torch.Generator().manual_seed(seed)
    x, dt, A, B, C, D, dt_bias = _ssd_inputs(g, S, 1, H, P, G, N, dtype)
    x, dt, B, C = x[:, 0], dt[:, 0], B[:, 0], C[:, 0]
    state = _rand(g, S, H, P, N)
    before = state.clone()
    y, new = tri_ssd.ssd_step(None if fresh else state, x, dt, A, B, C, D, dt_bias)
    assert torch.equal(state, before)
    for s in range(S):
        y_ref, st_ref = _ref_step(torch.zeros_like(state[s]) if fresh else state[s], x, dt, A, B, C, D, dt_bias, s,
                                  LIMITS[0])
        _close(y[s:s + 1], y_ref, dtype, f"y of row {s}")
        _state_close(new[s], st_ref, f"state of row {s}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SSD_SHAPES, ids=ssd_ids)
@pytest.mark.parametrize("T", [1, 3])
@pytest.mark.parametrize("fresh", [False, True], ids=["state", "fresh"])
def test_verification_outputs_and_every_committable_state(seed, dtype, shape, T, fresh):
    """ssd_verify over T = k+1 positions: y against the reference's recurrence, (cum, dt x) against the fast
    path's; then the state after any accepted position, built by ssd_state_at (per sequence) and by
    ssd_advance_ (in place on a strided stack of layers), against the reference's states."""
    H, P, G, N = shape
    S = 3
    g = torch.Generator().manual_seed(seed)
    x, dt, A, B, C, D, dt_bias = _ssd_inputs(g, S, T, H, P, G, N, dtype)
    s0 = None if fresh else _rand(g, S, H, P, N)
    limit = LIMITS[1]
    y, cum, dtx = tri_ssd.ssd_verify(s0, x, dt, A, B, C, D, dt_bias, dt_limit=limit)
    _, cum_f, dtx_f = fast_ssd.ssd_verify(s0, x, dt, A, B, C, D, dt_bias, dt_limit=limit)
    torch.testing.assert_close(cum, cum_f, **STATE_TOL)
    torch.testing.assert_close(dtx, dtx_f, **STATE_TOL)
    refs = []
    for s in range(S):
        start = torch.zeros(H, P, N, device=DEVICE) if fresh else s0[s]
        y_ref, states_ref = ref_ssd.ssd_state_update(start, x[s], dt[s], A, B[s], C[s], D, dt_bias, dt_limit=limit)
        _close(y[s], y_ref, dtype, f"y of sequence {s}")
        refs.append(states_ref)
    index = torch.randint(0, T, (S,), generator=g).to(DEVICE)
    got = tri_ssd.ssd_state_at(s0, cum, dtx, B, index)
    for s in range(S):
        _state_close(got[s], refs[s][int(index[s])], f"ssd_state_at, sequence {s} at {int(index[s])}")
    # ssd_advance_: the S sequences play the layers of one slot in an (L, slots, H, P, N) cache.
    stack = _rand(g, S, 3, H, P, N)
    if fresh:
        stack[:, 1] = 0.0
    else:
        stack[:, 1] = s0
    before = stack.clone()
    j = T - 1
    tri_ssd.ssd_advance_(stack[:, 1], cum, dtx, B, j)
    for s in range(S):
        _state_close(stack[s, 1], refs[s][j], f"ssd_advance_, layer {s}")
    assert torch.equal(stack[:, 0], before[:, 0]) and torch.equal(stack[:, 2], before[:, 2])


# ---- causal depthwise conv1d: one-step update, T positions ------------------------------------------------

def _conv_inputs(g, S, T, Cdim, K, dtype, with_bias=True):
    """x (S, T, C) strided; weight (C, K), bias (C,) float32 parameters; a float32 window (S, C, K-1)
    holding dtype-representable values, as the model's cache does."""
    x = _strided(g, S, T, Cdim, dtype=dtype)
    w = _rand(g, Cdim, K, scale=0.5)
    b = _rand(g, Cdim, scale=0.5) if with_bias else None
    state = _rand(g, S, Cdim, K - 1, dtype=dtype).float()
    return x, w, b, state


CONV_CASES = [(40, 4, True, True), (40, 4, False, False), (24, 2, True, True), (33, 3, True, False)]
def conv_ids(c):
    return "C{}-K{}-{}-{}".format(c[0], c[1], "bias" if c[2] else "nobias", "silu" if c[3] else "linear")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CONV_CASES, ids=conv_ids)
@pytest.mark.parametrize("layout", ["rows", "slots"])
def test_conv_step_in_place(seed, dtype, case, layout):
    """conv_step_ on the model's slot range, or through slot indices into a larger cache: y against the
    reference, the new window bit for bit (it is a copy of inputs), other slots untouched."""
    Cdim, K, with_bias, silu = case
    S, num_slots = 3, 6
    g = torch.Generator().manual_seed(seed)
    x, w, b, _ = _conv_inputs(g, S, 1, Cdim, K, dtype, with_bias)
    x = x[:, 0]
    cache = _rand(g, num_slots, Cdim, K - 1, dtype=dtype).float()
    before = cache.clone()
    rows = torch.randperm(num_slots, generator=g)[:S] if layout == "slots" else torch.arange(S)
    if layout == "slots":
        y = tri_conv.conv_step_(cache, x, w, b, activation=silu, slots=rows.to(DEVICE))
    else:
        y = tri_conv.conv_step_(cache[:S], x, w, b, activation=silu)
    assert y.shape == (S, Cdim) and y.dtype == dtype
    for s in range(S):
        slot = int(rows[s])
        y_ref, st_ref = ref_conv.causal_conv1d_update(x[s:s + 1], before[slot], w, b, activation=silu)
        _close(y[s:s + 1], y_ref, dtype, f"y of row {s}")
        assert torch.equal(cache[slot], st_ref[0].float()), f"window of row {s} (slot {slot})"
    for slot in set(range(num_slots)) - set(rows.tolist()):
        assert torch.equal(cache[slot], before[slot]), f"untouched slot {slot} changed"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_conv_step_returns_new_windows_and_leaves_the_input_alone(seed, dtype):
    S, Cdim, K = 3, 40, 4
    g = torch.Generator().manual_seed(seed)
    x, w, b, state = _conv_inputs(g, S, 1, Cdim, K, dtype)
    before = state.clone()
    y, new = tri_conv.conv_step(x[:, 0], state, w, b)
    y_fast, new_fast = fast_conv.conv_step(x[:, 0], before.clone(), w, b)
    assert torch.equal(state, before) and torch.equal(new, new_fast)
    _close(y, y_fast, dtype, "y")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("T", [1, 4])
@pytest.mark.parametrize("fresh", [False, True], ids=["state", "fresh"])
@pytest.mark.parametrize("case", CONV_CASES[:3], ids=conv_ids)
def test_conv_over_T_positions_returns_the_window_after_each(seed, dtype, T, fresh, case):
    Cdim, K, with_bias, silu = case
    S = 3
    g = torch.Generator().manual_seed(seed)
    x, w, b, state = _conv_inputs(g, S, T, Cdim, K, dtype, with_bias)
    y, states = tri_conv.causal_conv1d_update(x, None if fresh else state, w, b, activation=silu)
    assert y.shape == (S, T, Cdim) and states.shape == (S, T, Cdim, K - 1) and states.dtype == dtype
    for s in range(S):
        start = torch.zeros_like(state[s]) if fresh else state[s]
        y_ref, st_ref = ref_conv.causal_conv1d_update(x[s], start, w, b, activation=silu)
        _close(y[s], y_ref, dtype, f"y of sequence {s}")
        assert torch.equal(states[s], st_ref), f"windows of sequence {s}"


# ---- RMSNorm, gated grouped RMSNorm -------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("group_size", [48, 24, 12])
def test_gated_rms_norm(seed, dtype, group_size):
    """x (2, 3, 48) contiguous, z a strided column slice (as z is of in_proj's output); groups of 48, 24, 12."""
    g = torch.Generator().manual_seed(seed)
    x = _rand(g, 2, 3, 48, dtype=dtype)
    z = _strided(g, 2, 3, 48, dtype=dtype)
    w = _rand(g, 48)
    y = tri_norm.gated_rms_norm(x, z, w, group_size=group_size, eps=1e-5)
    _close(y, ref_norm.gated_rms_norm(x, z, w, group_size=group_size, eps=1e-5), dtype, "y")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("D", [64, 40])
def test_rms_norm(seed, dtype, D):
    g = torch.Generator().manual_seed(seed)
    x = _strided(g, 5, D, dtype=dtype)
    w = _rand(g, D)
    _close(tri_norm.rms_norm(x, w, 1e-5), ref_norm.rms_norm(x, w, 1e-5), dtype, "y")


# ---- paged attention ------------------------------------------------------------------------------------

# (positions, H, H_kv, Dh, block_size): GQA groups of 2, 8 and 1; Dh not a power of 2; blocks under,
# at and not dividing the 16-key tile.
ATTN_SHAPES = [(19, 4, 2, 16, 4), (33, 8, 1, 24, 16), (10, 4, 4, 16, 5)]
attn_ids = lambda s: "L{}-H{}-Hkv{}-Dh{}-bs{}".format(*s)  # noqa: E731


def _pool(g, num_blocks, bs, hkv, Dh, dtype):
    """A cache pool full of garbage: a wrong block lookup reads values that change the result."""
    k = (torch.randn(num_blocks, bs, hkv, Dh, generator=g) * 5 + 3).to(dtype).to(DEVICE)
    v = (torch.randn(num_blocks, bs, hkv, Dh, generator=g) * 5 - 3).to(dtype).to(DEVICE)
    return k, v


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", ATTN_SHAPES, ids=attn_ids)
def test_write_kv_then_paged_attention_over_a_shuffled_block_table(seed, dtype, shape):
    """Writes land where the reference's do (bit for bit; other blocks untouched); queries from start
    positions 0 (a prefill chunk), mid-sequence, and last (decode) attend as the reference does."""
    L, H, hkv, Dh, bs = shape
    g = torch.Generator().manual_seed(seed)
    num_blocks = 2 * math.ceil(L / bs) + 4
    k_cache, v_cache = _pool(g, num_blocks, bs, hkv, Dh, dtype)
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    table = torch.randperm(num_blocks, generator=g).to(DEVICE)[::2][:math.ceil(L / bs)]   # strided, as slices are
    q = _strided(g, L, H * Dh, dtype=dtype).unflatten(-1, (H, Dh))
    k = _rand(g, L, hkv, Dh, dtype=dtype)
    v = _rand(g, L, hkv, Dh, dtype=dtype)
    split = L // 3
    tri_attn.write_kv(k_cache, v_cache, k[:split], v[:split], table, 0)
    tri_attn.write_kv(k_cache, v_cache, k[split:], v[split:], table, split)
    ref_attn.write_kv(k_ref, v_ref, k, v, table, 0)
    assert torch.equal(k_cache, k_ref) and torch.equal(v_cache, v_ref)
    for start in sorted({0, L // 2, L - 4, L - 1}):
        out = tri_attn.paged_attention(q[start:], k_cache, v_cache, table, start_pos=start)
        ref = ref_attn.paged_attention(q[start:], k_ref, v_ref, table, start_pos=start)
        _close(out, ref, dtype, f"queries from {start}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", ATTN_SHAPES, ids=attn_ids)
def test_decode_attention_over_sequences_of_different_lengths(seed, dtype, shape):
    """One new token of each of 4 sequences (lengths 1, mid, long, at a block boundary), block tables of
    different lengths interleaved in one pool: the reference's writes (bit for bit) and outputs."""
    L, H, hkv, Dh, bs = shape
    g = torch.Generator().manual_seed(seed)
    positions = [0, L // 2, L - 1, bs - 1]
    S = len(positions)
    num_blocks = S * math.ceil(L / bs) + 2
    k_cache, v_cache = _pool(g, num_blocks, bs, hkv, Dh, dtype)
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    perm = torch.randperm(num_blocks, generator=g).to(DEVICE)
    tables = [perm[i::S][:pos // bs + 1] for i, pos in enumerate(positions)]
    q = _rand(g, S, H, Dh, dtype=dtype)
    k = _rand(g, S, hkv, Dh, dtype=dtype)
    v = _rand(g, S, hkv, Dh, dtype=dtype)
    out = tri_attn.decode_attention(q, k, v, k_cache, v_cache, tables, positions)
    for i, (table, pos) in enumerate(zip(tables, positions)):
        ref_attn.write_kv(k_ref, v_ref, k[i:i + 1], v[i:i + 1], table, pos)
        ref = ref_attn.paged_attention(q[i:i + 1], k_ref, v_ref, table, start_pos=pos)
        _close(out[i:i + 1], ref, dtype, f"sequence {i} at {pos}")
    assert torch.equal(k_cache, k_ref) and torch.equal(v_cache, v_ref)


# ---- latent MoE: routed experts --------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("T,routing", [(1, "spread"), (5, "spread"), (20, "skewed")])
def test_grouped_experts_of_one_shard(seed, dtype, T, routing):
    """A shard owning experts 3..8 of 12 (choices outside add 0). Skewed routing sends every token's first
    choice to one expert: its 20 pairs span two blocks of 16. I and D_in are not powers of 2.

    The kernel sums the pairs' rows in a combine buffer it zero-fills itself (pairs of other shards add 0),
    so the NaN poison reaches only the intermediate (T*k, I) rows; a pair whose down row is never written
    would just add 0. Hence inputs where no pair adds 0 anywhere: positive down weights and routing
    weights in [0.5, 1) on relu² >= 0 make every element of every owned pair's term positive, and larger
    than the tolerance (checked first, per pair, on the reference), so a term left out fails the test."""
    E, inter, Din, k, first, total = 6, 40, 24, 2, 3, 12
    g = torch.Generator().manual_seed(seed)
    x = _rand(g, T, Din, dtype=dtype)
    up = _rand(g, E, inter, Din, scale=0.3, dtype=dtype)
    down = (0.05 + 0.1 * torch.rand(E, Din, inter, generator=g)).to(dtype).to(DEVICE)
    ids = torch.stack([torch.randperm(total, generator=g)[:k] for _ in range(T)])
    if routing == "skewed":
        ids[:, 0] = first + 1
        ids[:, 1] = torch.where(ids[:, 1] == first + 1, first + 2, ids[:, 1])
    ids = ids.to(DEVICE)
    w = (0.5 + 0.5 * torch.rand(T, k, generator=g)).to(DEVICE)
    atol, _ = TOL[dtype]
    for j in range(k):                                 # each choice alone: the other one set to a foreign id
        alone = ids.clone()
        alone[:, 1 - j] = -1
        term = ref_moe.grouped_experts(x, w, alone, up, down, first_expert=first).float()   # (T, D_in)
        ours = (ids[:, j] >= first) & (ids[:, j] < first + E)
        assert (term[ours] > 10 * atol).all(), f"choice {j}: a term within the tolerance would go unseen"
        assert (term[~ours] == 0).all()
    out = tri_moe.grouped_experts(x, w, ids, up, down, first_expert=first)
    _close(out, ref_moe.grouped_experts(x, w, ids, up, down, first_expert=first), dtype, "out")


# ---- kernels/ops.py: dispatch -----------------------------------------------------------------------------

def test_ops_dispatch_follows_the_device_and_the_environment(monkeypatch):
    from kernels.fast import norm as fast_norm

    t = torch.zeros(2, device=DEVICE)
    monkeypatch.delenv(ops.ENV, raising=False)
    assert ops._pick("gated_rms_norm", t) is (tri_norm.gated_rms_norm if CUDA else fast_norm.gated_rms_norm)
    for forced, expected in [("auto", tri_norm.gated_rms_norm if CUDA else fast_norm.gated_rms_norm),
                             ("triton", tri_norm.gated_rms_norm), ("fast", fast_norm.gated_rms_norm),
                             ("reference", ref_norm.gated_rms_norm)]:
        monkeypatch.setenv(ops.ENV, forced)
        assert ops._pick("gated_rms_norm", t) is expected, forced
    monkeypatch.setenv(ops.ENV, "tritonn")
    with pytest.raises(ValueError, match="tritonn"):
        ops.rms_norm(t, t, 1e-5)
    assert set(tk.OPS) == set(ops._FAST) == set(ops._REFERENCE)


@pytest.mark.parametrize("forced", ["reference", "triton"])
def test_ops_reference_and_triton_choices_agree_with_the_fast_path(seed, monkeypatch, forced):
    """The batched ops through kernels/ops.py under each forced choice (the reference choice loops the
    per-sequence references): same numbers as the default CPU fast path, live mask included."""
    H, P, G, N = SSD_SHAPES[1]
    S = 4
    g = torch.Generator().manual_seed(seed)
    x, dt, A, B, C, D, dt_bias = _ssd_inputs(g, S, 1, H, P, G, N, torch.float32)
    x, dt, B, C = x[:, 0], dt[:, 0], B[:, 0], C[:, 0]
    state = _rand(g, S, H, P, N)
    live = torch.tensor([True, False, True, True], device=DEVICE)
    cx, cw, cb, cstate = _conv_inputs(g, S, 3, 24, 4, torch.float32)
    monkeypatch.setenv(ops.ENV, "fast")
    expected_state = state.clone()
    y_expected = ops.ssd_update_(expected_state, x, dt, A, B, C, D, dt_bias, live=live)
    conv_expected = ops.causal_conv1d_update(cx, cstate, cw, cb)
    win_expected = cstate.clone()
    yc_expected = ops.conv_step_(win_expected, cx[:, 0], cw, cb)
    monkeypatch.setenv(ops.ENV, forced)
    got_state = state.clone()
    y = ops.ssd_update_(got_state, x, dt, A, B, C, D, dt_bias, live=live)
    _close(y, y_expected, torch.float32, "ssd_update_ y")
    _state_close(got_state, expected_state, "ssd_update_ states")
    assert torch.equal(got_state[1], state[1])
    for a, b in zip(ops.causal_conv1d_update(cx, cstate, cw, cb), conv_expected):
        _close(a, b, torch.float32, "causal_conv1d_update")
    win = cstate.clone()
    _close(ops.conv_step_(win, cx[:, 0], cw, cb), yc_expected, torch.float32, "conv_step_")
    assert torch.equal(win, win_expected)


# ---- a tiny model's forward through kernels/ops.py with HYBRIDSERVE_KERNELS=triton -----------------------

@torch.no_grad()
def test_tiny_model_forward_with_triton_kernels_equals_the_reference_path(monkeypatch):
    """The `tiny` preset (Mamba, attention, latent MoE, dense MLP layers) in float32, through a plan that
    takes every dispatched op (the MoE's routed experts in every pass): prompts (the prefill ops without
    a Triton kernel fall back to the fast path), then a ragged batch of two decode steps (batched decode
    attention, in-place SSM update over a slot range with a hole: the live mask), a verification pass of
    4 tokens (conv/SSD over T positions, paged attention with 4 queries) and a short prompt chunk; the
    commit of the verified sequence (ssd_advance_) and one more decode step; then two prompt chunks longer
    than a short chunk, continuing from their states (ssd_chunk_scan_varlen, prefill_attention).
    HYBRIDSERVE_KERNELS=triton against =reference: logits of every pass, and every cache."""
    from model_shards.batch import BatchLayout, SeqSlice
    from model_shards.model import HybridModel
    from model_shards.presets import get_preset

    model = HybridModel(get_preset("tiny")).init_random(0).eval().to(DEVICE)
    vocab, bs, num_blocks = model.cfg.vocab_size, 4, 24
    g = torch.Generator().manual_seed(7)
    perm = torch.randperm(num_blocks, generator=g).to(DEVICE)
    tables = {slot: perm[slot::4] for slot in range(4)}                   # 6 blocks each
    ids = {slot: torch.randint(3, vocab, (12,), generator=g).to(DEVICE) for slot in range(4)}

    def plan(mode: str):
        monkeypatch.setenv(ops.ENV, mode)
        cache = model.make_cache(num_blocks=num_blocks, block_size=bs, num_slots=4, max_verify_positions=4,
                                 device=DEVICE)
        logits = []

        def run(seqs, tokens):
            layout = BatchLayout([SeqSlice(*s) for s in seqs])
            logits.append(model.logits(model(torch.cat(tokens), layout, cache)))

        run([(0, 5, 0, 0, tables[0], False)], [ids[0][:5]])               # prompts (chunked scan: fast)
        run([(0, 6, 0, 2, tables[2], False)], [ids[2][:6]])
        run([(0, 7, 0, 3, tables[3], False)], [ids[3][:7]])
        run([(0, 1, 5, 0, tables[0], False), (1, 1, 7, 3, tables[3], False),   # decode, slots 0 and 3 (hole)
             (2, 4, 6, 2, tables[2], True),                                   # verification of 4 tokens
             (6, 3, 0, 1, tables[1], False)],                                 # a short fresh prompt chunk
            [ids[0][5:6], ids[3][7:8], ids[2][6:10], ids[1][:3]])
        cache.commit(2, 2)
        run([(0, 1, 9, 2, tables[2], False), (1, 1, 6, 0, tables[0], False)], [ids[2][9:10], ids[0][6:7]])
        more = torch.randint(3, vocab, (19,), generator=torch.Generator().manual_seed(8)).to(DEVICE)
        run([(0, 10, 7, 0, tables[0], False), (10, 9, 8, 3, tables[3], False)],   # longer than a short chunk:
            [more[:10], more[10:]])                                           # the varlen chunked scan, prefill attention
        return logits, cache

    ref_logits, ref_cache = plan("reference")
    tri_logits, tri_cache = plan("triton")
    for n, (a, b) in enumerate(zip(tri_logits, ref_logits)):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4, msg=lambda m: f"pass {n}: {m}")
    for i in ref_cache.mamba:
        _state_close(tri_cache.mamba[i].conv, ref_cache.mamba[i].conv, f"conv states of layer {i}")
        _state_close(tri_cache.mamba[i].ssm, ref_cache.mamba[i].ssm, f"SSM states of layer {i}")
    for i in ref_cache.kv:
        _state_close(tri_cache.kv[i].k, ref_cache.kv[i].k, f"keys of layer {i}")
        _state_close(tri_cache.kv[i].v, ref_cache.kv[i].v, f"values of layer {i}")
