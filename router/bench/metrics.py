"""The figures of `hybridserve bench` as pure functions of what the client recorded.

Definitions (vLLM's `bench serve`, except ITL, which is spread over the tokens a chunk carries):
- TTFT: send -> the first chunk that carries output (text, or tokens by the usage count).
- E2EL: send -> the last chunk that carries output (the usage chunk and [DONE] after it are not output).
- TPOT: (E2EL - TTFT) / (output tokens - 1); requests with one output token have none.
- ITL: a chunk's gap to the previous output chunk, divided evenly over the k tokens it carries (k values).
  With MTP a chunk can carry several tokens; counting it as one slow token would overstate ITL by up to
  k times. The first chunk's extra tokens arrived with the first token (ITL 0), so a request has
  (tokens - 1) ITL values that sum to its last-chunk minus first-chunk time.
- Throughputs: completed requests and their output (and input) tokens per second of the round.
- Goodput: completed requests per second that meet every SLO given (ttft, tpot, e2el in ms).
Each round yields one value per figure; `combine_rounds` reports the median and the min-max range.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np

SLO_NAMES = ("ttft", "tpot", "e2el")
STAT_NAMES = ("mean", "median", "p90", "p99")
LATENCY_NAMES = ("ttft", "tpot", "itl", "e2el")


@dataclass
class RequestRecord:
    """One request as the client saw it; times in seconds (chunk_times relative to `start`)."""

    start: float = 0.0                 # when it was sent, seconds after its round began
    latency: float = 0.0               # E2EL
    chunk_times: list[float] = field(default_factory=list)   # arrival of each chunk that carries output
    chunk_tokens: list[int] = field(default_factory=list)    # tokens in each of those chunks
    prompt_tokens: int = 0
    output_tokens: int = 0
    requested_output_tokens: int | None = None
    success: bool = False
    error: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


def ttft(r: RequestRecord) -> float:
    return r.chunk_times[0]


def tpot(r: RequestRecord) -> float | None:
    if r.output_tokens < 2:
        return None
    return (r.latency - ttft(r)) / (r.output_tokens - 1)


def itls(r: RequestRecord) -> list[float]:
    """Inter-token latencies: each chunk's gap spread evenly over its tokens (see the module doc)."""
    out: list[float] = []
    last = None
    for t, k in zip(r.chunk_times, r.chunk_tokens):
        if k <= 0:
            continue                    # text released without new tokens: no token arrived here
        if last is None:
            out += [0.0] * (k - 1)
        else:
            out += [(t - last) / k] * k
        last = t
    return out


def distribution(values_s: list[float]) -> dict[str, float]:
    """mean / median / p90 / p99 in milliseconds (numpy's linear interpolation, as vLLM); NaN if empty."""
    if not values_s:
        return {s: math.nan for s in STAT_NAMES}
    a = np.asarray(values_s, dtype=float) * 1000.0
    return {"mean": float(a.mean()), "median": float(np.median(a)),
            "p90": float(np.percentile(a, 90)), "p99": float(np.percentile(a, 99))}


def meets_slos(r: RequestRecord, slos_ms: dict[str, float]) -> bool:
    """A one-token request has no TPOT and so meets a TPOT SLO (as in vLLM)."""
    values = {"ttft": ttft(r), "tpot": tpot(r) or 0.0, "e2el": r.latency}
    return all(values[name] * 1000.0 <= limit for name, limit in slos_ms.items())


def latencies(records: list[RequestRecord]) -> dict[str, list[float]]:
    """Per-figure samples in seconds over the completed requests (ITL: every token of every request)."""
    done = [r for r in records if r.success]
    return {"ttft": [ttft(r) for r in done],
            "tpot": [v for v in (tpot(r) for r in done) if v is not None],
            "itl": [v for r in done for v in itls(r)],
            "e2el": [r.latency for r in done]}


def round_figures(records: list[RequestRecord], duration_s: float,
                  slos_ms: dict[str, float] | None = None) -> dict[str, float]:
    """Every figure of one round, flat: e.g. `output_throughput`, `ttft_p99_ms`."""
    done = [r for r in records if r.success]
    inp = sum(r.prompt_tokens for r in done)
    out = sum(r.output_tokens for r in done)
    dur = max(duration_s, 1e-9)
    f: dict[str, float] = {
        "completed": len(done), "failed": len(records) - len(done), "duration_s": duration_s,
        "total_input_tokens": inp, "total_output_tokens": out,
        "request_throughput": len(done) / dur, "output_throughput": out / dur,
        "total_token_throughput": (inp + out) / dur,
    }
    if slos_ms:
        f["request_goodput"] = sum(meets_slos(r, slos_ms) for r in done) / dur
    for name, values in latencies(records).items():
        for stat, v in distribution(values).items():
            f[f"{name}_{stat}_ms"] = v
    return f


def combine_rounds(rounds: list[dict[str, float]]) -> dict[str, dict]:
    """Per figure: the median over rounds and the min-max range (the noise the report shows)."""
    out = {}
    for name in rounds[0]:
        vals = [r[name] for r in rounds]
        finite = [v for v in vals if not math.isnan(v)]
        if finite:
            out[name] = {"median": float(np.median(finite)), "min": float(min(finite)),
                         "max": float(max(finite)), "rounds": vals}
        else:
            out[name] = {"median": math.nan, "min": math.nan, "max": math.nan, "rounds": vals}
    return out


def agree(a: dict, b: dict) -> bool:
    """Two reports of one figure agree within their noise when their [min, max] ranges overlap."""
    return a["min"] <= b["max"] and b["min"] <= a["max"]


def parse_goodput(items: list[str]) -> dict[str, float]:
    """`["ttft:200", "tpot:50"]` -> {"ttft": 200.0, "tpot": 50.0} (milliseconds)."""
    slos = {}
    for item in items:
        name, sep, value = item.partition(":")
        name = name.strip().lower()
        if not sep or name not in SLO_NAMES:
            raise ValueError(f"--goodput: expected NAME:MS with NAME in {', '.join(SLO_NAMES)}, got {item!r}")
        try:
            slos[name] = float(value)
        except ValueError:
            raise ValueError(f"--goodput: {item!r}: {value!r} is not a number of milliseconds") from None
        if not slos[name] > 0:
            raise ValueError(f"--goodput: {item!r}: the limit must be positive")
    return slos
