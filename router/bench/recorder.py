"""Turn one streamed response (SSE events with arrival times) into a RequestRecord.

Tokens per chunk come from the usage that servers add to every chunk when asked for
`stream_options.continuous_usage_stats` (hybridserve and vLLM do): a chunk carries the growth of
`completion_tokens`, so MTP's multi-token chunks, and chunks that wait for a whole UTF-8 character, are
counted right. A server that sends usage only at the end gets one token per chunk with text (the
total still comes from that final usage). Kept apart from the HTTP code so that a recorded stream with
known timings can be replayed in tests.
"""
from __future__ import annotations

import json

from .metrics import RequestRecord


def parse_sse_block(block: str):
    """One SSE event -> its JSON object, "[DONE]", or None (comments, other fields)."""
    data = [line[5:].lstrip() for line in block.splitlines() if line.startswith("data:")]
    if not data:
        return None
    payload = "\n".join(data)
    if payload == "[DONE]":
        return "[DONE]"
    return json.loads(payload)


def chunk_text(choice: dict) -> str:
    """Completions carry `text`, chat carries `delta.content`."""
    if "delta" in choice:
        return (choice.get("delta") or {}).get("content") or ""
    return choice.get("text") or ""


class StreamRecorder:
    def __init__(self, start: float, requested_output_tokens: int | None = None, prompt_tokens: int | None = None):
        self.record = RequestRecord(start=start, requested_output_tokens=requested_output_tokens,
                                    prompt_tokens=prompt_tokens or 0)
        self.per_chunk_usage = False
        self.counted = 0                 # completion_tokens seen so far
        self.final_usage: dict | None = None
        self.done = False

    def feed(self, t: float, event) -> None:
        """One event that arrived `t` seconds after the request was sent."""
        r = self.record
        if event == "[DONE]":
            self.done = True
            return
        if not isinstance(event, dict):
            return
        if "error" in event:
            err = event["error"]
            r.error = err.get("message", str(err)) if isinstance(err, dict) else str(err)
            return
        usage = event.get("usage") or None
        choices = event.get("choices") or []
        if usage:
            self.final_usage = usage
        if not choices:
            return
        text = chunk_text(choices[0])
        if usage and "completion_tokens" in usage:
            self.per_chunk_usage = True
            k = int(usage["completion_tokens"]) - self.counted
            self.counted = int(usage["completion_tokens"])
        else:
            k = 1 if text else 0
        if text or k > 0:
            r.chunk_times.append(t)
            r.chunk_tokens.append(k)

    def finish(self, t: float, error: str = "") -> RequestRecord:
        """The stream ended `t` seconds after sending; `error` if the transport failed.

        E2EL ends at the last chunk that carried output (as vLLM's, whose latency ends at the last chunk
        with choices), not at the usage chunk or [DONE] after it, so E2EL - TTFT is the decode time.
        """
        r = self.record
        r.latency = r.chunk_times[-1] if r.chunk_times else t
        r.error = error or r.error
        u = self.final_usage or {}
        if "completion_tokens" in u:
            r.output_tokens = int(u["completion_tokens"])
        else:
            r.output_tokens = sum(r.chunk_tokens)
        if "prompt_tokens" in u:
            r.prompt_tokens = int(u["prompt_tokens"])
        if not r.error and not r.chunk_times:
            r.error = "the stream carried no output"
        r.success = not r.error
        return r
