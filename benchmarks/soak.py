"""Soak: the chaos mix of benchmarks/chaos.py against `hybridserve serve` for a long time, with one stage
actor killed part-way, and the server's memory sampled throughout.

    python -m benchmarks.soak --minutes 15          # the recorded run (docs/BENCHMARKS.md)
    python -m benchmarks.soak --minutes 2 --no-write

It answers: does every request end (completed, refused with 429/4xx, or cut by its client), does any
fail that should not, is every KV block and Mamba slot free at the end, is greedy text under load the
text each request gets alone, and does the process tree's memory level off or keep growing.
"""
from __future__ import annotations

import argparse
import os
import signal
import statistics
import threading
import time

from .chaos import Mix, references
from .common import machine, publish, table
from .served import ServedCluster

SETUP = ("-pp", "2", "-ep", "2", "--num-speculative-tokens", "2", "--num-gpu-blocks-override", "40",
         "--max-num-seqs", "8", "--max-queued-requests", "16")
LENGTHS = [16, 48, 96]


def sample_memory(served: ServedCluster, stop: threading.Event, every_s: float, out: list) -> None:
    t0 = time.time()
    while not stop.wait(every_s):
        out.append((time.time() - t0, served.tree_rss_bytes() / 2**20))


def slope_mib_per_min(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of memory over time."""
    if len(points) < 3:
        return float("nan")
    xs, ys = [p[0] / 60 for p in points], [p[1] for p in points]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    den = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / den if den else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=15.0)
    ap.add_argument("--workers", type=int, default=6)
    ap.add_argument("--no-kill", action="store_true", help="do not kill a stage actor half-way")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-write", action="store_true", help="print only; do not update docs/BENCHMARKS.md")
    args = ap.parse_args()

    with ServedCluster(*SETUP) as served:
        print(f"serving on {served.url}; greedy references (each request alone)...", flush=True)
        refs = references(served.url, LENGTHS)
        mem: list[tuple[float, float]] = []
        stop = threading.Event()
        threading.Thread(target=sample_memory, args=(served, stop, 5.0, mem), daemon=True).start()
        mix = Mix(served.url, served.grpc_port, refs, seed=args.seed)
        rss_start = served.rss_by_process()
        seconds = args.minutes * 60
        killed = []
        if not args.no_kill:
            def kill_later():
                time.sleep(seconds / 2)
                pids = served.actor_pids("StageActor")
                if pids:
                    os.kill(pids[-1], signal.SIGKILL)
                    killed.append(time.time())
                    print(f"killed stage actor pid {pids[-1]} at {seconds / 2:.0f}s", flush=True)
            threading.Thread(target=kill_later, daemon=True).start()
        t0 = time.time()
        tally = mix.run(seconds, workers=args.workers)
        wall = time.time() - t0
        leak_wait = served.wait_until(served.idle, 30, "an idle engine after the soak")
        m = served.metrics()
        rss_end = served.rss_by_process()
        stop.set()

    s = tally.summary()
    first = statistics.fmean(v for t, v in mem[:6]) if mem else float("nan")
    half = [v for t, v in mem if t >= seconds / 2]
    last = statistics.fmean(v for t, v in mem[-6:]) if mem else float("nan")
    rows = [[k, v] for k, v in [
        ("duration (s)", round(wall)), ("requests sent", s["sent"]), ("completed", s["completed"]),
        ("cut by their client (drop, gRPC cancel)", s["aborted_by_client"]), ("rejected 429", s["rejected_429"]),
        ("rejected 4xx (poison)", s["rejected_4xx"]), ("failed", s["failed"]),
        ("failed more than 30 s after the kill (or with no kill)",
         sum(1 for t in tally.failure_times if not killed or t - killed[0] > 30)),
        ("greedy text != alone", s["greedy_mismatches"]),
        ("engine: aborted / failed requests", f"{m.get('engine_requests_aborted_total', 0):.0f} / "
                                               f"{m.get('engine_requests_failed_total', 0):.0f}"),
        ("KV blocks / Mamba slots held at the end", f"{m['kv_cache_blocks_used']:.0f} / {m['mamba_slots_used']:.0f}"),
        ("seconds until idle after the mix", round(leak_wait, 1)),
        ("process tree RSS, first 30 s (MiB)", round(first)), ("process tree RSS, last 30 s (MiB)", round(last)),
        ("RSS slope, whole run (MiB/min)", round(slope_mib_per_min(mem), 2)),
        ("RSS slope, second half (MiB/min)", round(slope_mib_per_min([p for p in mem if p[0] >= seconds / 2]), 2)
         if len(half) >= 3 else "-"),
    ]]
    growth = sorted(((rss_end.get(k, 0) - rss_start.get(k, 0), k) for k in set(rss_start) | set(rss_end)),
                    reverse=True)
    by_process = table(["process (all of that kind)", "RSS at the start of the mix (MiB)", "at the end", "growth"],
                       [[k, round(rss_start.get(k, 0)), round(rss_end.get(k, 0)), round(g)] for g, k in growth[:6]])
    kinds = ", ".join(f"{k} {v}" for k, v in sorted(s["by_kind"].items()))
    flags = f"--minutes {args.minutes:g}" + (" --no-kill" if args.no_kill else "")
    body = (f"## Soak{'' if killed else ', no actor killed'} (`python -m benchmarks.soak {flags}`)\n\n"
            f"Machine: {machine()}. `hybridserve serve {' '.join(SETUP)}`, default model, {args.workers} client "
            f"threads of mixed traffic (benchmarks/chaos.py: {kinds})"
            + (", one stage actor SIGKILLed half-way" if killed else "") + ".\n\n"
            + table(["measure", "value"], rows)
            + "\n\nWhere the memory is, by kind of process (the six that grew most):\n\n" + by_process
            + ("\n\nFailed requests are expected only around the kill (those in flight on the killed actor, and "
               "those that met the replica while it rebuilt); the first: " + "; ".join(tally.failures[:3])
               if tally.failures else ""))
    publish("soak" if not args.no_kill else "soak-no-kill", body, write=not args.no_write)


if __name__ == "__main__":
    main()
