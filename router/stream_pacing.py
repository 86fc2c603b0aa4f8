"""How many tokens a model replica's stream carries per message.

Every message from the model replica to the ingress costs both processes CPU (Ray's streaming
generator, pickling, the ingress's SSE write) whatever it carries: at 32 streams that was ~0.5 ms of
CPU per token next to the model's ~0.7 (docs/BENCHMARKS.md, serve-profile). When many requests run,
each stream therefore holds its tokens until a message carries `tokens_per_message` of them, as vLLM's
and SGLang's `--stream-interval` do; the request's first token, its last, and any error go at once,
so TTFT and the end of a request are not delayed, and the client's per-token rate (TPOT) is what the
engine produces. `--stream-interval N` fixes N (1: a message per step).
"""
from __future__ import annotations

from typing import AsyncIterator, Callable

from .request_stream import RequestStream, merge_outputs
from .outputs import RequestOutput

AUTO_SEQS_PER_TOKEN = 16      # auto: one more token per message for every 16 running sequences...
AUTO_MAX_TOKENS = 4           # ...up to 4


def tokens_per_message(setting: int | None, running: int) -> int:
    """The tokens a message should carry: the fixed setting, or (None, auto) by how many run."""
    if setting is not None:
        return setting
    return min(AUTO_MAX_TOKENS, 1 + running // AUTO_SEQS_PER_TOKEN)


async def paced(stream: RequestStream, want: Callable[[], int]) -> AsyncIterator[RequestOutput]:
    """The stream's outputs (each already coalesced with what queued behind it), merged further until
    a message holds want() new tokens. Output without tokens before the first token (admission-side
    info such as prompt logprobs) and the first token go at once, as does a finished output; another
    choice's output (n > 1) first sends what is held."""
    held: RequestOutput | None = None
    sent_tokens = False
    async for out in stream:
        out = stream.coalesce(out)
        if held is not None and out.index != held.index:
            yield held
            held = None
        held = out if held is None else merge_outputs(held, out)
        if (not sent_tokens or held.finish_reason is not None or held.error is not None
                or len(held.new_token_ids) >= want()):
            sent_tokens = sent_tokens or bool(held.new_token_ids)
            yield held
            held = None
    if held is not None:
        yield held
