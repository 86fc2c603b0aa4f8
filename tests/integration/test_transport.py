"""Transports between real Ray actors on loopback: bit-exact tensors of several dtypes and shapes, and
round-trip times printed (not asserted). GPU carriers run only where two CUDA devices exist."""
from __future__ import annotations

import os
import statistics
import sys
import time

import pytest
import torch

from cluster.transport import NCCL4PY_AVAILABLE, NCCL4PY_IMPORT_ERROR, free_port, make_transport
from tests import transport_helpers
from tests.transport_helpers import random_tensor, same_bits

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.integration

# Ray pickles the actor class; this test module and its helpers are not importable by name in the workers.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
ray.cloudpickle.register_pickle_by_value(transport_helpers)

DTYPES = ["float32", "bfloat16", "float16", "float64", "int64", "int32", "int8", "uint8", "bool"]
SHAPES = [(), (0,), (17,), (3, 5), (2, 3, 4)]
# Realistic payloads: hidden states of 64 tokens of the 120B model (bf16, 512 KiB) and the latent
# vectors of 64 tokens x 22 chosen experts (bf16, 2.75 MiB); 1 MiB of fp32.
LARGE = [("bfloat16", (64, 4096)), ("bfloat16", (64 * 22, 1024)), ("float32", (256, 1024))]
CASES = [(d, s) for d in DTYPES for s in SHAPES] + LARGE
GPU_REASON = (f"NCCL point-to-point needs 2 CUDA devices (one per rank); torch.cuda.is_available() is "
              f"{torch.cuda.is_available()}, device_count {torch.cuda.device_count() if torch.cuda.is_available() else 0}")


def make(dtype: str, shape, seed: int) -> torch.Tensor:
    return random_tensor(dtype, shape, seed, scale=50)


class Peer:
    """One rank of a two-rank world: tensors returned through Ray (transport "ray"), a carrier on request."""

    def __init__(self, rank: int):
        torch.set_num_threads(1)
        self.rank, self.other = rank, 1 - rank
        self.p2p = None

    def init_p2p(self, kind: str, port: int) -> str:
        self.p2p = make_transport(kind, self.rank, 2, master_port=port, master_addr="127.0.0.1")
        return os.environ.get("GLOO_SOCKET_IFNAME", "")

    # object store: the driver hands each returned ObjectRef to the other actor as a top-level argument
    # (what RayExecutor does with transport "ray": a stage's output ref is the next stage's input)
    def produce(self, dtype, shape, seed, step):
        return make(dtype, shape, seed)

    def check(self, tensor, dtype, shape, seed, step) -> bool:
        return same_bits(tensor, make(dtype, shape, seed))

    def echo(self, tensor, step):
        return tensor.clone()

    # point to point: both ranks run their side concurrently
    def p2p_send(self, cases, step0) -> None:
        for i, (dtype, shape) in enumerate(cases):
            self.p2p.send(make(dtype, shape, i), self.other, step0 + i)

    def p2p_recv(self, cases, step0) -> list[bool]:
        return [same_bits(self.p2p.recv(self.other, step0 + i), make(dtype, shape, i))
                for i, (dtype, shape) in enumerate(cases)]

    def p2p_expect(self, step):
        try:
            self.p2p.recv(self.other, step)
        except Exception as e:  # noqa: BLE001 - returned to the driver to inspect
            return f"{type(e).__name__}: {e}"
        return "no error"

    def p2p_ping(self, dtype, shape, iters, initiator: bool) -> list[float]:
        """Initiator: send, wait for the echo, time it (ms). Other side: echo. Checks the last echo."""
        t, times = make(dtype, shape, 99), []
        for it in range(iters):
            if initiator:
                t0 = time.perf_counter()
                self.p2p.send(t, self.other, 2 * it)
                back = self.p2p.recv(self.other, 2 * it + 1)
                if t.is_cuda or getattr(self.p2p, "device", torch.device("cpu")).type == "cuda":
                    torch.cuda.synchronize()
                times.append((time.perf_counter() - t0) * 1e3)
                assert same_bits(back, t)
            else:
                self.p2p.send(self.p2p.recv(self.other, 2 * it), self.other, 2 * it + 1)
        return times

    def close(self) -> None:
        if self.p2p is not None:
            self.p2p.close()


@pytest.fixture(scope="module")
def ray_loopback():
    """Ray on loopback only; reuses a running instance (and leaves it running) when there is one."""
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1")
    yield ray
    if started:
        ray.shutdown()


@pytest.fixture
def peers(ray_loopback):
    actor = ray.remote(Peer)
    pair = [actor.options(num_cpus=0.25).remote(r) for r in (0, 1)]
    yield pair
    _close(pair)


def _close(actors) -> None:
    """Tear down process groups, then the actors (kill even when one is stuck in a blocking call)."""
    try:
        ray.get([p.close.remote() for p in actors], timeout=30)
    except Exception:  # noqa: BLE001 - a failed test may leave a rank blocked in send/recv
        pass
    for p in actors:
        ray.kill(p)


def _report(capsys, label: str, times_ms: list[float], nbytes: int) -> None:
    with capsys.disabled():
        print(f"\n[transport RTT] {label}: {nbytes / 1024:.1f} KiB median {statistics.median(times_ms):.2f} ms, "
              f"min {min(times_ms):.2f} ms over {len(times_ms)}")


def test_object_store_actor_to_actor_bit_exact_and_round_trip(peers, capsys):
    a, b = peers
    oks = [b.check.remote(a.produce.remote(d, s, i, i), d, s, i, i) for i, (d, s) in enumerate(CASES)]
    assert all(ray.get(oks, timeout=120)), [c for c, ok in zip(CASES, ray.get(oks)) if not ok]
    # Round trip a -> b -> a, driven the way the engine drives stages (refs passed actor to actor).
    for dtype, shape in (("float32", (16,)), ("bfloat16", (64, 4096)), ("float32", (256, 1024))):
        times = []
        for it in range(12):
            t0 = time.perf_counter()
            back = b.echo.remote(a.produce.remote(dtype, shape, it, 10 * it), 10 * it)
            assert ray.get(a.check.remote(back, dtype, shape, it, 10 * it + 1), timeout=60)
            times.append((time.perf_counter() - t0) * 1e3)
        _report(capsys, f"ray object store a->b->a {dtype}{list(shape)}", times[2:], make(dtype, shape, 0).nbytes)


def test_gloo_between_actors_bit_exact_and_round_trip(peers, capsys):
    a, b = peers
    port = free_port()
    t0 = time.perf_counter()
    ifnames = ray.get([a.init_p2p.remote("gloo", port), b.init_p2p.remote("gloo", port)], timeout=120)
    with capsys.disabled():
        print(f"\n[transport] gloo process group init {(time.perf_counter() - t0) * 1e3:.0f} ms "
              f"(GLOO_SOCKET_IFNAME={ifnames[0]!r})")
    # Both directions, every case.
    for src, dst in ((a, b), (b, a)):
        send, oks = src.p2p_send.remote(CASES, 1000), dst.p2p_recv.remote(CASES, 1000)
        ray.get(send, timeout=120)
        assert all(ray.get(oks, timeout=120))
    # A step-id mismatch is a clear error, and the channel stays usable after it.
    # (gloo's send waits for the matching recv: both sides always run concurrently.)
    send, err = a.p2p_send.remote([("float32", (4, 4))], 5), b.p2p_expect.remote(6)
    assert "expected step 6 from rank 0, got step 5" in ray.get(err, timeout=60)
    ray.get(send, timeout=60)
    send, oks = a.p2p_send.remote(CASES[:3], 7), b.p2p_recv.remote(CASES[:3], 7)
    assert all(ray.get(oks, timeout=60)) and ray.get(send) is None
    for dtype, shape in (("float32", (16,)), ("bfloat16", (64, 4096)), ("float32", (256, 1024))):
        times, _ = ray.get([a.p2p_ping.remote(dtype, shape, 22, True), b.p2p_ping.remote(dtype, shape, 22, False)],
                           timeout=120)
        _report(capsys, f"gloo a->b->a {dtype}{list(shape)}", times[2:], make(dtype, shape, 0).nbytes)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason=GPU_REASON)
@pytest.mark.parametrize("kind", ["nccl", "nccl4py"])
def test_nccl_between_gpu_actors(ray_loopback, kind, capsys):
    if kind == "nccl4py" and not NCCL4PY_AVAILABLE:
        pytest.skip(f"nccl4py is not importable: {NCCL4PY_IMPORT_ERROR}")
    actor = ray.remote(Peer)
    a, b = [actor.options(num_cpus=0.25, num_gpus=1).remote(r) for r in (0, 1)]
    try:
        port = free_port()
        ray.get([a.init_p2p.remote(kind, port), b.init_p2p.remote(kind, port)], timeout=180)
        for src, dst in ((a, b), (b, a)):
            send, oks = src.p2p_send.remote(CASES, 0), dst.p2p_recv.remote(CASES, 0)
            ray.get(send, timeout=120)
            assert all(ray.get(oks, timeout=120))
        for dtype, shape in (("bfloat16", (64, 4096)), ("float32", (256, 1024))):
            times, _ = ray.get([a.p2p_ping.remote(dtype, shape, 22, True), b.p2p_ping.remote(dtype, shape, 22, False)],
                               timeout=120)
            _report(capsys, f"{kind} a->b->a {dtype}{list(shape)}", times[2:], make(dtype, shape, 0).nbytes)
    finally:
        _close([a, b])
