"""The pure parts of benchmarks/peers.py: option parsing, greedy token comparison, MFU arithmetic, the
tables of docs/BENCHMARKS.md and the PNG plots. No servers, no torch: tests/unit/test_peers.py checks them.

A *point* is one measurement: one model, one server setup, one concurrency, as a flat dict:
`model, server, concurrency, output_tok_s, ttft_p50_ms, ttft_p99_ms, tpot_p50_ms, tpot_p99_ms, completed,
failed, peak_rss_mib` and, where they apply, `accept_len` (MTP) and `mfu` (filled in by `with_mfu`).
"""
from __future__ import annotations

import math
from pathlib import Path

from .common import table

SERVER_ORDER = ("hybridserve", "hybridserve default (adaptive MTP)", "hybridserve MTP k=3", "hybridserve -pp 2 -ep 2", "hybridserve -pp 2 -ep 2 MTP k=3",
                "llama.cpp llama-server", "transformers generate")
PEERS = ("llama.cpp", "transformers")


# ---- options ----------------------------------------------------------------------------------------
def parse_ints(text: str, what: str = "--concurrency") -> list[int]:
    """"1,8,32" -> [1, 8, 32] (sorted, no repeats); every value a positive integer."""
    try:
        values = sorted({int(v) for v in text.split(",") if v.strip()})
    except ValueError:
        raise ValueError(f"{what}: expected comma-separated integers, got {text!r}") from None
    if not values or values[0] < 1:
        raise ValueError(f"{what}: expected positive integers, got {text!r}")
    return values


def parse_names(text: str, known: tuple[str, ...] | None = None, what: str = "--skip") -> list[str]:
    """"llama.cpp, transformers" -> ["llama.cpp", "transformers"]; unknown names are an error when `known`."""
    names = [v.strip() for v in text.split(",") if v.strip()]
    if known is not None:
        bad = [n for n in names if n not in known]
        if bad:
            raise ValueError(f"{what}: unknown {', '.join(bad)}; known: {', '.join(known)}")
    return names


# ---- greedy parity ----------------------------------------------------------------------------------
def first_difference(a: list[int] | None, b: list[int] | None) -> tuple[int, int | None, int | None] | None:
    """None when the two token lists are equal, else (index, a's token, b's token) at the first difference
    (a token is None where one list has ended)."""
    a, b = list(a or []), list(b or [])
    for i in range(max(len(a), len(b))):
        x = a[i] if i < len(a) else None
        y = b[i] if i < len(b) else None
        if x != y:
            return i, x, y
    return None


def parity_summary(reference: list[list[int]], other: list[list[int]] | None) -> dict:
    """Prompt-by-prompt comparison of `other` against `reference`: how many agree on every token, the
    first difference of each that does not, and the mean length of the agreeing prefix."""
    if other is None:
        return {"compared": 0, "identical": 0, "diffs": [], "mean_prefix": math.nan}
    diffs, prefixes = [], []
    for i, (ref, oth) in enumerate(zip(reference, other)):
        d = first_difference(ref, oth)
        prefixes.append(len(ref) if d is None else d[0])
        if d is not None:
            diffs.append({"prompt": i, "index": d[0], "reference": d[1], "other": d[2]})
    n = min(len(reference), len(other))
    return {"compared": n, "identical": n - len(diffs), "diffs": diffs,
            "mean_prefix": sum(prefixes) / n if n else math.nan}


def parity_text(s: dict, limit: int = 3) -> str:
    if not s["compared"]:
        return "not run"
    text = f"{s['identical']}/{s['compared']} identical"
    if s["diffs"]:
        firsts = "; ".join(f"prompt {d['prompt']}: token {d['index']} {d['reference']} vs {d['other']}"
                           for d in s["diffs"][:limit])
        more = f"; {len(s['diffs']) - limit} more" if len(s["diffs"]) > limit else ""
        text += f" (first differences: {firsts}{more}; mean agreeing prefix {s['mean_prefix']:.1f} tokens)"
    return text


# ---- model FLOP utilisation ---------------------------------------------------------------------------
def matmul_gflops(m: int, k: int, n: int, seconds: float) -> float:
    """GFLOP/s of one (m x k) @ (k x n) product that took `seconds` (2mkn flops)."""
    return 2.0 * m * k * n / seconds / 1e9


def model_gflop_per_token(matmul_params: int) -> float:
    """Forward flops per generated token: 2 per weight a token multiplies (attention's context term, small
    at these lengths, left out)."""
    return 2.0 * matmul_params / 1e9


def mfu(matmul_params: int, tok_s: float, peak_gflops: float) -> float:
    """Model FLOP utilisation: the flops the output tokens needed per second over the machine's measured
    matmul throughput (prefill flops not counted, so this is a lower bound of the work done)."""
    if not peak_gflops or not tok_s or math.isnan(tok_s):
        return math.nan
    return model_gflop_per_token(matmul_params) * tok_s / peak_gflops


def with_mfu(points: list[dict], matmul_params: dict[str, int], peak_gflops: float) -> list[dict]:
    return [{**p, "mfu": mfu(matmul_params.get(p["model"], 0), p.get("output_tok_s", math.nan), peak_gflops)}
            for p in points]


# ---- tables -------------------------------------------------------------------------------------------
def _order(p: dict) -> tuple:
    s = p["server"]
    return (p["model"], SERVER_ORDER.index(s) if s in SERVER_ORDER else len(SERVER_ORDER), s, p["concurrency"])


def _num(v, fmt: str | None = None) -> str:
    """3 significant digits, without an exponent for large values (1057, not 1.06e+03)."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    if fmt is None:
        fmt = "{:.0f}" if abs(v) >= 100 else "{:.3g}"
    return fmt.format(v)


def points_table(points: list[dict]) -> str:
    """Every point, one row: the per-server figures at each concurrency."""
    headers = ["model", "server", "streams", "output tok/s", "TTFT p50 ms", "TTFT p99 ms", "TPOT p50 ms",
               "TPOT p99 ms", "MFU", "peak RSS MiB", "MTP accept len", "done/failed"]
    rows = []
    for p in sorted(points, key=_order):
        rows.append([p["model"], p["server"], p["concurrency"], _num(p.get("output_tok_s")),
                     _num(p.get("ttft_p50_ms")), _num(p.get("ttft_p99_ms")), _num(p.get("tpot_p50_ms")),
                     _num(p.get("tpot_p99_ms")), _num(p.get("mfu"), "{:.2%}"), _num(p.get("peak_rss_mib"), "{:.0f}"),
                     _num(p.get("accept_len"), "{:.2f}"), f"{p.get('completed', 0)}/{p.get('failed', 0)}"])
    return table(headers, rows)


def headline_table(points: list[dict], model: str) -> str:
    """Output tok/s of each server (rows) at each concurrency (columns), for one model."""
    mine = [p for p in points if p["model"] == model]
    concs = sorted({p["concurrency"] for p in mine})
    servers = sorted({p["server"] for p in mine}, key=lambda s: _order({"model": model, "server": s, "concurrency": 0}))
    by = {(p["server"], p["concurrency"]): p for p in mine}
    rows = [[s] + [_num(by[(s, c)].get("output_tok_s")) if (s, c) in by else "-" for c in concs] for s in servers]
    return table(["output tok/s"] + [f"{c} streams" for c in concs], rows)


def ratio_table(points: list[dict], model: str, peer: str) -> str:
    """Each hybridserve setup's output tok/s over the peer's, at each concurrency, for one model."""
    mine = [p for p in points if p["model"] == model]
    concs = sorted({p["concurrency"] for p in mine})
    by = {(p["server"], p["concurrency"]): p.get("output_tok_s") for p in mine}
    ours = sorted({p["server"] for p in mine if p["server"].startswith("hybridserve")},
                  key=lambda s: _order({"model": model, "server": s, "concurrency": 0}))

    def ratio(s, c):
        a, b = by.get((s, c)), by.get((peer, c))
        return "-" if not a or not b or math.isnan(a) or math.isnan(b) else f"{a / b:.2f}x"
    return table([f"/ {peer}"] + [f"{c} streams" for c in concs], [[s] + [ratio(s, c) for c in concs] for s in ours])


# ---- plots --------------------------------------------------------------------------------------------
def series(points: list[dict], model: str, key: str) -> dict[str, tuple[list[int], list[float]]]:
    """server -> (concurrencies, values of `key`), points without a value left out."""
    out: dict[str, tuple[list[int], list[float]]] = {}
    for p in sorted((p for p in points if p["model"] == model), key=_order):
        v = p.get(key)
        if v is None or (isinstance(v, float) and math.isnan(v)):
            continue
        xs, ys = out.setdefault(p["server"], ([], []))
        xs.append(p["concurrency"])
        ys.append(v)
    return out


def write_plots(points: list[dict], model: str, folder: Path, stem: str, title: str) -> list[Path]:
    """Two PNGs for one model: output tok/s against concurrency; TTFT and TPOT p50/p99 against concurrency."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from matplotlib.ticker import LogLocator, NullFormatter, ScalarFormatter

    def plain_axes(ax, log_y: bool) -> None:
        """Concurrencies as plain numbers on a log2 x axis; plain numbers on a log y axis."""
        concs = sorted({p["concurrency"] for p in points if p["model"] == model})
        ax.set_xscale("log", base=2)
        ax.set_xticks(concs)
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_formatter(NullFormatter())
        if log_y:
            ax.set_yscale("log")
            ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
            ax.yaxis.set_major_formatter(ScalarFormatter())
            ax.yaxis.set_minor_formatter(NullFormatter())

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for server, (xs, ys) in series(points, model, "output_tok_s").items():
        ax.plot(xs, ys, marker="o", label=server)
    plain_axes(ax, log_y=False)
    ax.set_ylim(bottom=0)
    ax.set_xlabel("concurrent streams")
    ax.set_ylabel("output tokens/s")
    ax.set_title(f"Throughput: {title}")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    paths.append(folder / f"{stem}-throughput.png")
    fig.savefig(paths[-1], dpi=90)
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, fig_name in zip(axes, ("ttft", "tpot")):
        for i, (server, (xs, ys)) in enumerate(series(points, model, f"{fig_name}_p50_ms").items()):
            color = f"C{i}"
            ax.plot(xs, ys, marker="o", color=color, label=f"{server} p50")
            xs99, ys99 = series(points, model, f"{fig_name}_p99_ms").get(server, ([], []))
            ax.plot(xs99, ys99, marker="x", linestyle="--", color=color, label=f"{server} p99")
        plain_axes(ax, log_y=True)
        ax.set_xlabel("concurrent streams")
        ax.set_ylabel("ms (log scale)")
        ax.set_title(f"{fig_name.upper()} p50 (solid) and p99 (dashed)")
        ax.grid(alpha=0.3, which="both")
    axes[0].legend(fontsize=6)
    fig.suptitle(title)
    fig.tight_layout()
    paths.append(folder / f"{stem}-latency.png")
    fig.savefig(paths[-1], dpi=90)
    plt.close(fig)
    return paths
