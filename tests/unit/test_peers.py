"""The pure parts of benchmarks/peers.py: options, token comparison, MFU arithmetic, tables, the docs
section and the llama-server command lines (no servers are started)."""
from __future__ import annotations

import math
from pathlib import Path

import pytest

from benchmarks import peers_report as R
from benchmarks.peers import parse_args
from benchmarks.peers_docs import parity_rows, render
from benchmarks.peers_servers import build_commands, find_llama_server, llama_server_command


def test_parse_ints_sorts_and_dedups():
    assert R.parse_ints("8, 1,64,8") == [1, 8, 64]
    for bad in ("", "0,1", "a,2", "-1"):
        with pytest.raises(ValueError):
            R.parse_ints(bad)


def test_parse_names_checks_known():
    assert R.parse_names(" llama.cpp ,transformers,", ("llama.cpp", "transformers")) == ["llama.cpp", "transformers"]
    assert R.parse_names("") == []
    with pytest.raises(ValueError, match="vllm"):
        R.parse_names("vllm", ("llama.cpp",))


def test_parse_args_defaults_and_quick():
    full = parse_args([])
    assert full.models == ["default", "large"] and full.concurrency == [1, 8, 32, 64]
    q = parse_args(["--quick"])
    assert q.models == ["default"] and q.concurrency == [1, 8] and q.input_len < full.input_len
    mixed = parse_args(["--quick", "--models", "large", "--concurrency", "2", "--skip", "mtp,pp"])
    assert mixed.models == ["large"] and mixed.concurrency == [2] and mixed.skip == ["mtp", "pp"]


def test_first_difference():
    assert R.first_difference([1, 2, 3], [1, 2, 3]) is None
    assert R.first_difference([1, 2, 3], [1, 5, 3]) == (1, 2, 5)
    assert R.first_difference([1, 2], [1, 2, 3]) == (2, None, 3)
    assert R.first_difference([], []) is None
    assert R.first_difference(None, [4]) == (0, None, 4)


def test_parity_summary_and_text():
    ref = [[1, 2, 3, 4], [5, 6, 7, 8], [9, 9, 9, 9]]
    other = [[1, 2, 3, 4], [5, 6, 0, 8], [1, 9, 9, 9]]
    s = R.parity_summary(ref, other)
    assert (s["compared"], s["identical"]) == (3, 1)
    assert s["diffs"] == [{"prompt": 1, "index": 2, "reference": 7, "other": 0},
                          {"prompt": 2, "index": 0, "reference": 9, "other": 1}]
    assert s["mean_prefix"] == pytest.approx((4 + 2 + 0) / 3)
    text = R.parity_text(s)
    assert text.startswith("1/3 identical") and "prompt 1: token 2 7 vs 0" in text
    assert R.parity_text(R.parity_summary(ref, ref)) == "3/3 identical"
    assert R.parity_text(R.parity_summary(ref, None)) == "not run"


def test_mfu_arithmetic():
    assert R.matmul_gflops(2048, 2048, 32, 0.01) == pytest.approx(2 * 2048 * 2048 * 32 / 0.01 / 1e9)
    # 10M matmul params: 0.02 GFLOP a token; 500 tok/s -> 10 GFLOP/s of 100 -> 10%.
    assert R.model_gflop_per_token(10_000_000) == pytest.approx(0.02)
    assert R.mfu(10_000_000, 500.0, 100.0) == pytest.approx(0.10)
    assert math.isnan(R.mfu(10_000_000, math.nan, 100.0)) and math.isnan(R.mfu(1, 1.0, 0.0))
    pts = R.with_mfu([{"model": "m", "output_tok_s": 500.0}], {"m": 10_000_000}, 100.0)
    assert pts[0]["mfu"] == pytest.approx(0.10)


def point(model, server, c, tok_s, **kw):
    base = {"model": model, "server": server, "concurrency": c, "output_tok_s": tok_s, "ttft_p50_ms": 10.0 * c,
            "ttft_p99_ms": 20.0 * c, "tpot_p50_ms": 5.0, "tpot_p99_ms": 9.0, "completed": 8, "failed": 0,
            "peak_rss_mib": 512.0}
    return {**base, **kw}


POINTS = [point("default", "transformers generate", 1, 30.0), point("default", "hybridserve", 8, 300.0),
          point("default", "hybridserve", 1, 80.0), point("default", "llama.cpp llama-server", 1, 120.0),
          point("large", "hybridserve", 1, 10.0, accept_len=1.5)]


def test_headline_table_orders_servers_and_fills_gaps():
    t = R.headline_table(POINTS, "default").splitlines()
    assert t[0] == "| output tok/s | 1 streams | 8 streams |"
    assert [line.split("|")[1].strip() for line in t[2:]] == ["hybridserve", "llama.cpp llama-server",
                                                             "transformers generate"]
    assert t[2] == "| hybridserve | 80 | 300 |" and t[3].endswith("| 120 | - |")


def test_points_table_and_series():
    t = R.points_table(R.with_mfu(POINTS, {"default": 1_000_000, "large": 1_000_000}, 100.0))
    assert t.count("\n") == len(POINTS) + 1 and "1.50" in t and "n/a" in t
    assert R.headline_table([point("m", "hybridserve", 64, 1057.3)], "m").splitlines()[-1] == "| hybridserve | 1057 |"
    s = R.series(POINTS, "default", "output_tok_s")
    assert s["hybridserve"] == ([1, 8], [80.0, 300.0])
    assert "large" not in str(s)


def results_fixture(quick=True):
    return {"command": "python -m benchmarks.peers --quick", "machine": "x86_64, 2 cores", "quick": quick,
            "settings": {"concurrency": [1, 8], "input_len": 32, "output_len": 4, "min_prompts": 4,
                         "parity_prompts": 2, "repeats": 1, "threads": 2, "seed": 0},
            "models": {"default": {"name": "hybrid-mini", "pattern": "ME*", "total": 12_000_000, "active": 10_000_000,
                                   "matmul": 9_000_000}},
            "matmul_gflops": {"2048x2048@2048x1": 10.0, "2048x2048@2048x256": 90.0},
            "points": POINTS[:4],
            "parity": {"default": {"hybridserve": [[1, 2, 3, 4], [5, 6, 7, 8]],
                                   "llama.cpp llama-server": [[1, 2, 3, 4], [5, 6, 7, 9]],
                                   "transformers generate": [[1, 2, 3, 4], [5, 6, 7, 8]]}},
            "prompt_tokenization": {"default": R.parity_summary([[1, 2]], [[1, 2]])},
            "notes": ["llama-server not found"], "cmd": {}}


def test_parity_rows_compare_all_three():
    rows = parity_rows(results_fixture()["parity"])
    assert [r[1] for r in rows] == ["llama.cpp llama-server vs hybridserve", "transformers generate vs hybridserve",
                                    "transformers generate vs llama.cpp llama-server"]
    assert rows[0][2].startswith("1/2 identical") and rows[1][2] == "2/2 identical"


def test_render_names_command_machine_and_quick_run(tmp_path: Path):
    body = render(results_fixture(), tmp_path, write_plots=False)
    assert "python -m benchmarks.peers --quick" in body and "x86_64, 2 cores" in body
    assert "quick run" in body and "90.0 GFLOP/s" in body
    assert "img/peers-default-throughput.png" in body and "Note: llama-server not found" in body
    assert "1/2 identical" in body
    full = render(results_fixture(quick=False), tmp_path, write_plots=False)
    assert "quick run" not in full


def test_write_plots(tmp_path: Path):
    pytest.importorskip("matplotlib")
    paths = R.write_plots(POINTS, "default", tmp_path, "peers-default", "default")
    assert [p.name for p in paths] == ["peers-default-throughput.png", "peers-default-latency.png"]
    assert all(p.stat().st_size > 1000 for p in paths)


def test_llama_server_command_and_build_steps(tmp_path: Path):
    cmd = llama_server_command(Path("/x/llama-server"), Path("m.gguf"), 8, 160, 1234, 2)
    assert cmd[:7] == ["/x/llama-server", "-m", "m.gguf", "-np", "8", "-c", "1280"]
    assert cmd[cmd.index("-fa") + 1] == "off" and "--no-cache-prompt" in cmd
    steps = build_commands(tmp_path, "0.3.36")
    assert "llama-cpp-python==0.3.36" in steps[0] and ":all:" in steps[0]
    assert "-DLLAMA_USE_PREBUILT_UI=OFF" in steps[2] and steps[3][-4:-2] == ["--target", "llama-server"]
    binary, how = find_llama_server(str(tmp_path / "nope"))
    assert binary is None and "not an executable" in how
