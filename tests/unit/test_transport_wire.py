"""Transport wire format in one process (no Ray, no sockets), and what `--transport` resolves to."""
from __future__ import annotations

import pytest
import torch

from cluster.replica_comm import ReplicaLayout, resolve_transport
from cluster.transport import (HEADER_LEN, Nccl4pyTransport, TorchDistTransport, TransportError, decode_header,
                               encode_header, from_bytes, make_transport, to_bytes)
from cluster.transport import _DTYPES
from tests.transport_helpers import random_tensor, same_bits

SHAPES = [(), (0,), (5,), (3, 7), (2, 3, 4), (1, 2, 1, 2, 1, 2, 1, 2)]


@pytest.mark.parametrize("dtype", _DTYPES, ids=str)
def test_header_and_bytes_round_trip(dtype):
    for shape in SHAPES:
        t = random_tensor(dtype, shape)
        h = encode_header(t, step_id=123456789)
        assert h.shape == (HEADER_LEN,) and h.dtype == torch.int64
        assert decode_header(h) == (123456789, dtype, tuple(shape))
        assert same_bits(from_bytes(to_bytes(t).clone(), dtype, tuple(shape)), t)


def test_unsupported_dtype_and_rank_are_clear():
    with pytest.raises(TransportError, match="not supported"):
        encode_header(torch.zeros(2, dtype=torch.complex64), 0)
    with pytest.raises(TransportError, match="at most 8"):
        encode_header(torch.zeros([1] * 9), 0)
    with pytest.raises(TransportError, match="corrupt header"):
        decode_header(torch.zeros(HEADER_LEN, dtype=torch.int64))


def test_gpu_carriers_fail_clearly_without_cuda():
    if torch.cuda.is_available():
        pytest.skip("CUDA is available: the GPU carriers are exercised by the integration tests")
    with pytest.raises(TransportError, match="(nccl4py is not importable|needs CUDA)"):
        Nccl4pyTransport.connect(0, 2, master_port=1)
    with pytest.raises(TransportError, match="needs CUDA"):
        TorchDistTransport.connect(0, 2, master_port=1, backend="nccl")
    with pytest.raises(TransportError, match="unknown kind"):
        make_transport("ray", 0, 2)             # the object store is no carrier: the engine chains refs itself


def _resolve(kind, gpus=False, pp=2, ep=2, torch_nccl=True, nccl4py=False):
    return resolve_transport(kind, gpus=gpus, pp=pp, ep=ep, torch_nccl=torch_nccl, nccl4py=nccl4py)


def test_auto_transport_is_nccl4py_then_torch_nccl_on_gpus_and_ray_on_cpus():
    assert _resolve("auto") == "ray"
    assert _resolve("auto", pp=1, ep=2) == "ray" and _resolve("auto", pp=2, ep=1) == "ray"
    assert _resolve("auto", gpus=True, nccl4py=True) == "nccl4py"
    assert _resolve("auto", gpus=True, torch_nccl=False, nccl4py=True) == "nccl4py"
    assert _resolve("auto", gpus=True) == "nccl"                 # nccl4py not installed: torch's NCCL
    assert _resolve("auto", pp=1, ep=1) == "ray" == _resolve("nccl", pp=1, ep=1)   # one actor: no carrier
    assert [_resolve(k) for k in ("ray", "gloo")] == ["ray", "gloo"]
    assert _resolve("gloo", gpus=True) == "gloo"


@pytest.mark.parametrize("kind,kw,message", [
    ("nccl", {}, "--transport nccl: needs GPUs"),
    ("nccl4py", {}, "--transport nccl4py: needs GPUs"),
    ("nccl", dict(gpus=True, torch_nccl=False), "--transport nccl: this torch has no NCCL"),
    ("nccl4py", dict(gpus=True), "--transport nccl4py: nccl4py is not importable"),
    ("auto", dict(gpus=True, torch_nccl=False), "--transport auto: .* neither"),
    ("pigeon", {}, "--transport: expected one of auto, ray, gloo, nccl, nccl4py, got 'pigeon'"),
])
def test_a_transport_the_machines_cannot_run_is_a_clear_error(kind, kw, message):
    with pytest.raises(ValueError, match=message):
        _resolve(kind, **kw)


def test_replica_layout_puts_each_stage_first_in_its_expert_group():
    lay = ReplicaLayout(pp=3, ep=3)
    groups = [lay.expert_group(s) for s in range(3)]
    assert groups == [[0, 3, 4], [1, 5, 6], [2, 7, 8]]
    assert sorted(r for g in groups for r in g) == list(range(lay.world_size))
    assert [lay.stage_of(r) for r in range(9)] == [0, 1, 2, 0, 0, 1, 1, 2, 2]
