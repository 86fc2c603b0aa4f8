"""The CPU product x @ W^T at the model's shapes, four ways side by side: `python -m benchmarks.linear`.

torch's F.linear (MKL), W @ x^T (kernels/fast/linear.py's few-rows product), oneDNN on the weight
reordered once, and the native packed kernel reading the weight's bfloat16 bits (kernels/fast/native/
linear.c; the weights here are bfloat16 values, as a released checkpoint's are; the engine's path up to
PACKED_MAX_ROWS rows), one torch thread. Two tables: each product alone with its weight warm in cache
(median of rounds), and every product of the checkpoint in turn, as a decode pass meets them (weights
from memory), oneDNN and the packed kernel alternating over rounds (thread CPU time, median).
Prints the tables and writes docs/BENCHMARKS.md (section "linear"). Not a test.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from kernels.fast import linear as fast_linear
from model_shards.config import ModelConfig
from model_shards.presets import PRESETS
from router.engine_config import resolve_checkpoint

from .common import machine, publish, table


def _time(fn, reps: int) -> float:
    """Seconds per call: the median of 5 rounds of `reps` calls."""
    fn()
    rounds = []
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        rounds.append((time.perf_counter() - t0) / reps)
    return statistics.median(rounds)


def shapes(model: str) -> list[tuple[str, int, int]]:
    """(name, in, out) of the model's largest products."""
    c = PRESETS[model] if model in PRESETS else ModelConfig.from_json(resolve_checkpoint(model) / "config.json")
    return [("Mamba in_proj", c.hidden_size, c.mamba_in_proj_dim), ("Mamba out_proj", c.d_inner, c.hidden_size),
            ("lm_head", c.hidden_size, c.vocab_size)]


def run(models: list[str], rows: list[int]) -> list[list]:
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    out = []
    for model in models:
        for name, din, dout in shapes(model):
            w = torch.nn.Parameter((torch.rand(dout, din, generator=g) - 0.5).to(torch.bfloat16).float(),
                                   requires_grad=False)
            bits = fast_linear.bf16_bits(w)
            for m in rows:
                x = torch.rand(m, din, generator=g) - 0.5
                reps = max(5, int(2e8 / (2 * m * din * dout + 1e5)))
                with torch.no_grad():
                    mkl = _time(lambda: F.linear(x, w), reps)
                    few = _time(lambda: torch.mm(w, x.t()).t().contiguous(), reps)
                    if fast_linear.ONEDNN:
                        packed = fast_linear.packed_weight(w)
                        onednn = _time(lambda: torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], ""),
                                       reps)
                    else:
                        onednn = float("nan")
                    native = float("nan")
                    if bits is not None and m <= fast_linear.PACKED_MAX_ROWS:
                        pk = fast_linear.packed_bf16(w, bits)
                        native = _time(lambda: fast_linear._bf16_product(x, pk, dout, m), reps)
                flops = 2 * m * din * dout
                out.append([model, name, f"{m}x{din} @ {din}x{dout}", 1e6 * mkl, 1e6 * few, 1e6 * onednn,
                            1e6 * native, flops / onednn / 1e9, mkl / onednn])
    return out


def checkpoint_weights(model: str) -> list[torch.nn.Parameter]:
    """The checkpoint's matrices as float32 Parameters, each expert its own (what a decode pass multiplies by)."""
    from safetensors.torch import load_file
    out = []
    for f in sorted(resolve_checkpoint(model).glob("*.safetensors")):
        for name, t in load_file(f).items():
            mats = [t] if t.dim() == 2 else list(t) if t.dim() == 3 else []
            out += [torch.nn.Parameter(m.float().contiguous(), requires_grad=False) for m in mats
                    if min(m.shape) >= 64 and "embed" not in name]
    return out


def run_cold(model: str, rows: list[int], rounds: int = 15) -> list[list]:
    """ms per sweep over every matrix of the checkpoint: oneDNN and the packed kernel, alternating."""
    torch.set_num_threads(1)
    ws = checkpoint_weights(model)
    bits = [fast_linear.bf16_bits(w) for w in ws]
    if any(b is None for b in bits) or not fast_linear.ONEDNN:
        return []
    packs = [fast_linear.packed_bf16(w, b) for w, b in zip(ws, bits)]
    onednn = [fast_linear.packed_weight(w) for w in ws]
    out = []
    for m in rows:
        g = torch.Generator().manual_seed(m)
        xs = {w.shape[1]: torch.rand(m, w.shape[1], generator=g) - 0.5 for w in ws}

        def sweep(packed: bool) -> float:
            t0 = time.thread_time()
            with torch.no_grad():
                for w, pk, od in zip(ws, packs, onednn):
                    x = xs[w.shape[1]]
                    if packed:
                        fast_linear._bf16_product(x, pk, w.shape[0], m)
                    else:
                        torch.ops.mkldnn._linear_pointwise(x, od, None, "none", [], "")
            return time.thread_time() - t0
        sweep(True), sweep(False)
        times = {True: [], False: []}
        for r in range(rounds):
            for packed in ((True, False) if r % 2 else (False, True)):
                times[packed].append(sweep(packed))
        flops = sum(2 * m * w.numel() for w in ws)
        od, pk = statistics.median(times[False]), statistics.median(times[True])
        out.append([model, len(ws), f"{sum(w.numel() for w in ws) / 1e6:.1f}M", m, 1e3 * od, 1e3 * pk,
                    flops / od / 1e9, flops / pk / 1e9, od / pk])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["default", "hybrid-280m"],
                    help="checkpoint names or folders, or preset names (random weights: only shapes matter)")
    ap.add_argument("--rows", nargs="+", type=int, default=[1, 4, 8, 32, 64])
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    rows = run(args.models, args.rows)
    cold = run_cold("default", args.rows)
    body = (f"## The CPU product x @ W^T (`python -m benchmarks.linear`)\n\n"
            f"Machine: {machine()}, one torch thread, float32 products.\n\n"
            "Each product alone, its weight warm in cache (median of 5 rounds). MKL = `F.linear`; W @ x^T = the "
            "few-rows product; oneDNN = `torch.ops.mkldnn._linear_pointwise` on the weight reordered once "
            "(`_reorder_linear_weight`); bf16 packed = the native kernel reading the weight's bfloat16 bits, "
            "packed sixteen output features at a time (the weights are bfloat16 values). The engine uses the "
            f"packed kernel up to {fast_linear.PACKED_MAX_ROWS} rows for weights that are exactly bfloat16, "
            f"oneDNN from {fast_linear.ONEDNN_MIN_ROWS} rows otherwise (kernels/fast/linear.py, "
            "docs/KERNELS.md).\n\n"
            + table(["model", "product", "shape", "MKL us", "W @ x^T us", "oneDNN us", "bf16 packed us",
                     "oneDNN GFLOP/s", "MKL / oneDNN"], rows) + "\n\n"
            "Every matrix of the default checkpoint in turn (each expert its own), as a decode pass meets them: "
            "weights from memory, not cache. oneDNN and the packed kernel alternate over 15 rounds; thread CPU "
            "time, median.\n\n"
            + table(["model", "matrices", "parameters", "rows", "oneDNN ms per sweep", "bf16 packed ms per sweep",
                     "oneDNN GFLOP/s", "bf16 packed GFLOP/s", "oneDNN / packed"], cold) + "\n")
    publish("linear", body, write=not args.no_write)


if __name__ == "__main__":
    main()
