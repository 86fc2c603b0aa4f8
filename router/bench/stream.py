"""Send one streaming request to an OpenAI-compatible endpoint and time its chunks (aiohttp).

The request asks for what vLLM's `bench serve` asks for: greedy sampling by default, `max_tokens` = the
prompt's output length, `ignore_eos` (so every request produces exactly that many tokens), and usage in
every chunk. Times are taken as the bytes arrive, with one clock (time.perf_counter).
"""
from __future__ import annotations

import codecs
import time
from dataclasses import dataclass

from .metrics import RequestRecord
from .prompts import Prompt
from .recorder import StreamRecorder, parse_sse_block

PATHS = {"completions": "/v1/completions", "chat": "/v1/chat/completions"}


@dataclass(frozen=True)
class Target:
    base_url: str                 # http://host:port (a trailing /v1 is dropped)
    model: str
    endpoint: str = "completions"  # or "chat"
    api_key: str | None = None
    temperature: float = 0.0
    ignore_eos: bool = True
    continuous_usage: bool = True

    @property
    def root(self) -> str:
        url = self.base_url.rstrip("/")
        return url[:-3] if url.endswith("/v1") else url

    @property
    def url(self) -> str:
        return self.root + PATHS[self.endpoint]

    def headers(self) -> dict[str, str]:
        h = {"Content-Type": "application/json"}
        if self.api_key:
            h["Authorization"] = f"Bearer {self.api_key}"
        return h


def normalize_endpoint(value: str) -> str:
    """`completions`, `chat`, or vLLM-style paths `/v1/completions`, `/v1/chat/completions`."""
    for name, path in PATHS.items():
        if value in (name, path, path.lstrip("/")):
            return name
    raise ValueError(f"--endpoint: expected completions, chat or one of {', '.join(PATHS.values())}; got {value!r}")


def payload(target: Target, prompt: Prompt) -> dict:
    body = {"model": target.model, "stream": True, "max_tokens": prompt.output_len,
            "temperature": target.temperature,
            "stream_options": {"include_usage": True, "continuous_usage_stats": target.continuous_usage}}
    if not target.continuous_usage:
        body["stream_options"] = {"include_usage": True}
    if target.ignore_eos:
        body["ignore_eos"] = True
    if target.endpoint == "chat":
        body["messages"] = [{"role": "user", "content": prompt.text}]
    else:
        body["prompt"] = prompt.text
    return body


async def send(session, target: Target, prompt: Prompt, round_start: float) -> RequestRecord:
    """Stream one request; failures (HTTP errors, in-band errors, dropped connections) are recorded."""
    t0 = time.perf_counter()
    rec = StreamRecorder(t0 - round_start, prompt.output_len, prompt.prompt_len)
    try:
        async with session.post(target.url, json=payload(target, prompt), headers=target.headers()) as resp:
            if resp.status != 200:
                body = (await resp.text())[:300]
                return rec.finish(time.perf_counter() - t0, f"HTTP {resp.status}: {body}")
            buf, utf8 = "", codecs.getincrementaldecoder("utf-8")(errors="replace")
            async for data in resp.content.iter_any():
                now = time.perf_counter() - t0
                buf += utf8.decode(data).replace("\r\n", "\n")
                while "\n\n" in buf:
                    block, buf = buf.split("\n\n", 1)
                    event = parse_sse_block(block)
                    if event is not None:
                        rec.feed(now, event)
            if buf.strip():
                event = parse_sse_block(buf)
                if event is not None:
                    rec.feed(time.perf_counter() - t0, event)
            error = "" if rec.done else "the stream ended without [DONE]"
            return rec.finish(time.perf_counter() - t0, error)
    except Exception as e:  # noqa: BLE001 - a benchmark records failures and goes on
        return rec.finish(time.perf_counter() - t0, f"{type(e).__name__}: {e}")
