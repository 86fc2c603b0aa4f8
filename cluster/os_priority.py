"""The model's processes ask the OS to run first.

On a machine the serving path shares with the model (the ingress, the model replica's engine loop, Ray's
own processes, often the load generator), every millisecond the model process waits for a core is a
millisecond of every sequence's pass. On the 2-core CI machine at 32 streams (`hybridserve bench`
against `hybridserve serve --model-niceness -10` and `0`, side by side) the higher priority served more
tokens/s; docs/BENCHMARKS.md ("Where a served request's time goes") records the served runs. llama.cpp's
server offers the same knob (`--prio`). Raising priority needs root or CAP_SYS_NICE; without them the
process keeps its priority and says so once in the log.
"""
from __future__ import annotations

import logging
import os

log = logging.getLogger("hybridserve.worker")

NICE_MIN, NICE_MAX = -20, 19


def set_niceness(niceness: int) -> int:
    """Ask for nice value `niceness` (lower runs first) for this process; returns the value in force
    afterwards (unchanged where the OS refuses)."""
    if not NICE_MIN <= niceness <= NICE_MAX:
        raise ValueError(f"model_niceness: must be in [{NICE_MIN}, {NICE_MAX}], got {niceness}")
    now = os.getpriority(os.PRIO_PROCESS, 0)
    if niceness == now:
        return now
    try:
        os.setpriority(os.PRIO_PROCESS, 0, niceness)
    except PermissionError:
        log.info("model process: nice %d not permitted here (needs root or CAP_SYS_NICE); staying at %d",
                 niceness, now)
        return now
    return os.getpriority(os.PRIO_PROCESS, 0)
