"""One round of load: every prompt sent at its arrival time, at most `concurrency` in flight.

As in vLLM's `bench serve`, a request is dispatched at its arrival offset and then waits for a free
slot (the semaphore), and its clock (TTFT, E2EL) starts when it is actually sent. Connections are not
pooled-limited (aiohttp's default 100 would queue requests out of sight of the clock).
"""
from __future__ import annotations

import asyncio
import contextlib
import time

from .metrics import RequestRecord
from .prompts import Prompt
from .stream import Target, send


def client_session(timeout_s: float):
    import aiohttp

    return aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout_s),
                                 connector=aiohttp.TCPConnector(limit=0), trust_env=False)


async def run_round(session, target: Target, prompts: list[Prompt], offsets: list[float],
                    concurrency: int | None, progress=None) -> tuple[list[RequestRecord], float]:
    """Send the round; returns the records (in prompt order) and the round's duration in seconds."""
    slots = asyncio.Semaphore(concurrency) if concurrency else None
    t0 = time.perf_counter()

    async def one(prompt: Prompt, offset: float) -> RequestRecord:
        delay = t0 + offset - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        async with slots if slots else contextlib.nullcontext():
            rec = await send(session, target, prompt, t0)
        if progress is not None:
            progress.update(1)
        return rec

    records = await asyncio.gather(*(one(p, o) for p, o in zip(prompts, offsets)))
    return list(records), time.perf_counter() - t0
