"""Expert dispatch and combine over real gloo process groups (one thread per rank, loopback): the
stage's MoE output equals the single-process MoE's, whatever the routing, with shards that get no token."""
from __future__ import annotations

import datetime
import os
import threading

import pytest
import torch
import torch.distributed as dist
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cluster.expert_dispatch import AllToAll, ExpertDispatch, pack_rows, serve_pass, unpack_rows
from cluster.transport import TransportError
from model_shards.moe import RoutedExperts
from model_shards.presets import PRESETS

CFG = PRESETS["tiny"]                       # 8 routed experts, top-2, latent width 32


def _groups(size: int, timeout_s: float = 10.0) -> list[AllToAll]:
    """One gloo group of `size` ranks in this process, on the loopback interface."""
    store = dist.HashStore()
    options = dist.ProcessGroupGloo._Options()
    options._timeout = datetime.timedelta(seconds=timeout_s)
    options._devices = [dist.ProcessGroupGloo.create_device(interface="lo")]
    pgs: list = [None] * size

    def make(r):                            # the constructor rendezvouses: all ranks at once
        pgs[r] = dist.ProcessGroupGloo(dist.PrefixStore("ep", store), r, size, options)
    threads = [threading.Thread(target=make, args=(r,)) for r in range(size)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    return [AllToAll(pg, r, size, torch.device("cpu")) for r, pg in enumerate(pgs)]


def _run_ranks(fns) -> list:
    """Run fns[r]() on thread r; -> their results (an exception is returned in its place)."""
    out: list = [None] * len(fns)

    def call(r):
        try:
            out[r] = fns[r]()
        except BaseException as e:  # noqa: BLE001 - inspected by the test
            out[r] = e
    threads = [threading.Thread(target=call, args=(r,)) for r in range(len(fns))]
    [t.start() for t in threads]
    [t.join(60) for t in threads]
    assert not any(t.is_alive() for t in threads), "a rank is still blocked in a collective"
    return out


def _slice(full: RoutedExperts, lo: int, hi: int) -> RoutedExperts:
    part = RoutedExperts(CFG, lo, hi - lo).to(full.up.device)
    with torch.no_grad():
        part.up.copy_(full.up[lo:hi])
        part.down.copy_(full.down[lo:hi])
    return part


def _routing(g: torch.Generator, T: int, allowed: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x (T, D) float32, weights (T, k) float32, ids (T, k): k distinct experts per token from `allowed`."""
    k = CFG.num_experts_per_tok
    x = torch.randn(T, CFG.moe_expert_input_size, generator=g)
    pick = torch.stack([torch.randperm(len(allowed), generator=g)[:k] for _ in range(T)]) if T else torch.empty(0, k)
    ids = torch.tensor(allowed)[pick.long()]
    return x, torch.rand(T, k, generator=g), ids


NO_CUDA = "the gloo-with-CUDA-tensors case (transport gloo on a GPU cluster) needs a CUDA device"


@pytest.mark.parametrize("ep,device", [(2, "cpu"), (4, "cpu"), pytest.param(
    2, "cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_CUDA)])])
def test_dispatch_and_combine_equal_the_single_process_moe(ep, device):
    """device: where the experts compute and the stage's tensors live; the gloo groups stay on the CPU."""
    seed = int.from_bytes(os.urandom(4), "little")
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    full = RoutedExperts(CFG).to(device)
    per = CFG.n_routed_experts // ep
    ranges = [(r * per, (r + 1) * per) for r in range(ep)]
    shards = [_slice(full, lo, hi) for lo, hi in ranges]
    # Layer passes: varied token counts (one empty), and from the second on the last shard's experts
    # are never chosen, so that shard takes part with zero tokens.
    everyone = list(range(CFG.n_routed_experts))
    not_last = [e for e in everyone if e < ranges[-1][0]]
    layers = [(7, _routing(g, 13, everyone)), (2, _routing(g, 5, not_last)), (4, _routing(g, 0, everyone)),
              (9, _routing(g, 21, not_last))]
    layers = [(layer, tuple(t.to(device) for t in xs)) for layer, xs in layers]
    groups = _groups(ep)
    dispatch = ExpertDispatch(groups[0], ranges[1:])
    seen: dict[int, list[tuple[int, int]]] = {r: [] for r in range(1, ep)}

    def stage():
        dispatch.step_id = 41
        return [dispatch.exchange(layer, x, w, ids, shards[0]) for layer, (x, w, ids) in layers]

    def shard(r):
        def compute(layer, x, w, ids):
            seen[r].append((layer, x.shape[0]))
            return shards[r](x, w, ids)
        return lambda: serve_pass(groups[r], 41, [layer for layer, _ in layers], compute, device)

    results = _run_ranks([stage] + [shard(r) for r in range(1, ep)])
    for res in results:
        assert not isinstance(res, BaseException), res
    for (layer, (x, w, ids)), got in zip(layers, results[0]):
        assert got.shape == x.shape and got.dtype == x.dtype and got.device == x.device
        torch.testing.assert_close(got, full(x, w, ids), rtol=1e-5, atol=1e-5,
                                   msg=lambda m: f"layer {layer}, ep {ep}, seed {seed}: {m}")
    assert results[1:] == [len(layers)] * (ep - 1), "every shard follows every layer, routed tokens or not"
    assert dispatch.layers_sent == len(layers)
    first_ids = layers[0][1][2]
    assert seen[ep - 1] == [(7, int((first_ids >= ranges[-1][0]).any(1).sum().item()))], \
        "the last shard computes only for the one layer that routed tokens to it, and only those tokens"


_GROUPS: dict[int, list[AllToAll]] = {}


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ep=st.sampled_from([2, 4]), data=st.data())
def test_any_routing_over_any_number_of_layers_sums_like_the_whole_moe(ep, data):
    """Token counts from 0, expert subsets that starve whole shards, one to three layers per pass: the
    stage's output is the single-process MoE's and every shard answers exactly its layers."""
    groups = _GROUPS.setdefault(ep, _groups(ep))       # reused: each example leaves the groups in step
    seed = data.draw(st.integers(0, 2**31 - 1), label="seed")
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    full = RoutedExperts(CFG)
    per = CFG.n_routed_experts // ep
    ranges = [(r * per, (r + 1) * per) for r in range(ep)]
    shards = [_slice(full, lo, hi) for lo, hi in ranges]
    layers = []
    for layer in data.draw(st.lists(st.integers(0, 50), min_size=1, max_size=3, unique=True), label="layers"):
        allowed = data.draw(st.lists(st.integers(0, CFG.n_routed_experts - 1), min_size=CFG.num_experts_per_tok,
                                     unique=True), label="experts")
        layers.append((layer, _routing(g, data.draw(st.integers(0, 24), label="tokens"), sorted(allowed))))
    dispatch = ExpertDispatch(groups[0], ranges[1:])
    dispatch.step_id = seed

    def stage():
        return [dispatch.exchange(layer, x, w, ids, shards[0]) for layer, (x, w, ids) in layers]

    def shard(r):
        return lambda: serve_pass(groups[r], seed, [layer for layer, _ in layers],
                                  lambda layer, x, w, ids: shards[r](x, w, ids), "cpu")

    results = _run_ranks([stage] + [shard(r) for r in range(1, ep)])
    assert not any(isinstance(r, BaseException) for r in results), results
    for (layer, (x, w, ids)), got in zip(layers, results[0]):
        torch.testing.assert_close(got, full(x, w, ids), rtol=1e-5, atol=1e-5)
    assert results[1:] == [len(layers)] * (ep - 1)


def test_rows_pack_and_unpack_bit_exact_in_every_dtype():
    g = torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little"))
    for xd in (torch.float32, torch.bfloat16, torch.float16):
        for n in (0, 1, 6):
            x, w = torch.randn(n, 5, generator=g).to(xd), torch.rand(n, 3, generator=g)
            ids = torch.randint(0, 99, (n, 3))
            buf = pack_rows(x, w, ids)
            assert buf.dtype == torch.uint8 and buf.shape == (n, 5 * xd.itemsize + 3 * 4 + 3 * 8)
            x2, w2, ids2 = unpack_rows(buf.reshape(-1).clone(), n, 5, 3, xd, torch.float32)
            assert torch.equal(x2, x) and torch.equal(w2, w) and torch.equal(ids2, ids)


@pytest.mark.parametrize("step,layer,message", [(6, 3, "expected layer 3 of step 5"),
                                                (5, 1, "expected layer 3 of step 5")])
def test_a_shard_out_of_step_with_its_stage_fails_loudly(step, layer, message):
    """A skipped pass or a layer order that differs: the shard names what it expected, and the stage's
    next exchange fails within the group's timeout instead of mixing tokens of different layers."""
    groups = _groups(2, timeout_s=1.0)
    dispatch = ExpertDispatch(groups[0], [(4, 8)])
    dispatch.step_id = step
    x = torch.randn(2, CFG.moe_expert_input_size)
    stage = lambda: dispatch.exchange(layer, x, torch.rand(2, 2), torch.tensor([[0, 5], [6, 7]]),  # noqa: E731
                                      lambda *a: torch.zeros_like(x))
    res = _run_ranks([stage, lambda: serve_pass(groups[1], 5, [3, 1], None, "cpu")])
    assert isinstance(res[1], TransportError) and message in str(res[1]), res[1]
    assert isinstance(res[0], RuntimeError), res[0]


def test_a_shard_that_never_answers_times_out_instead_of_hanging():
    """What a dead expert-shard actor looks like to the stage: the collective raises within the group's
    timeout (the executor then rebuilds the replica), it does not block the pass forever."""
    groups = _groups(2, timeout_s=1.0)
    dispatch = ExpertDispatch(groups[0], [(4, 8)])
    x = torch.randn(3, CFG.moe_expert_input_size)
    ids = torch.tensor([[0, 5], [1, 2], [6, 7]])
    res = _run_ranks([lambda: dispatch.exchange(0, x, torch.rand(3, 2), ids, lambda *a: torch.zeros_like(x)),
                      lambda: None])
    assert isinstance(res[0], RuntimeError), res[0]


def test_the_stage_is_rank_zero_and_shards_are_not():
    groups = _groups(2)
    with pytest.raises(TransportError, match="the stage is rank 0"):
        ExpertDispatch(groups[1], [(4, 8)])
    with pytest.raises(TransportError, match="expert shards"):
        serve_pass(groups[0], 0, [1], None, "cpu")
