"""The fused C kernels (kernels/fast/native.py) give the references' numbers. The norms, on strided rows; the
Mamba decode step and
verification of several sequences, whose states sit in scattered cache slots and whose inputs are rows of a
strided in_proj output, equal the reference conv (kernels/reference/conv1d.py) and SSD
(kernels/reference/ssd.py) run on each sequence alone; and they touch nothing else. float32 only: the
kernels take float32 calls and leave every other dtype to the torch ops (the last tests).
"""
from __future__ import annotations

import pytest
import torch

from kernels import ops
from kernels.fast import native
from kernels.fast import ssd as fast_ssd
from kernels.fast import norm as fast_norm
from kernels.fast import moe as fast_moe
from kernels.reference import attention as ref_attn
from kernels.reference import conv1d as ref_conv
from kernels.reference import moe as ref_moe
from kernels.reference import norm as ref_norm
from kernels.reference import ssd as ref_ssd

pytestmark = pytest.mark.skipif(native.library() is None, reason=f"native kernels not built: {native.why_not()}")

ATOL, RTOL = 5e-5, 5e-5          # float32 sums in another order (and the SSD as a recurrence)
POISON = 1234.5


def _nonzero(t, floor=1e-2):
    return torch.where(t >= 0, t.clamp_min(floor), t.clamp_max(-floor))


def _layer(seed, *, H=8, P=16, G=2, N=8, K=4, slots=9, rows=12, Tmax=5, bias=True):
    """A layer's caches and a pass's in_proj output, every value random and away from zero."""
    g = torch.Generator().manual_seed(seed)
    C = H * P + 2 * G * N

    def rand(*shape, scale=1.0):
        return _nonzero(torch.randn(*shape, generator=g) * scale)
    zxbcdt = rand(rows, H * P + C + H + 3)                       # (rows, z | xBC | dt | padding): strided views
    return dict(
        H=H, P=P, G=G, N=N, K=K, C=C,
        conv=rand(slots, C, K - 1), ssm=rand(slots, H, P, N, scale=0.5),
        xbc=zxbcdt[:, H * P:H * P + C], dt=zxbcdt[:, H * P + C:H * P + C + H] * 0.5,
        conv_w=rand(C, 1, K, scale=0.5)[:, 0, :], conv_b=rand(C) if bias else None,
        A=-torch.exp(torch.empty(H).uniform_(-3.0, 1.5, generator=g)), D=rand(H),
        dt_bias=_nonzero(torch.rand(H, generator=g) * 2 - 1.5),
        scratch=(torch.full((slots, Tmax, C, K - 1), POISON), torch.full((slots, H, Tmax), POISON),
                 torch.full((slots, H, Tmax, P), POISON), torch.full((slots, Tmax, G, N), POISON)))


def _reference(L, slot, row0, T, dt_limit):
    """Sequence alone through the references: y (T, H*P), conv windows (T, C, K-1), SSM states (T, H, P, N)."""
    H, P, G, N = L["H"], L["P"], L["G"], L["N"]
    xbc, windows = ref_conv.causal_conv1d_update(L["xbc"][row0:row0 + T], L["conv"][slot], L["conv_w"], L["conv_b"])
    x, B, C = torch.split(xbc, [H * P, G * N, G * N], dim=-1)
    y, states = ref_ssd.ssd_state_update(L["ssm"][slot], x.reshape(T, H, P), L["dt"][row0:row0 + T], L["A"],
                                         B.reshape(T, G, N), C.reshape(T, G, N), L["D"], L["dt_bias"],
                                         dt_limit=dt_limit)
    return y.reshape(T, H * P), windows, states


def _close(a, b):
    torch.testing.assert_close(a, b, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("shape", [dict(H=8, P=16, G=2, N=8, K=4), dict(H=6, P=4, G=3, N=16, K=3),
                                   dict(H=4, P=8, G=1, N=32, K=2)])
@pytest.mark.parametrize("dt_limit", [(0.0, float("inf")), (0.05, 0.8)])
@pytest.mark.parametrize("bias", [True, False])
def test_decode_step_of_scattered_slots_is_each_sequence_alone(seed, shape, dt_limit, bias):
    L = _layer(seed, bias=bias, **shape)
    slots, rows = [6, 1, 4], [9, 0, 5]                          # out of order, with holes
    before = {name: L[name].clone() for name in ("conv", "ssm")}
    y = torch.full((12, L["H"] * L["P"]), POISON)
    assert ops.mamba_decode_(L["conv"], L["ssm"], slots, rows, L["xbc"], L["dt"], L["conv_w"], L["conv_b"], L["A"],
                             L["D"], L["dt_bias"], y, dt_limit=dt_limit)
    for slot, row in zip(slots, rows):
        before_state = {name: before[name][slot] for name in ("conv", "ssm")}
        ref = _reference({**L, "conv": before["conv"], "ssm": before["ssm"]}, slot, row, 1, dt_limit)
        _close(y[row], ref[0][0])
        _close(L["conv"][slot], ref[1][0])
        _close(L["ssm"][slot], ref[2][0])
        assert not torch.equal(L["ssm"][slot], before_state["ssm"])
    others = [s for s in range(9) if s not in slots]
    assert torch.equal(L["conv"][others], before["conv"][others]) and torch.equal(L["ssm"][others], before["ssm"][others])
    assert torch.all(y[[r for r in range(12) if r not in rows]] == POISON)      # other rows never written


@pytest.mark.parametrize("T", [1, 2, 4, 5])
@pytest.mark.parametrize("dt_limit", [(0.0, float("inf")), (0.05, 0.8)])
@pytest.mark.parametrize("bias", [True, False])
def test_verification_outputs_and_every_committable_state_are_each_sequence_alone(seed, T, dt_limit, bias):
    """Outputs at every position, the slots' states untouched, and scratch from which the commit
    (ssd_advance_, the conv window) rebuilds the reference's state after any position."""
    L = _layer(seed, bias=bias)
    slots, rows0 = [7, 2], [T, 0]                                # sequence 1's rows come first in the pass
    before = {name: L[name].clone() for name in ("conv", "ssm")}
    y = torch.full((12, L["H"] * L["P"]), POISON)
    assert ops.mamba_verify_(L["conv"], L["ssm"], L["scratch"], slots, rows0, T, L["xbc"], L["dt"], L["conv_w"],
                             L["conv_b"], L["A"], L["D"], L["dt_bias"], y, dt_limit=dt_limit)
    assert torch.equal(L["conv"], before["conv"]) and torch.equal(L["ssm"], before["ssm"])
    s_conv, s_cum, s_dtx, s_B = L["scratch"]
    for slot, row0 in zip(slots, rows0):
        y_ref, windows, states = _reference(L, slot, row0, T, dt_limit)
        _close(y[row0:row0 + T], y_ref)
        _close(s_conv[slot, :T], windows)
        for index in range(T):                                   # commit at each position, as the cache does
            state = L["ssm"][slot].clone()[None]
            fast_ssd.ssd_advance_(state, s_cum[slot:slot + 1, :, :T], s_dtx[slot:slot + 1, :, :T],
                                  s_B[slot:slot + 1, :T], index)
            torch.testing.assert_close(state[0], states[index], atol=1e-4, rtol=1e-4)
    untouched = [s for s in range(9) if s not in slots]
    assert all(torch.all(t[untouched] == POISON) for t in L["scratch"])
    assert all(torch.all(t[slots][:, T:] == POISON) for t in (s_conv, s_B))   # positions past T: not written
    assert torch.all(y[2 * T:] == POISON)


def test_calls_the_kernels_cannot_read_are_left_to_the_torch_ops(seed, monkeypatch):
    L = _layer(seed)
    y = torch.zeros(12, L["H"] * L["P"])
    args = (L["conv"], L["ssm"], [1], [0], L["xbc"], L["dt"], L["conv_w"], L["conv_b"], L["A"], L["D"], L["dt_bias"])
    assert not ops.mamba_decode_(*args, y.to(torch.bfloat16))                  # not float32
    assert not ops.mamba_decode_(L["conv"].transpose(1, 2).contiguous().transpose(1, 2), *args[1:], y)  # strided cache
    w = L["conv_w"].clone().requires_grad_()
    with torch.enable_grad():                                                     # autograd needs the torch ops
        assert not ops.mamba_decode_(*args[:6], w, *args[7:], y)
    monkeypatch.setenv("HYBRIDSERVE_KERNELS", "reference")
    assert not ops.mamba_decode_(*args, y)
    monkeypatch.setenv("HYBRIDSERVE_KERNELS", "fast")
    monkeypatch.setattr(native, "ENABLED", False)          # HYBRIDSERVE_NATIVE=0
    assert not ops.mamba_decode_(*args, y) and not ops.mamba_verify_(
        L["conv"], L["ssm"], L["scratch"], [1], [0], 2, *args[4:], y)
    monkeypatch.setattr(native, "ENABLED", True)
    with pytest.raises(IndexError):                                               # a slot outside the cache
        ops.mamba_decode_(L["conv"], L["ssm"], [9], [0], *args[4:], y)


def test_a_machine_without_a_compiler_serves_with_the_torch_ops(tmp_path, monkeypatch):
    monkeypatch.setattr(native, "_tried", False)
    monkeypatch.setattr(native, "_lib", None)
    monkeypatch.setenv("HYBRIDSERVE_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    assert native.library() is None and "no-such-compiler" in native.why_not()
    L = _layer(1)
    assert not ops.mamba_decode_(L["conv"], L["ssm"], [1], [0], L["xbc"], L["dt"], L["conv_w"], L["conv_b"],
                                 L["A"], L["D"], L["dt_bias"], torch.zeros(12, L["H"] * L["P"]))
    assert list(tmp_path.glob("native/*.so")) == []


def test_loading_the_kernels_leaves_subnormal_floats_alone():
    """Built with -ffast-math, a library linked with it sets flush-to-zero for the whole process on load:
    torch's and numpy's subnormals would become 0 (top_p=1e-45 would mean 0). Only the compile step has it."""
    import numpy as np

    assert native.library() is not None
    assert torch.tensor(1e-40, dtype=torch.float32).mul(1.0).item() != 0.0
    assert np.float32(1e-40) * np.float32(1.0) != 0.0


@pytest.mark.parametrize("rows", [1, 3, 17])
def test_norms_over_strided_rows_are_the_reference(seed, rows):
    g = torch.Generator().manual_seed(seed)
    zx = _nonzero(torch.randn(rows, 96 + 64 + 5, generator=g))
    x, z = zx[:, 96:96 + 64], zx[:, :64]                          # row stride 165: views of a projection
    w = _nonzero(torch.randn(64, generator=g))
    got = native.rms_norm(x, w, 1e-5)
    _close(got, ref_norm.rms_norm(x, w, 1e-5))
    _close(fast_norm.rms_norm(x[None], w, 1e-5)[0], got)            # the op takes leading dims
    got = native.gated_rms_norm(x, z, w, 16, 1e-5)
    _close(got, ref_norm.gated_rms_norm(x, z, w, group_size=16, eps=1e-5))
    assert native.rms_norm(x.to(torch.bfloat16), w, 1e-5) is None    # float32 only


@pytest.mark.parametrize("T,E,k", [(1, 8, 2), (5, 16, 4), (8, 6, 1)])
@pytest.mark.parametrize("normalize,with_bias", [(True, True), (False, False)])
def test_router_top_k_is_the_reference_route(seed, T, E, k, normalize, with_bias):
    g = torch.Generator().manual_seed(seed)
    x, w = _nonzero(torch.randn(T, 32, generator=g)), _nonzero(torch.randn(E, 32, generator=g) * 0.3)
    bias = torch.randn(E, generator=g) * 0.1 if with_bias else None
    got_w, got_ids = ops.router_topk(x, w, bias, top_k=k, normalize=normalize, scaling=2.5)
    ref_w, ref_ids = ref_moe.route(x @ w.t(), bias, top_k=k, normalize=normalize, scaling=2.5)
    assert torch.equal(got_ids, ref_ids) and got_ids.dtype == torch.int64
    _close(got_w, ref_w)


@pytest.mark.parametrize("T", [1, 3, 8])
@pytest.mark.parametrize("first_expert,E_local", [(0, 8), (4, 4)])          # a whole layer, or one shard of it
def test_few_rows_of_exact_bf16_experts_are_the_reference(seed, T, first_expert, E_local):
    g = torch.Generator().manual_seed(seed)
    D, I, k = 24, 40, 3

    def exact(*shape):
        return torch.nn.Parameter(_nonzero(torch.randn(*shape, generator=g) * 0.2).to(torch.bfloat16).float(),
                                  requires_grad=False)
    up, down = exact(E_local, I, D), exact(E_local, D, I)
    x = _nonzero(torch.randn(T, D, generator=g))
    ids = torch.stack([torch.randperm(8, generator=g)[:k] for _ in range(T)])   # some outside this shard
    w = torch.rand(T, k, generator=g) + 0.1
    with torch.inference_mode():
        got = fast_moe.grouped_experts(x, w, ids, up, down, first_expert=first_expert)
    _close(got, ref_moe.grouped_experts(x, w, ids, up, down, first_expert=first_expert))
    assert fast_moe._exact_bf16(x, up, down, False) is not None                # the native kernel took it


@pytest.mark.parametrize("H,Hkv,Dh,bs", [(8, 2, 32, 4), (4, 4, 16, 8), (6, 1, 8, 3)])
@pytest.mark.parametrize("lens", [(1, 1, 1), (4, 1, 3)])          # decode steps; verification and catch-ups
def test_paged_attention_of_several_short_chunks_is_each_sequence_alone(seed, H, Hkv, Dh, bs, lens):
    """Scattered blocks, positions at a block's first and last row, chunks out of order in the pass."""
    g = torch.Generator().manual_seed(seed)
    nb, T = 24, 12
    k_cache, v_cache = _nonzero(torch.randn(nb, bs, Hkv, Dh, generator=g)), _nonzero(torch.randn(nb, bs, Hkv, Dh, generator=g))
    q = _nonzero(torch.randn(T, H, Dh, generator=g))
    k, v = _nonzero(torch.randn(T, Hkv, Dh, generator=g)), _nonzero(torch.randn(T, Hkv, Dh, generator=g))
    perm = torch.randperm(nb, generator=g).tolist()
    tables = [torch.tensor(perm[0:6]), torch.tensor(perm[6:9]), torch.tensor(perm[9:18])]
    starts, rows0 = [4 * bs, 2 * bs - 1, 0], [7, 0, 3]
    ref_k, ref_v = k_cache.clone(), v_cache.clone()
    out = torch.full((T, H, Dh), POISON)
    assert ops.paged_attention_(q, k, v, k_cache, v_cache, rows0, list(lens), starts, tables, out)
    written = []
    for row, n, table, start in zip(rows0, lens, tables, starts):
        rows = slice(row, row + n)
        ref_attn.write_kv(ref_k, ref_v, k[rows], v[rows], table, start)
        _close(out[rows], ref_attn.paged_attention(q[rows], ref_k, ref_v, table, start_pos=start))
        written += range(row, row + n)
    assert torch.equal(k_cache, ref_k) and torch.equal(v_cache, ref_v)   # the new k, v where they belong
    assert torch.all(out[[r for r in range(T) if r not in written]] == POISON)


@pytest.mark.parametrize("T", [1, 4])
def test_commit_of_several_sequences_and_layers_is_ssd_advance_of_each(seed, T):
    """The fused commit equals the torch commit (conv window copied, ssd_advance_) per sequence and layer,
    and leaves other slots alone."""
    g = torch.Generator().manual_seed(seed)
    L, slots_n, Tmax, C, W, H, P, N, G = 3, 6, 5, 20, 3, 4, 8, 16, 2

    def rand(*shape, scale=1.0):
        return _nonzero(torch.randn(*shape, generator=g) * scale)
    conv, ssm = rand(L, slots_n, C, W), rand(L, slots_n, H, P, N)
    scratch = (rand(L, slots_n, Tmax, C, W), -torch.rand(L, slots_n, H, Tmax, generator=g).cumsum(-1),
               rand(L, slots_n, H, Tmax, P, scale=0.3), rand(L, slots_n, Tmax, G, N))
    slots, indices = [4, 1], [T - 1, 0]
    ref_conv_, ref_ssm = conv.clone(), ssm.clone()
    for slot, index in zip(slots, indices):
        ref_conv_[:, slot] = scratch[0][:, slot, index]
        fast_ssd.ssd_advance_(ref_ssm[:, slot], scratch[1][:, slot, :, :T], scratch[2][:, slot, :, :T],
                              scratch[3][:, slot, :T], index)
    assert ops.mamba_commit_(conv, ssm, scratch, slots, indices)
    assert torch.equal(conv, ref_conv_)
    torch.testing.assert_close(ssm, ref_ssm, atol=1e-5, rtol=1e-5)
