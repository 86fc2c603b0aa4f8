"""Moving tensors between the actors of a replica: hidden states stage to stage (this module) and latent
token vectors to and from expert shards (cluster/expert_dispatch.py, over the same groups).

One interface, two carriers (cluster/replica_comm.py picks them per `--transport`):

    transport.send(tensor, dst, step_id)
    transport.recv(src, step_id) -> tensor

  TorchDistTransport    torch.distributed point-to-point: backend "gloo" between CPU actors (a
        rendezvous on 127.0.0.1 stays on loopback), "nccl" between GPU actors. Each message is a fixed
        int64 header (magic, step id, dtype, shape) and the payload as bytes. Sender and receiver must
        run concurrently (they rendezvous): the engine starts every stage's pass at once.
  Nccl4pyTransport      the same wire format over an nccl4py communicator (guarded import: present
        only where `nccl.core` imports and CUDA works), with the unique id exchanged via a TCPStore.

("ray", the object-store path, is no carrier here: the engine chains the stages' ObjectRefs itself.)
The step id travels with every message and `recv` checks it: a schedule bug (two micro-batches
crossing) fails loudly instead of mixing hidden states of different steps.
"""
from __future__ import annotations

import abc
import datetime
import ipaddress
import os
import socket
import sys
from typing import Any

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
    def send(self, tensor: torch.Tensor, dst: int, step_id: int) -> None:
        """Send `tensor` to rank `dst` (returns once the receiver has it or the carrier buffered it)."""

    @abc.abstractmethod
    def recv(self, src: int, step_id: int) -> torch.Tensor:
        """The tensor rank `src` sent for `step_id`."""

    def close(self) -> None:
        """Release the carrier's resources (process groups, communicators)."""

    def _check_peer(self, peer: int, what: str) -> None:
        if not 0 <= peer < self.world_size or peer == self.rank:
            raise TransportError(f"{what}: rank {peer} is not a peer of rank {self.rank} in a world of {self.world_size}")


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


def init_torch_dist(backend: str, rank: int, world_size: int, *, master_port: int, master_addr: str = "127.0.0.1",
                    device: torch.device | str | None = None, timeout_s: float = 120.0) -> torch.device:
    """Join this process's default process group; -> the device its tensors must be on.

    All `world_size` ranks must call it at about the same time (the rendezvous is collective). With a
    loopback rendezvous and gloo, gloo is pinned to the loopback interface too (GLOO_SOCKET_IFNAME), so a
    local cluster never opens a socket on an external address. `timeout_s` bounds every collective: a
    peer that died mid-exchange makes the others raise instead of waiting forever.
    """
    if backend not in ("gloo", "nccl"):
        raise TransportError(f"backend: expected 'gloo' or 'nccl', found {backend!r}")
    if dist.is_initialized():
        raise TransportError("a torch.distributed default process group already exists in this process")
    if backend == "nccl":
        if not torch.cuda.is_available():
            raise TransportError("backend 'nccl' needs CUDA; torch.cuda.is_available() is False")
        dev = torch.device(device if device is not None else f"cuda:{torch.cuda.current_device()}")
        torch.cuda.set_device(dev)
    else:
        dev = torch.device("cpu")
        if (_is_loopback(master_addr) and "GLOO_SOCKET_IFNAME" not in os.environ
                and sys.platform.startswith("linux") and os.path.exists("/sys/class/net/lo")):
            os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    dist.init_process_group(backend, init_method=f"tcp://{master_addr}:{master_port}", rank=rank,
                            world_size=world_size, timeout=datetime.timedelta(seconds=timeout_s))
    return dev


class TorchDistTransport(Transport):
    """torch.distributed send/recv in this process's default process group (one per process), which the
    caller joined (init_torch_dist; `connect` does both)."""

    def __init__(self, rank: int, world_size: int, *, device: torch.device, backend: str = "gloo"):
        self.rank, self.world_size, self.backend, self.device = rank, world_size, backend, torch.device(device)

    @classmethod
    def connect(cls, rank: int, world_size: int, *, master_port: int, master_addr: str = "127.0.0.1",
                backend: str = "gloo", device: torch.device | str | None = None,
                timeout_s: float = 120.0) -> "TorchDistTransport":
        dev = init_torch_dist(backend, rank, world_size, master_port=master_port, master_addr=master_addr,
                              device=device, timeout_s=timeout_s)
        return cls(rank, world_size, device=dev, backend=backend)

    def send(self, tensor: torch.Tensor, dst: int, step_id: int) -> None:
        self._check_peer(dst, "send")
        dist.send(encode_header(tensor, step_id).to(self.device), dst)
        if tensor.numel():
            dist.send(to_bytes(tensor.to(self.device)), dst)
        return None

    def recv(self, src: int, step_id: int) -> torch.Tensor:
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
def require_nccl4py() -> None:
    """Raise a TransportError saying what is missing when nccl4py cannot run here."""
    if not NCCL4PY_AVAILABLE:
        raise TransportError(f"nccl4py is not importable here ({NCCL4PY_IMPORT_ERROR}); install the 'gpu' extra")
    if not torch.cuda.is_available():
        raise TransportError("nccl4py needs CUDA; torch.cuda.is_available() is False")


def nccl4py_store(rank: int, world_size: int, *, master_port: int, master_addr: str = "127.0.0.1",
                  timeout_s: float = 120.0) -> "dist.TCPStore":
    """The key-value store the NCCL unique ids travel through (hosted by rank 0)."""
    return dist.TCPStore(master_addr, master_port, world_size, is_master=rank == 0,
                         timeout=datetime.timedelta(seconds=timeout_s))


def nccl4py_communicator(store: "dist.TCPStore", key: str, rank: int, size: int, device: torch.device):
    """An nccl4py Communicator of `size` ranks: rank 0 publishes a fresh unique id under `key`."""
    require_nccl4py()
    key = f"hybridserve/nccl_unique_id/{key}"
    if rank == 0:
        uid = _nccl_get_unique_id()
        raw = uid.as_bytes                               # a property in nccl4py 0.6; a method elsewhere
        store.set(key, bytes(raw() if callable(raw) else raw))
    else:
        store.wait([key])
        uid = _NcclUniqueId.from_bytes(store.get(key))
    with torch.cuda.device(device):
        return _NcclCommunicator.init(nranks=size, rank=rank, unique_id=uid)


def cuda_device(device: torch.device | str | None = None) -> torch.device:
    return torch.device(device if device is not None else f"cuda:{torch.cuda.current_device()}")


class Nccl4pyTransport(Transport):
    """The same wire format over an nccl4py Communicator (one GPU per rank). Sends and receives are
    enqueued on the current CUDA stream of `device`."""

    def __init__(self, rank: int, world_size: int, *, comm, device: torch.device):
        self.rank, self.world_size, self.comm, self.device = rank, world_size, comm, torch.device(device)

    @classmethod
    def connect(cls, rank: int, world_size: int, *, master_port: int, master_addr: str = "127.0.0.1",
                device: torch.device | str | None = None, timeout_s: float = 120.0) -> "Nccl4pyTransport":
        """A communicator of its own; rank 0 hosts the TCPStore at master_addr:master_port."""
        require_nccl4py()
        dev = cuda_device(device)
        store = nccl4py_store(rank, world_size, master_port=master_port, master_addr=master_addr, timeout_s=timeout_s)
        out = cls(rank, world_size, comm=nccl4py_communicator(store, "link", rank, world_size, dev), device=dev)
        out._store = store                               # rank 0 hosts it: keep it alive
        return out

    def _stream(self) -> int:
        return int(torch.cuda.current_stream(self.device).cuda_stream)

    def send(self, tensor: torch.Tensor, dst: int, step_id: int) -> None:
        self._check_peer(dst, "send")
        header = encode_header(tensor, step_id).to(self.device)
        self.comm.send(header, dst, stream=self._stream())
        if tensor.numel():
            self.comm.send(to_bytes(tensor.to(self.device)), dst, stream=self._stream())
        return None

    def recv(self, src: int, step_id: int) -> torch.Tensor:
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
    """A two-party (or more) stage link of its own: kind "gloo", "nccl" (torch.distributed) or "nccl4py"."""
    if kind in ("gloo", "nccl"):
        return TorchDistTransport.connect(rank, world_size, backend=kind, **kw)
    if kind == "nccl4py":
        return Nccl4pyTransport.connect(rank, world_size, **kw)
    raise TransportError(f"transport: unknown kind {kind!r}; expected gloo, nccl or nccl4py")
