"""Expert parallelism as collectives: per MoE layer one all-to-all sends every expert shard the tokens
routed to it, and one all-to-all brings the weighted partial sums back.

The expert-parallel group of a stage is the stage actor (group rank 0, which also computes the first
expert slice itself) and its expert-shard actors (group ranks 1..ep-1). Per MoE layer of a pass:

    1. headers   all-to-all, HEADER int64 per rank pair: rank 0 tells shard r
                 [LAYER, step, layer, rows, x dtype, w dtype, width, k] (shards send zeros back):
                 the shard checks step and layer, and learns how many bytes follow
    2. dispatch  all-to-all of uint8 rows, rank 0 -> shards: per routed token its latent vector
                 (width x dtype), top-k weights and top-k ids, packed side by side
    3. (rank 0 computes its own slice while the shards compute theirs)
    4. combine   all-to-all, shards -> rank 0: each shard's weighted partial sums (rows, width)

A pass runs every MoE layer of the stage once, in order, so a shard's `serve_pass` knows from its own
layer list how many exchanges the pass has: no end-of-pass message. Shards that were routed no token
still take part (with zero-length splits), so the collectives always match.

The one primitive is `AllToAll.all_to_all(out, inp, out_splits, in_splits)`: torch.distributed's
all_to_all_single on gloo (CPU) or NCCL (GPU), or the equivalent grouped send/recv over an nccl4py
communicator. Everything else is the same code for every backend, so CPU tests run what GPUs run.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from .transport import _CODE, _DTYPES, TransportError, from_bytes, to_bytes

HEADER = 8
LAYER = 1                                   # header kind (0 never is one: an all-zero header is a desync)


class AllToAll:
    """all_to_all_single over a torch.distributed ProcessGroup (gloo or NCCL), called on the group object
    itself: a subgroup from dist.new_group and a group built by hand (tests: one per thread) alike."""

    def __init__(self, group, rank: int, size: int, device: torch.device):
        self.group, self.rank, self.size, self.device = group, rank, size, torch.device(device)

    def all_to_all(self, out: torch.Tensor, inp: torch.Tensor, out_splits: list[int], in_splits: list[int]) -> None:
        """inp (sum(in_splits),) -> out (sum(out_splits),): slice r of inp goes to rank r; slice r of out
        came from rank r. Every rank of the group calls it with matching splits."""
        self.group.alltoall_base(out, inp, out_splits, in_splits).wait()


class Nccl4pyAllToAll(AllToAll):
    """The same exchange as grouped send/recv on an nccl4py communicator (ncclAlltoAll needs equal counts)."""

    def __init__(self, comm, rank: int, size: int, device: torch.device):
        super().__init__(None, rank, size, device)
        self.comm = comm

    def all_to_all(self, out, inp, out_splits, in_splits) -> None:
        from nccl.core import group

        stream = int(torch.cuda.current_stream(self.device).cuda_stream)
        outs, ins = out.split(out_splits), inp.split(in_splits)
        with group():
            for peer in range(self.size):
                if peer == self.rank:
                    continue
                if in_splits[peer]:
                    self.comm.send(ins[peer], peer, stream=stream)
                if out_splits[peer]:
                    self.comm.recv(outs[peer], peer, stream=stream)
        if out_splits[self.rank]:
            outs[self.rank].copy_(ins[self.rank])


# ---- packing ----------------------------------------------------------------------------------------------
def _row_bytes(width: int, k: int, x_dtype: torch.dtype, w_dtype: torch.dtype) -> tuple[int, int, int]:
    return width * x_dtype.itemsize, k * w_dtype.itemsize, k * 8


def pack_rows(x: torch.Tensor, w: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """x (n, width), w (n, k), ids (n, k) -> uint8 (n, row bytes): each token's three parts side by side."""
    n = x.shape[0]
    bx, bw, bi = _row_bytes(x.shape[1], w.shape[1], x.dtype, w.dtype)
    return torch.cat([to_bytes(x).view(n, bx), to_bytes(w).view(n, bw), to_bytes(ids.to(torch.int64)).view(n, bi)],
                     dim=1)


def unpack_rows(buf: torch.Tensor, n: int, width: int, k: int, x_dtype: torch.dtype, w_dtype: torch.dtype):
    """uint8 (n * row bytes,) -> x (n, width), w (n, k), ids int64 (n, k)."""
    bx, bw, bi = _row_bytes(width, k, x_dtype, w_dtype)
    rows = buf.view(n, bx + bw + bi)
    # clone: a column slice may start at an offset its dtype cannot be viewed at
    return (from_bytes(rows[:, :bx].clone().reshape(-1), x_dtype, (n, width)),
            from_bytes(rows[:, bx:bx + bw].clone().reshape(-1), w_dtype, (n, k)),
            from_bytes(rows[:, bx + bw:].clone().reshape(-1), torch.int64, (n, k)))


def _empty(device) -> torch.Tensor:
    return torch.empty(0, dtype=torch.uint8, device=device)


# ---- rank 0: the stage -------------------------------------------------------------------------------------
class ExpertDispatch:
    """The stage's end of its expert-parallel group. `step_id` is set per pass (by the stage actor)."""

    def __init__(self, a2a: AllToAll, ranges: list[tuple[int, int]]):
        if a2a.rank != 0 or len(ranges) != a2a.size - 1:
            raise TransportError(f"expert dispatch: rank {a2a.rank} of {a2a.size} with {len(ranges)} shard ranges; "
                                 f"the stage is rank 0 and every other rank holds one range")
        self.a2a, self.ranges, self.step_id = a2a, ranges, 0
        self.layers_sent = 0                      # MoE layer exchanges so far (a counter for tests and stats)

    def _headers(self, rows: list[list[int]]) -> None:
        """rows: one HEADER list per shard; rank 0 keeps nothing of what comes back (zeros)."""
        dev, size = self.a2a.device, self.a2a.size
        inp = torch.tensor([[0] * HEADER] + rows, dtype=torch.int64).reshape(-1).to(dev)
        self.a2a.all_to_all(torch.empty(size * HEADER, dtype=torch.int64, device=dev), inp, [HEADER] * size,
                            [HEADER] * size)

    def exchange(self, layer: int, x_lat: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
                 local: Callable) -> torch.Tensor:
        """x_lat (T, D), topk_* (T, k) -> (T, D): `local`'s slice plus every shard's, like the whole MoE."""
        dev, size = self.a2a.device, self.a2a.size
        width, k = x_lat.shape[1], topk_ids.shape[1]
        w = topk_weights.contiguous()
        rows_of, blocks, heads = [], [], []
        for lo, hi in self.ranges:
            rows = ((topk_ids >= lo) & (topk_ids < hi)).any(dim=1).nonzero().squeeze(1)   # tokens for this shard
            rows_of.append(rows)
            blocks.append(pack_rows(x_lat[rows], w[rows], topk_ids[rows]).reshape(-1))
            heads.append([LAYER, self.step_id, layer, rows.numel(), _CODE[x_lat.dtype], _CODE[w.dtype], width, k])
        self._headers(heads)
        self.a2a.all_to_all(_empty(dev), torch.cat(blocks).to(dev), [0] * size, [0] + [b.numel() for b in blocks])
        out = local(x_lat, topk_weights, topk_ids).float()              # overlaps with the shards' compute
        sizes = [0] + [r.numel() * width * x_lat.dtype.itemsize for r in rows_of]
        back = torch.empty(sum(sizes), dtype=torch.uint8, device=dev)
        self.a2a.all_to_all(back, _empty(dev), sizes, [0] * size)
        for rows, part in zip(rows_of, back.split(sizes)[1:]):
            if rows.numel():
                partial = from_bytes(part, x_lat.dtype, (rows.numel(), width))
                out.index_add_(0, rows, partial.to(out.device, torch.float32))
        self.layers_sent += 1
        return out.to(x_lat.dtype)


class CollectiveExperts(nn.Module):
    """Drop-in for a MoE layer's `experts` module (like RemoteExperts): this layer's exchange."""

    def __init__(self, layer: int, local: nn.Module, dispatch: ExpertDispatch):
        super().__init__()
        self.layer, self.local, self.dispatch = layer, local, dispatch

    def forward(self, x_lat: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
        """x_lat (T, D_in), topk_* (T, k) -> (T, D_in), the sum over all shards."""
        return self.dispatch.exchange(self.layer, x_lat, topk_weights, topk_ids, self.local)


# ---- ranks 1..ep-1: the expert shards ---------------------------------------------------------------------
def serve_pass(a2a: AllToAll, step_id: int, layers: list[int], compute: Callable, device) -> int:
    """Follow the stage through one pass: answer its MoE `layers`, in order. -> layers served.

    compute(layer, x (n, D), w (n, k), ids (n, k)) -> partial sums (n, D), on `device`."""
    if a2a.rank == 0:
        raise TransportError("serve_pass runs on expert shards (group ranks >= 1), not on the stage")
    dev, size = a2a.device, a2a.size
    for expected in layers:
        got = torch.empty(size * HEADER, dtype=torch.int64, device=dev)
        a2a.all_to_all(got, torch.zeros(size * HEADER, dtype=torch.int64, device=dev), [HEADER] * size,
                       [HEADER] * size)
        kind, step, layer, n, x_code, w_code, width, k = got[:HEADER].tolist()
        if (kind, step, layer) != (LAYER, step_id, expected):
            raise TransportError(f"expert shard {a2a.rank}: expected layer {expected} of step {step_id}, got header "
                                 f"{got[:HEADER].tolist()} (a pass was skipped or the stream is out of sync)")
        x_dtype, w_dtype = _DTYPES[x_code], _DTYPES[w_code]
        nbytes = n * sum(_row_bytes(width, k, x_dtype, w_dtype))
        buf = torch.empty(nbytes, dtype=torch.uint8, device=dev)
        a2a.all_to_all(buf, _empty(dev), [nbytes] + [0] * (size - 1), [0] * size)
        if n:
            x, w, ids = unpack_rows(buf, n, width, k, x_dtype, w_dtype)
            partial = compute(layer, x.to(device), w.to(device), ids.to(device)).to(x_dtype)
        else:
            partial = torch.empty(0, width, dtype=x_dtype)
        out = to_bytes(partial.to(dev))
        a2a.all_to_all(_empty(dev), out, [0] * size, [out.numel()] + [0] * (size - 1))
    return len(layers)
