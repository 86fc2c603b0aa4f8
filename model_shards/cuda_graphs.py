"""CUDA graphs for decode passes: a decode step's Mamba and dense-MLP blocks recorded once per batch-size
bucket, then replayed.

Why: a decode step on a GPU is a few rows per kernel, so its time goes to launching ~20 small kernels per
Mamba block (norm, projections, conv, state update, gated norm, gathers); a replayed graph launches them
from the device in one call.

What is captured: each run of consecutive Mamba / MLP blocks (norm, mixer, residual add), as one graph.
What stays eager, on the pass's real rows with its real layout:
- the embedding, and everything after the layers (the tail: logits, verification, sampling, drafting);
- attention blocks: their block tables and positions change width and value every step, and a hybrid
  has few of them;
- latent-MoE blocks: the Triton grouped_experts sizes its expert histogram with torch.bincount, which
  reads the histogram's length on the host (a sync a graph cannot hold); under expert parallelism the
  experts are other processes anyway.
Which passes: every sequence one decode token (no drafts; not its first token, whose Mamba state is reset
on the host), at most the largest bucket's rows. Verification passes run eagerly.

Padding: a pass of n rows replays the graphs of the smallest bucket B >= n; rows n..B-1 are Mamba rows of
the scratch slot (one slot beyond the engine's, which the worker allocates), and no eager part sees them.
Every captured op is row-wise, so a real row's numbers are those of an eager pass of B rows (a GEMM of
another row count may round differently, as between any two eager batch sizes).

A bucket is captured on first use: warm-up on a side stream (Triton autotuning, cuBLAS workspaces), then
capture; both touch only the scratch slot. If capture raises, a warning is logged (later failures at debug
level) and that bucket's passes run eagerly (the same outputs: this module only changes how launches are
issued).
"""
from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from .batch import BatchLayout
from .config import MAMBA, MLP, ModelConfig
from .model import HybridModel

log = logging.getLogger("hybridserve.cuda_graphs")

CAPTURED_KINDS = frozenset({MAMBA, MLP})    # block kinds whose decode pass is capture-safe (module docstring)
MAX_BUCKET = 512                            # larger passes run eagerly (a graph per bucket costs memory)
# A captured Mamba block gathers its rows' SSM states and scatters them back (Mamba2Mixer._decode_rows), where
# an eager pass over a dense range of slots updates them in place: 2 extra reads and writes of the states.
# A graph saves ~20 launches per Mamba block (~0.1 ms); buckets whose gathered states (per layer) exceed this
# many bytes would lose more to the copies than the launches cost, and run eagerly (an estimate at ~4 TB/s,
# not measured). Super (4 MiB of state per sequence and layer): up to 16 rows; the small presets: MAX_BUCKET.
GATHER_BUDGET_BYTES = 64 << 20
WARMUP_RUNS = 2

# capture(fn) -> (replay, output): record fn() (which reads static buffers) and return a callable that
# reruns it and the tensor its output stays in. CudaCapture on a GPU; tests pass an eager stand-in.
Capture = Callable[[Callable[[], torch.Tensor]], tuple[Callable[[], None], torch.Tensor]]


# ---- the pure parts: buckets, padding, segments ---------------------------------------------------------

def bucket_sizes(max_rows: int, cap: int = MAX_BUCKET) -> list[int]:
    """1, 2, 4, ... up to the first power of two >= max_rows, none above cap (but always 1)."""
    sizes, b = [1], 1
    while b < max_rows and 2 * b <= cap:
        b *= 2
        sizes.append(b)
    return sizes


def row_cap(cfg: ModelConfig, has_mamba: bool) -> int:
    """The most rows a graph takes: MAX_BUCKET, or fewer where the gathered SSM states pass
    GATHER_BUDGET_BYTES (float32 (H, P, N) per row and layer)."""
    if not has_mamba:
        return MAX_BUCKET
    per_row = 4 * cfg.mamba_num_heads * cfg.mamba_head_dim * cfg.ssm_state_size
    return max(1, min(MAX_BUCKET, GATHER_BUDGET_BYTES // per_row))


def bucket_for(n: int, buckets: list[int]) -> int | None:
    """The smallest bucket holding n rows; None when none does (the pass runs eagerly)."""
    return next((b for b in buckets if b >= n), None) if n > 0 else None


def pad_slots(slots: list[int], bucket: int, scratch: int) -> list[int]:
    """A pass's Mamba slots, row by row, padded to `bucket` rows with the scratch slot."""
    if len(slots) > bucket:
        raise ValueError(f"{len(slots)} rows do not fit a bucket of {bucket}")
    return list(slots) + [scratch] * (bucket - len(slots))


def segments(kinds: list[str], captured=CAPTURED_KINDS) -> list[tuple[bool, list[int]]]:
    """The layers (positions in `kinds`) in order, as (captured, positions): maximal runs of captured kinds,
    and the other layers one by one."""
    out: list[tuple[bool, list[int]]] = []
    for i, kind in enumerate(kinds):
        cap = kind in captured
        if cap and out and out[-1][0]:
            out[-1][1].append(i)
        else:
            out.append((cap, [i]))
    return out


def decode_rows(batch: BatchLayout) -> bool:
    """Whether a pass qualifies: every sequence one decode token in row order, none its first token."""
    return bool(batch.seqs) and all(s.num_tokens == 1 and not s.keep_states and s.start_pos > 0 and s.offset == i
                                    for i, s in enumerate(batch.seqs))


# ---- the runner -----------------------------------------------------------------------------------------

class DecodeGraphs:
    """Decode passes of `model` over `cache` through per-bucket graphs. forward() returns None for a pass
    it does not take (the caller runs the model eagerly)."""

    def __init__(self, model: HybridModel, cache, *, scratch_slot: int, max_rows: int,
                 capture: Capture | None = None):
        self.model, self.cache, self.scratch_slot = model, cache, scratch_slot
        self.layers = [(block, cache.mamba.get(int(i)) or cache.kv.get(int(i)))
                       for i, block in model.backbone.layers.items()]
        self.buckets = bucket_sizes(max_rows, row_cap(model.cfg, any(b.kind == MAMBA for b, _ in self.layers)))
        self.plan = segments([block.kind for block, _ in self.layers])
        self.enabled = any(cap for cap, _ in self.plan)
        self._capture = capture if capture is not None else CudaCapture()
        self._graphs: dict[int, list] = {}          # bucket -> per captured segment: (replay, output (B, d))
        self.failed: set[int] = set()               # buckets whose capture raised: eager
        dev = next(model.parameters()).device
        B = self.buckets[-1]
        self._slots = torch.full((B,), scratch_slot, dtype=torch.long, device=dev)           # (B,)
        self._h = torch.zeros(B, model.cfg.hidden_size, dtype=model.dtype, device=dev)       # (B, d) graphs' input

    @property
    def captured(self) -> list[int]:
        return sorted(self._graphs)

    def forward(self, x: torch.Tensor, batch: BatchLayout) -> torch.Tensor | None:
        """model(x, batch, cache) for a qualifying pass (decode_rows), else None. x: token ids (n,) on the
        first stage, hidden states (n, d) elsewhere -> (n, d)."""
        n = len(batch.seqs)
        bucket = bucket_for(n, self.buckets)
        if not self.enabled or bucket is None or bucket in self.failed or not decode_rows(batch):
            return None
        graphs = self._graphs.get(bucket)
        if graphs is None:
            graphs = self._capture_bucket(bucket)
            if graphs is None:
                return None
        padded = pad_slots([s.mamba_slot for s in batch.seqs], bucket, self.scratch_slot)
        self._slots[:bucket].copy_(torch.tensor(padded, dtype=torch.long))
        h = self.model.embed(x) if self.model.first else x                   # (n, d)
        replays = iter(graphs)
        for cap, positions in self.plan:
            if cap:
                replay, out = next(replays)
                self._h[:n].copy_(h)
                replay()
                h = out[:n]
            else:
                for p in positions:
                    block, cache = self.layers[p]
                    h = block(h, batch, cache)
        return h.clone() if self.plan[-1][0] else h       # the next replay overwrites a graph's output

    def _run(self, positions: list[int], bucket: int) -> torch.Tensor:
        """One captured segment over the static buffers: rows 0..bucket-1, Mamba slots from _slots."""
        static = BatchLayout([], slots=self._slots[:bucket])
        h = self._h[:bucket]
        for p in positions:
            block, cache = self.layers[p]
            h = block(h, static, cache)
        return h

    def _capture_bucket(self, bucket: int) -> list | None:
        self._slots[:bucket].fill_(self.scratch_slot)      # warm-up runs write the scratch slot only
        try:
            graphs = [self._capture(lambda ps=positions: self._run(ps, bucket)) for cap, positions in self.plan if cap]
        except Exception as e:  # noqa: BLE001 - any failure to capture: run this bucket eagerly
            first = not self.failed
            self.failed.add(bucket)
            (log.warning if first else log.debug)(
                "CUDA graphs: capturing decode passes of %d rows failed (%s: %s); those passes run eagerly "
                "(outputs unchanged)%s", bucket, type(e).__name__, e,
                "; other batch sizes that fail are logged at debug level" if first else "")
            return None
        self._graphs[bucket] = graphs
        return graphs


class CudaCapture:
    """Capture on a GPU: warm fn up on a side stream, then record it into a CUDA graph. One memory pool
    and side stream per runner (its graphs never replay at once); thread_local: other threads' CUDA
    calls do not spoil a capture."""

    def __init__(self):
        self.pool = torch.cuda.graph_pool_handle()
        self.stream = torch.cuda.Stream()

    def __call__(self, fn: Callable[[], torch.Tensor]) -> tuple[Callable[[], None], torch.Tensor]:
        self.stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.stream):
            for _ in range(WARMUP_RUNS):
                fn()
        torch.cuda.current_stream().wait_stream(self.stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool, stream=self.stream, capture_error_mode="thread_local"):
            out = fn()
        return graph.replay, out
