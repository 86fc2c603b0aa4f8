"""Shared by the benchmark scripts: run a batch of requests through an engine and time it, and
write result rows into docs/BENCHMARKS.md between per-benchmark markers."""
from __future__ import annotations

import asyncio
import platform
import re
import time
from pathlib import Path

DOC = Path(__file__).resolve().parent.parent / "docs" / "BENCHMARKS.md"


async def run_batch(engine, prompts, params, k=None, prefix="b"):
    """Send all prompts at once; returns (generated tokens, seconds, per-request token lists)."""
    async def one(i, p):
        toks = []
        async for out in engine.generate(f"{prefix}{i}", p, params, k):
            toks += out.new_token_ids
        return toks
    t0 = time.perf_counter()
    outs = await asyncio.gather(*[one(i, p) for i, p in enumerate(prompts)])
    return sum(map(len, outs)), time.perf_counter() - t0, outs


def table(headers: list[str], rows: list[list]) -> str:
    def fmt(v):
        return f"{v:.3g}" if isinstance(v, float) else str(v)
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(fmt(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


def machine() -> str:
    """What the figures were measured on: tables from different machines differ by the CPU as well."""
    import os
    return f"{cpu_name()} ({platform.machine()}), {os.cpu_count()} cores, Python {platform.python_version()}"


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "CPU")
    except OSError:
        return platform.processor() or "CPU"


def write_section(name: str, body: str) -> None:
    """Replace (or append) the section between <!-- name:start --> and <!-- name:end -->."""
    DOC.parent.mkdir(exist_ok=True)
    text = DOC.read_text() if DOC.exists() else "# Benchmarks\n\nEvery table here is written by a script under benchmarks/; rerun it to refresh.\n"
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    block = f"{start}\n{body.strip()}\n{end}"
    if start in text:
        text = re.sub(re.escape(start) + r".*?" + re.escape(end), lambda _: block, text, flags=re.S)
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    DOC.write_text(text)


def publish(name: str, body: str, write: bool) -> None:
    """Print a benchmark's section and, unless told not to, write it into docs/BENCHMARKS.md."""
    print(body)
    if write:
        write_section(name, body)
