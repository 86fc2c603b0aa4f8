"""Transport wire format and the object-store carrier in one process (no Ray, no sockets)."""
from __future__ import annotations

import pickle

import pytest
import torch

from cluster.transport import (HEADER_LEN, Nccl4pyTransport, ObjectStoreTransport, TensorMessage, TorchDistTransport,
                               TransportError, decode_header, encode_header, from_bytes, make_transport, to_bytes)
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


def test_object_store_transport_is_bit_exact_and_pickles():
    a, b = ObjectStoreTransport(0, 3), ObjectStoreTransport(2, 3)
    special = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0, 1e-45], dtype=torch.float32)
    cases = [random_tensor(d, s, i) for i, (d, s) in enumerate((d, s) for d in _DTYPES for s in SHAPES)]
    cases += [special, random_tensor(torch.bfloat16, (4, 6)).t()]   # NaN payloads; non-contiguous input
    for step, t in enumerate(cases):
        msg = pickle.loads(pickle.dumps(a.send(t, dst=2, step_id=step)))   # what Ray does to it
        got = b.recv(src=0, step_id=step, message=msg)
        assert same_bits(got, t.contiguous())
    msg = a.send(torch.ones(3), dst=2, step_id=0)
    b.recv(0, 0, msg).zero_()                                      # writable, and a copy: the message is intact
    assert msg.payload.tobytes() == to_bytes(torch.ones(3)).numpy().tobytes()


def test_object_store_transport_checks_addressing():
    a, b = ObjectStoreTransport(0, 2), ObjectStoreTransport(1, 2)
    msg = a.send(torch.ones(2), dst=1, step_id=7)
    with pytest.raises(TransportError, match="expected step 8 from rank 0, got step 7"):
        b.recv(0, 8, msg)
    with pytest.raises(TransportError, match="not a peer"):
        a.send(torch.ones(2), dst=0, step_id=1)
    with pytest.raises(TransportError, match="expected a TensorMessage"):
        b.recv(0, 7, torch.ones(2))

    class ObjectRef:  # what a nested, unresolved ref looks like by name
        pass
    with pytest.raises(TransportError, match="top-level argument"):
        b.recv(0, 7, ObjectRef())


def test_unsupported_dtype_and_rank_are_clear():
    with pytest.raises(TransportError, match="not supported"):
        TensorMessage.from_tensor(torch.zeros(2, dtype=torch.complex64), 0, 1, 0)
    with pytest.raises(TransportError, match="at most 8"):
        encode_header(torch.zeros([1] * 9), 0)
    with pytest.raises(TransportError, match="corrupt header"):
        decode_header(torch.zeros(HEADER_LEN, dtype=torch.int64))


def test_gpu_carriers_fail_clearly_without_cuda():
    if torch.cuda.is_available():
        pytest.skip("CUDA is available: the GPU carriers are exercised by the integration tests")
    with pytest.raises(TransportError, match="(nccl4py is not importable|needs CUDA)"):
        Nccl4pyTransport(0, 2, master_port=1)
    with pytest.raises(TransportError, match="needs CUDA"):
        TorchDistTransport(0, 2, master_port=1, backend="nccl")
    with pytest.raises(TransportError, match="unknown kind"):
        make_transport("carrier-pigeon", 0, 2)
    assert isinstance(make_transport("ray", 0, 2), ObjectStoreTransport)
