"""The CPU product x @ W^T at the model's shapes, four ways side by side: `python -m benchmarks.linear`.

torch's F.linear (MKL), W @ x^T (kernels/fast/linear.py's few-rows product), oneDNN on the weight
reordered once (the engine's path from ONEDNN_MIN_ROWS rows up) and, up to FEW_ROWS rows, the native
kernel reading the weight's bfloat16 bits (kernels/fast/native/linear.c; the weights here are bfloat16
values, as a released checkpoint's are), one torch thread, each timed
alternately over repeated rounds (median), weights warm in cache. Prints a table and writes
docs/BENCHMARKS.md (section "linear"). Not a test.
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
                    if bits is not None and m <= fast_linear.FEW_ROWS:
                        native = _time(lambda: fast_linear._bf16_product(x, bits, m), reps)
                flops = 2 * m * din * dout
                out.append([model, name, f"{m}x{din} @ {din}x{dout}", 1e6 * mkl, 1e6 * few, 1e6 * onednn,
                            1e6 * native, flops / onednn / 1e9, mkl / onednn])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["default", "hybrid-280m"],
                    help="checkpoint names or folders, or preset names (random weights: only shapes matter)")
    ap.add_argument("--rows", nargs="+", type=int, default=[1, 4, 8, 32, 64])
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    rows = run(args.models, args.rows)
    body = (f"## The CPU product x @ W^T (`python -m benchmarks.linear`)\n\n"
            f"Machine: {machine()}, one torch thread, float32, weights warm in cache, median of 5 rounds. "
            "MKL = `F.linear`; W @ x^T = the few-rows product; oneDNN = `torch.ops.mkldnn._linear_pointwise` on "
            "the weight reordered once (`_reorder_linear_weight`); bf16 native = the C kernel reading the "
            "weight's bfloat16 bits (the weights are bfloat16 values). The engine uses oneDNN from "
            f"{fast_linear.ONEDNN_MIN_ROWS} rows and, below, the native kernel for weights that are exactly "
            f"bfloat16 (up to {fast_linear.FEW_ROWS} rows without oneDNN), otherwise W @ x^T for 2-"
            f"{fast_linear.ONEDNN_MIN_ROWS - 1} rows and MKL for one (kernels/fast/linear.py, docs/KERNELS.md). "
            "Warm weights favour the compute-bound paths; in a decode step the weights come from memory, where "
            "the bfloat16 kernel reads half the bytes.\n\n"
            + table(["model", "product", "shape", "MKL us", "W @ x^T us", "oneDNN us", "bf16 native us",
                     "oneDNN GFLOP/s", "MKL / oneDNN"], rows) + "\n")
    publish("linear", body, write=not args.no_write)


if __name__ == "__main__":
    main()
