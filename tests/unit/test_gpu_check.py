"""benchmarks/gpu_check.py is run by hand on a GPU machine that this CI never has, so here its tiny CPU
version runs end to end (Triton's interpreter for the kernels and the model forward, the engine on the
CPU): the script cannot rot unseen, and every step it reports on a GPU has run once."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch
import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the script measures the real shapes (minutes)")
def test_the_cpu_version_runs_every_step_and_writes_its_json(tmp_path):
    out = tmp_path / "gpu_check.json"
    run = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", "--out", str(out)], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    result = json.loads(out.read_text())
    ops = {r["op"] for r in result["kernels"]["rows"]}
    # every kernel family the issue names: scan (prefill and decode/verify), conv, norms, MoE, attention, verify
    assert ops >= {"ssd_chunk_scan_varlen", "ssd_update_", "ssd_verify", "conv_step_", "causal_conv1d_update",
                   "gated_rms_norm", "rms_norm", "grouped_experts", "prefill_attention", "decode_attention",
                   "paged_attention", "verify_greedy", "verify_random", "causal_conv1d_varlen"}
    assert result["kernels"]["ops_without_row"] == []                   # and a row for every other Triton op
    assert all(r["ok"] for r in result["kernels"]["rows"]), result["kernels"]["rows"]
    # the roofline columns' numerators: bytes moved, and FLOPs done by all but pure data movement
    assert all(r["bytes"] > 0 and (r["flops"] > 0) == (r["op"] != "write_kv") for r in result["kernels"]["rows"])
    assert "TFLOP/s | of bf16 matmul" in run.stdout
    assert result["kernels"]["interpreter"] is True
    fwd = result["model"]["forward"]
    assert fwd["argmax_agree"] == 1.0 and fwd["max_rel_err"] < 1e-4       # float32: Triton = reference
    engine = {(r["mtp_k"], r["seqs"]) for r in result["model"]["engine"]}
    assert engine == {(0, 1), (0, 4), (3, 1), (3, 4)}
    assert all(r["tok_s"] > 0 for r in result["model"]["engine"])
    assert "No CUDA device" in run.stdout
