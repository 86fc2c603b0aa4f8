"""`--plot PATH.png`: the distributions of TTFT, TPOT, ITL and E2EL as CDFs (matplotlib, Agg backend).

matplotlib is optional (the `bench` extra) and imported only here, only when a plot is asked for.
"""
from __future__ import annotations

from pathlib import Path

PANELS = [("ttft", "TTFT"), ("tpot", "TPOT"), ("itl", "ITL (spread over chunk tokens)"), ("e2el", "E2EL")]


def write_plot(samples_s: dict[str, list[float]], path: str | Path, title: str = "") -> None:
    """`samples_s`: figure name -> values in seconds (all rounds pooled)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise RuntimeError("--plot needs matplotlib: pip install 'hybridserve[bench]' (or matplotlib)") from None
    import numpy as np

    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    for ax, (key, label) in zip(axes.flat, PANELS):
        values = np.sort(np.asarray(samples_s.get(key, []), dtype=float) * 1000.0)
        if len(values):
            ax.step(values, np.arange(1, len(values) + 1) / len(values), where="post")
            for q, style in ((50, "--"), (99, ":")):
                ax.axvline(np.percentile(values, q), color="grey", linestyle=style, label=f"p{q}")
            ax.legend(loc="lower right")
        else:
            ax.text(0.5, 0.5, "no samples", ha="center", va="center", transform=ax.transAxes)
        ax.set_title(f"{label} (n={len(values)})")
        ax.set_xlabel("ms")
        ax.set_ylabel("fraction of samples")
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(str(path), dpi=100)
    plt.close(fig)
