"""How many tokens a model replica's stream carries per message.

Every message from the model replica to the ingress costs both processes CPU (Ray's streaming
generator, pickling, the ingress's SSE write) whatever it carries: at 32 streams that was ~0.5 ms of
CPU per token next to the model's ~0.7 (docs/BENCHMARKS.md, serve-profile). When many requests run,
each stream therefore holds its tokens until a message carries `tokens_per_message` of them, as vLLM's
and SGLang's `--stream-interval` do; the request's first token, its last, and any error go at once,
so TTFT and the end of a request are not delayed, and the client's per-token rate (TPOT) is what the
engine produces. `--stream-interval N` fixes N (1: a message per step).

Few streams decoding fast need the same for another reason: one sequence on a CPU makes a token every
~1 ms, while a message costs the replica, the ingress and the client ~1.4 ms of CPU together
(docs/BENCHMARKS.md, serve-profile), so the serving path fell behind and took the model's core. In auto
mode a stream therefore sends at most one message per AUTO_MIN_INTERVAL_S (2 ms: far below what a
reader can see): a message due sooner waits for the rest of that interval, and what the engine made
meanwhile rides along. At 32 streams a token comes every ~14 ms per stream, so nothing waits there.
"""
from __future__ import annotations

import asyncio
from typing import AsyncIterator, Callable

from .request_stream import RequestStream, merge_outputs
from .outputs import RequestOutput

AUTO_SEQS_PER_TOKEN = 16      # auto: one more token per message for every 16 running sequences...
AUTO_MAX_TOKENS = 4           # ...up to 4
AUTO_MIN_INTERVAL_S = 0.002   # auto: at most one message per stream per 2 ms (first and last at once)


def tokens_per_message(setting: int | None, running: int) -> int:
    """The tokens a message should carry: the fixed setting, or (None, auto) by how many run."""
    if setting is not None:
        return setting
    return min(AUTO_MAX_TOKENS, 1 + running // AUTO_SEQS_PER_TOKEN)


def min_interval_s(setting: int | None) -> float:
    """Seconds between two messages of a stream: AUTO_MIN_INTERVAL_S in auto mode, none for a fixed N."""
    return AUTO_MIN_INTERVAL_S if setting is None else 0.0


async def paced(stream: RequestStream, want: Callable[[], int], min_interval: float = 0.0
                ) -> AsyncIterator[RequestOutput]:
    """The stream's outputs (each already coalesced with what queued behind it), merged further until
    a message holds want() new tokens, and no sooner than `min_interval` seconds after the last message
    (waiting for the rest of it, then taking along what queued meanwhile). Output without tokens before
    the first token (admission-side info such as prompt logprobs) and the first token go at once, as
    does a finished output or an error; another choice's output (n > 1) first sends what is held."""
    held: RequestOutput | None = None
    sent_tokens = False
    loop, last_sent = asyncio.get_running_loop(), 0.0
    async for out in stream:
        out = stream.coalesce(out)
        if held is not None and out.index != held.index:
            yield held
            held, last_sent = None, loop.time()
        held = out if held is None else merge_outputs(held, out)
        if (not sent_tokens or held.finish_reason is not None or held.error is not None
                or len(held.new_token_ids) >= want()):
            wait = last_sent + min_interval - loop.time() if sent_tokens and min_interval > 0 else 0.0
            if wait > 0 and held.finish_reason is None and held.error is None:
                await asyncio.sleep(wait)
                held = stream.coalesce(held)
            sent_tokens = sent_tokens or bool(held.new_token_ids)
            yield held
            held, last_sent = None, loop.time()
    if held is not None:
        yield held
