"""The printed summary (laid out like vLLM's `bench serve`) and the JSON file for scripts.

Every rate and latency line shows the median over rounds and, with more than one round, the [min, max]
range over rounds: the noise a second run should fall within (`metrics.agree`).
"""
from __future__ import annotations

import json
import math
from pathlib import Path

WIDTH = 50
SECTIONS = [("ttft", "Time to First Token", "TTFT"),
            ("tpot", "Time per Output Token (excl. 1st token)", "TPOT"),
            ("itl", "Inter-token Latency (chunk gap / its tokens)", "ITL"),
            ("e2el", "End-to-end Latency", "E2EL")]
STAT_LABELS = [("mean", "Mean"), ("median", "Median"), ("p90", "P90"), ("p99", "P99")]


def _num(v) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    return f"{v:.2f}"


def _line(label: str, fig: dict | None, show_range: bool) -> str:
    if fig is None:
        return f"{label + ':':<40}{'n/a':>10}"
    text = f"{label + ':':<40}{_num(fig['median']):>10}"
    if show_range and not math.isnan(fig["min"]):
        text += f"  [{_num(fig['min'])}, {_num(fig['max'])}]"
    return text


def _rule(title: str = "", fill: str = "-") -> str:
    return f"{' ' + title + ' ' if title else ''}".center(WIDTH, fill)


def format_table(result: dict) -> str:
    f, rounds = result["figures"], result["rounds"]
    many = rounds > 1
    lines = [_rule("Serving Benchmark Result", "="),
             f"{'Model:':<40}{result['model']}",
             f"{'Endpoint:':<40}{result['endpoint']}",
             f"{'Rounds (same workload each):':<40}{rounds:>10}" + ("  [min, max] over rounds" if many else ""),
             f"{'Successful requests:':<40}{result['completed']:>10}",
             f"{'Failed requests:':<40}{result['failed']:>10}",
             f"{'Total input tokens:':<40}{result['total_input_tokens']:>10}",
             f"{'Total generated tokens:':<40}{result['total_output_tokens']:>10}",
             _line("Round duration (s)", f["duration_s"], many),
             _line("Request throughput (req/s)", f["request_throughput"], many),
             _line("Output token throughput (tok/s)", f["output_throughput"], many),
             _line("Total token throughput (tok/s)", f["total_token_throughput"], many)]
    if "request_goodput" in f:
        slos = ", ".join(f"{k} <= {v:g} ms" for k, v in result["goodput_slos_ms"].items())
        lines.append(_line("Request goodput (req/s)", f["request_goodput"], many))
        lines.append(f"  (SLOs: {slos})")
    for key, title, short in SECTIONS:
        lines.append(_rule(title))
        for stat, label in STAT_LABELS:
            lines.append(_line(f"{label} {short} (ms)", f.get(f"{key}_{stat}_ms"), many))
    spec = result.get("spec_decode")
    if spec:
        lines.append(_rule("Speculative decoding (MTP, from /metrics)"))
        lines.append(f"{'Acceptance rate (%):':<40}{100 * spec['acceptance_rate']:>10.2f}")
        lines.append(f"{'Mean acceptance length (tokens/round):':<40}{_num(spec['mean_acceptance_length']):>10}")
        for i, rate in enumerate(spec["acceptance_rate_per_position"]):
            lines.append(f"{f'Acceptance rate, position {i} (%):':<40}"
                         f"{(_num(100 * rate) if rate is not None else 'n/a'):>10}")
    lines.append("=" * WIDTH)
    if result["failed"]:
        lines.append(f"first error: {result['first_error']}")
    return "\n".join(lines)


def _clean(obj):
    """NaN / inf are not JSON: write null."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


def write_json(result: dict, path: str | Path) -> None:
    Path(path).write_text(json.dumps(_clean(result), indent=1) + "\n", encoding="utf-8")
