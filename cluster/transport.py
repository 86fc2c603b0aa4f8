"""Moving tensors between the actors of a replica: hidden states stage to stage, latent token vectors
to and from expert shards, and the partial sums back.

One interface, three carriers (pick per deployment; the engine code is the same):

    transport.send(tensor, dst, step_id) -> message | None
    transport.recv(src, step_id, message=None) -> tensor

  ObjectStoreTransport  Ray's object store, the default on CPU. `send` returns a TensorMessage that the
        actor method returns; the engine passes the resulting ObjectRef *as a top-level argument* of the
        receiving actor's method (`b.run.remote(plan, a.run.remote(plan))`), so Ray moves the bytes
        actor to actor without a round trip through the driver, and `recv` unwraps it there. Payloads
        are numpy uint8 buffers, which Ray stores out of band and maps zero-copy on the reader.
  TorchDistTransport    torch.distributed point-to-point: backend "gloo" between CPU actors (a
        rendezvous on 127.0.0.1 stays on loopback), "nccl" between GPU actors. Each message is a fixed
        int64 header (magic, step id, dtype, shape) and the payload as bytes; `send` returns None and
        the engine must run the sender's and the receiver's methods concurrently (they rendezvous).
  Nccl4pyTransport      the same wire format over an nccl4py communicator (guarded import: present
        only where `nccl.core` imports and CUDA works), with the unique id exchanged via a TCPStore.

The step id travels with every message and `recv` checks it: a schedule bug (two micro-batches
crossing) fails loudly instead of mixing hidden states of different steps.
"""
from __future__ import annotations

import abc
import dataclasses
import datetime
import ipaddress
import os
import socket
import sys
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

try:  # nccl4py: optional (extra "gpu"); it imports without a GPU but every call then fails.
    from nccl.core import Communicator as _NcclCommunicator
    from nccl.core import UniqueId as _NcclUniqueId
    from nccl.core import get_unique_id as _nccl_get_unique_id
    NCCL4PY_AVAILABLE, NCCL4PY_IMPORT_ERROR = True, ""
except Exception as _e:  # ImportError, or OSError from a missing libnccl
    NCCL4PY_AVAILABLE, NCCL4PY_IMPORT_ERROR = False, f"{type(_e).__name__}: {_e}"


class TransportError(RuntimeError):
    """A message arrived out of order, for someone else, or a carrier cannot start here."""


# ---- wire format ---------------------------------------------------------------------------------------
# dtype codes are positions in this tuple: append only, never reorder (both ends must agree).
_DTYPES: tuple[torch.dtype, ...] = tuple(d for d in (
    torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int8, torch.uint8, torch.int16,
    torch.int32, torch.int64, torch.bool, getattr(torch, "float8_e4m3fn", None), getattr(torch, "float8_e5m2", None),
) if d is not None)
_CODE = {d: i for i, d in enumerate(_DTYPES)}
MAX_NDIM = 8
HEADER_LEN = 4 + MAX_NDIM  # [magic, step_id, dtype code, ndim, dim0 .. dim7]
_MAGIC = 0x4859_4252       # "HYBR"


def encode_header(tensor: torch.Tensor, step_id: int) -> torch.Tensor:
    """-> int64 (HEADER_LEN,) on the CPU."""
    if tensor.dtype not in _CODE:
        raise TransportError(f"dtype {tensor.dtype} is not supported; supported: {list(_DTYPES)}")
    if tensor.dim() > MAX_NDIM:
        raise TransportError(f"{tensor.dim()} dimensions; at most {MAX_NDIM}")
    dims = list(tensor.shape) + [0] * (MAX_NDIM - tensor.dim())
    return torch.tensor([_MAGIC, step_id, _CODE[tensor.dtype], tensor.dim(), *dims], dtype=torch.int64)


def decode_header(header: torch.Tensor) -> tuple[int, torch.dtype, tuple[int, ...]]:
    """int64 (HEADER_LEN,) -> (step_id, dtype, shape)."""
    magic, step_id, code, ndim, *dims = header.tolist()
    if magic != _MAGIC or not 0 <= code < len(_DTYPES) or not 0 <= ndim <= MAX_NDIM:
        raise TransportError(f"corrupt header {header.tolist()} (stream out of sync?)")
    return step_id, _DTYPES[code], tuple(dims[:ndim])


def to_bytes(tensor: torch.Tensor) -> torch.Tensor:
    """Any tensor -> its bytes, uint8 (nbytes,), contiguous, same device (a view when already contiguous)."""
    return tensor.detach().contiguous().reshape(-1).view(torch.uint8)


def from_bytes(buf: torch.Tensor, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    """uint8 (nbytes,) -> tensor of `dtype` and `shape` sharing buf's memory."""
    if buf.numel() == 0:  # an empty buffer may carry any stride; view(dtype) refuses some
        return torch.empty(shape, dtype=dtype, device=buf.device)
    return buf.view(dtype).reshape(shape)


def _nbytes(dtype: torch.dtype, shape: tuple[int, ...]) -> int:
    n = dtype.itemsize
    for s in shape:
        n *= s
    return n


# ---- the interface ------------------------------------------------------------------------------------------
class Transport(abc.ABC):
    """Point-to-point tensor messages between the ranks of one replica, tagged by step id."""

    rank: int
    world_size: int

    @abc.abstractmethod
    def send(self, tensor: torch.Tensor, dst: int, step_id: int) -> "TensorMessage | None":
        """Send `tensor` to rank `dst`. Returns what the calling actor method must return (or None)."""

    @abc.abstractmethod
    def recv(self, src: int, step_id: int, message: Any = None) -> torch.Tensor:
        """The tensor rank `src` sent for `step_id`; `message` is what the engine handed over, if any."""

    def close(self) -> None:
        """Release the carrier's resources (process groups, communicators)."""

    def _check_peer(self, peer: int, what: str) -> None:
        if not 0 <= peer < self.world_size or peer == self.rank:
            raise TransportError(f"{what}: rank {peer} is not a peer of rank {self.rank} in a world of {self.world_size}")


@dataclasses.dataclass(frozen=True)
class TensorMessage:
    """A tensor in flight through Ray's object store: addressing, step, and the bytes as numpy uint8."""

    step_id: int
    src: int
    dst: int
    dtype: str                 # torch dtype name, e.g. "bfloat16"
    shape: tuple[int, ...]
    payload: np.ndarray        # uint8 (nbytes,)

    @classmethod
    def from_tensor(cls, tensor: torch.Tensor, src: int, dst: int, step_id: int) -> "TensorMessage":
        """GPU tensors are copied to host memory (the object store lives there)."""
        if tensor.dtype not in _CODE:
            raise TransportError(f"dtype {tensor.dtype} is not supported; supported: {list(_DTYPES)}")
        data = to_bytes(tensor.cpu()).numpy()
        return cls(step_id, src, dst, str(tensor.dtype).removeprefix("torch."), tuple(tensor.shape), data)

    def to_tensor(self) -> torch.Tensor:
        """A fresh, writable CPU tensor (the object store's mapping is read-only)."""
        return from_bytes(torch.from_numpy(self.payload.copy()), getattr(torch, self.dtype), self.shape)


class ObjectStoreTransport(Transport):
    """Ray object store: the actor returns the message; Ray delivers it as the next call's argument."""

    def __init__(self, rank: int, world_size: int):
        self.rank, self.world_size = rank, world_size

    def send(self, tensor: torch.Tensor, dst: int, step_id: int) -> TensorMessage:
        self._check_peer(dst, "send")
        return TensorMessage.from_tensor(tensor, self.rank, dst, step_id)

    def recv(self, src: int, step_id: int, message: Any = None) -> torch.Tensor:
        if type(message).__name__ == "ObjectRef":
            raise TransportError("recv got an unresolved ObjectRef: pass the ref as a top-level argument of the "
                                 "actor method (Ray resolves only those), not inside a list or dataclass")
        if not isinstance(message, TensorMessage):
            raise TransportError(f"recv expected a TensorMessage from rank {src}, got {type(message).__name__}")
        if (message.src, message.dst, message.step_id) != (src, self.rank, step_id):
            raise TransportError(f"rank {self.rank} expected step {step_id} from rank {src}, got step "
                                 f"{message.step_id} from rank {message.src} to rank {message.dst}")
        return message.to_tensor()


# ---- torch.distributed: gloo on CPU, nccl on GPU ----------------------------------------------------------
def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on `host` right now (for a rendezvous address)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(socket.gethostbyname(host)).is_loopback
    except (OSError, ValueError):
        return False


class TorchDistTransport(Transport):
    """torch.distributed send/recv in this process's default process group (one per process).

    All `world_size` ranks must construct it at about the same time (the rendezvous is collective).
    With a loopback rendezvous and gloo, gloo is pinned to the loopback interface too (GLOO_SOCKET_IFNAME),
    so a local cluster never opens a socket on an external address.
    """

    def __init__(self, rank: int, world_size: int, *, master_port: int, master_addr: str = "127.0.0.1",
                 backend: str = "gloo", device: torch.device | str | None = None, timeout_s: float = 120.0):
        if backend not in ("gloo", "nccl"):
            raise TransportError(f"backend: expected 'gloo' or 'nccl', found {backend!r}")
        if dist.is_initialized():
            raise TransportError("a torch.distributed default process group already exists in this process")
        if backend == "nccl":
            if not torch.cuda.is_available():
                raise TransportError("backend 'nccl' needs CUDA; torch.cuda.is_available() is False")
            self.device = torch.device(device if device is not None else f"cuda:{torch.cuda.current_device()}")
            torch.cuda.set_device(self.device)
        else:
            self.device = torch.device("cpu")
            if (_is_loopback(master_addr) and "GLOO_SOCKET_IFNAME" not in os.environ
                    and sys.platform.startswith("linux") and os.path.exists("/sys/class/net/lo")):
                os.environ["GLOO_SOCKET_IFNAME"] = "lo"
        self.rank, self.world_size, self.backend = rank, world_size, backend
        dist.init_process_group(backend, init_method=f"tcp://{master_addr}:{master_port}", rank=rank,
                                world_size=world_size, timeout=datetime.timedelta(seconds=timeout_s))

    def send(self, tensor: torch.Tensor, dst: int, step_id: int) -> None:
        self._check_peer(dst, "send")
        dist.send(encode_header(tensor, step_id).to(self.device), dst)
        if tensor.numel():
            dist.send(to_bytes(tensor.to(self.device)), dst)
        return None

    def recv(self, src: int, step_id: int, message: Any = None) -> torch.Tensor:
        self._check_peer(src, "recv")
        header = torch.empty(HEADER_LEN, dtype=torch.int64, device=self.device)
        dist.recv(header, src)
        got, dtype, shape = decode_header(header.cpu())
        buf = torch.empty(_nbytes(dtype, shape), dtype=torch.uint8, device=self.device)
        if buf.numel():
            dist.recv(buf, src)                      # drained even on a mismatch: the stream stays in sync
        if got != step_id:
            raise TransportError(f"rank {self.rank} expected step {step_id} from rank {src}, got step {got}")
        return from_bytes(buf, dtype, shape)

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()


# ---- nccl4py ----------------------------------------------------------------------------------------------------
class Nccl4pyTransport(Transport):
    """The same wire format over an nccl4py Communicator (one GPU per rank).

    Rank 0 creates the NCCL unique id and publishes it in a TCPStore at master_addr:master_port; the
    others read it there. Sends and receives are enqueued on the current CUDA stream of `device`.
    """

    _KEY = "hybridserve/nccl_unique_id"

    def __init__(self, rank: int, world_size: int, *, master_port: int, master_addr: str = "127.0.0.1",
                 device: torch.device | str | None = None, timeout_s: float = 120.0):
        if not NCCL4PY_AVAILABLE:
            raise TransportError(f"nccl4py is not importable here ({NCCL4PY_IMPORT_ERROR}); install the 'gpu' extra")
        if not torch.cuda.is_available():
            raise TransportError("nccl4py needs CUDA; torch.cuda.is_available() is False")
        self.rank, self.world_size = rank, world_size
        self.device = torch.device(device if device is not None else f"cuda:{torch.cuda.current_device()}")
        self._store = dist.TCPStore(master_addr, master_port, world_size, is_master=rank == 0,
                                    timeout=datetime.timedelta(seconds=timeout_s))
        if rank == 0:
            uid = _nccl_get_unique_id()
            raw = uid.as_bytes                               # a property in nccl4py 0.6; a method elsewhere
            self._store.set(self._KEY, bytes(raw() if callable(raw) else raw))
        else:
            self._store.wait([self._KEY])
            uid = _NcclUniqueId.from_bytes(self._store.get(self._KEY))
        with torch.cuda.device(self.device):
            self.comm = _NcclCommunicator.init(nranks=world_size, rank=rank, unique_id=uid)

    def _stream(self) -> int:
        return int(torch.cuda.current_stream(self.device).cuda_stream)

    def send(self, tensor: torch.Tensor, dst: int, step_id: int) -> None:
        self._check_peer(dst, "send")
        header = encode_header(tensor, step_id).to(self.device)
        self.comm.send(header, dst, stream=self._stream())
        if tensor.numel():
            self.comm.send(to_bytes(tensor.to(self.device)), dst, stream=self._stream())
        return None

    def recv(self, src: int, step_id: int, message: Any = None) -> torch.Tensor:
        self._check_peer(src, "recv")
        header = torch.empty(HEADER_LEN, dtype=torch.int64, device=self.device)
        self.comm.recv(header, src, stream=self._stream())
        got, dtype, shape = decode_header(header.cpu())      # .cpu() waits for the stream
        buf = torch.empty(_nbytes(dtype, shape), dtype=torch.uint8, device=self.device)
        if buf.numel():
            self.comm.recv(buf, src, stream=self._stream())
        if got != step_id:
            raise TransportError(f"rank {self.rank} expected step {step_id} from rank {src}, got step {got}")
        return from_bytes(buf, dtype, shape)

    def close(self) -> None:
        destroy = getattr(self.comm, "destroy", None)
        if destroy is not None:
            destroy()


def make_transport(kind: str, rank: int, world_size: int, **kw: Any) -> Transport:
    """kind: "ray" (object store), "gloo", "nccl" (torch.distributed) or "nccl4py"."""
    if kind == "ray":
        return ObjectStoreTransport(rank, world_size)
    if kind in ("gloo", "nccl"):
        return TorchDistTransport(rank, world_size, backend=kind, **kw)
    if kind == "nccl4py":
        return Nccl4pyTransport(rank, world_size, **kw)
    raise TransportError(f"transport: unknown kind {kind!r}; expected ray, gloo, nccl or nccl4py")
