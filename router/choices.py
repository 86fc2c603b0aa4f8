"""n > 1 at the front door: one engine request, n choices, each streamed and finished on its own.

The engine streams one request's updates for all its choices (RequestOutput.index; `finished` only
when the last choice ends). `ChoiceStreams` splits that stream into one RequestStream per choice, so
each choice runs through an ordinary Generation (its own text stream, stop strings, parsers); the HTTP
layer then puts the n answers back together (`merge_bodies`, `merge_chunks`): choices by `index`,
usage counting the prompt once and the completion tokens of every choice, as OpenAI and vLLM do.
"""
from __future__ import annotations

import asyncio
import dataclasses
from typing import AsyncIterator

from .outputs import RequestOutput
from .request_stream import RequestStream


class ChoiceStreams:
    """One engine RequestStream read by n choice streams: whichever choice is read pulls the next update
    and hands it to the choice it is about. A request that ends as a whole (an error, an abort before
    the fork) ends every choice that had not ended. Closing every choice stream closes the engine's
    (aborting what still runs); a choice closed alone (a stop string) is read no further."""

    def __init__(self, stream: RequestStream, n: int):
        self.stream, self.n = stream, n
        self.queues: list[asyncio.Queue] = [asyncio.Queue() for _ in range(n)]
        self.ended = [False] * n          # its finished update was handed to it
        self.closed = [False] * n         # its reader closed it
        self._lock = asyncio.Lock()

    def choice(self, index: int) -> RequestStream:
        return RequestStream(self.stream.request_id, lambda: self._next(index), lambda: self._close(index))

    async def _next(self, index: int) -> RequestOutput:
        q = self.queues[index]
        while q.empty():
            async with self._lock:
                if not q.empty():
                    break
                self._route(await self.stream.__anext__())      # StopAsyncIteration: the stream was lost
        return q.get_nowait()

    def _route(self, out: RequestOutput) -> None:
        if 0 <= out.index < self.n and not self.ended[out.index]:
            self._hand(out.index, out)
        if out.finished:                  # the request ended: so does every choice still open
            for i in range(self.n):
                if not self.ended[i]:
                    self._hand(i, dataclasses.replace(out, index=i, new_token_ids=[], logprobs=None,
                                                      prompt_logprobs=None))

    def _hand(self, index: int, out: RequestOutput) -> None:
        if out.finish_reason is not None:
            self.ended[index] = True
            out = dataclasses.replace(out, open_choices=0)       # finished, as its choice stream sees it
        self.queues[index].put_nowait(out)

    def _close(self, index: int) -> None:
        self.closed[index] = True
        if all(self.closed):
            self.stream.close_nowait()


def merge_bodies(bodies: list[dict]) -> dict:
    """n one-choice response bodies (choice i from bodies[i]) as one: choices by index, usage summed over
    the completions with the prompt counted once."""
    body = dict(bodies[0])
    body["choices"] = [dict(b["choices"][0], index=i) for i, b in enumerate(bodies)]
    body["usage"] = merge_usage([b["usage"] for b in bodies])
    return body


def merge_usage(usages: list[dict]) -> dict:
    u = dict(usages[0])
    u["completion_tokens"] = sum(x["completion_tokens"] for x in usages)
    u["total_tokens"] = u["prompt_tokens"] + u["completion_tokens"]
    details = [x["completion_tokens_details"] for x in usages if x.get("completion_tokens_details")]
    if details:
        u["completion_tokens_details"] = {k: sum(d.get(k, 0) for d in details) for k in details[0]}
    return u


async def merge_chunks(streams: list[AsyncIterator[dict]]) -> AsyncIterator[dict]:
    """The chunks of n one-choice streams as they come (each chunk of stream i is about choice i), then
    one usage-only chunk if the streams ended with one (usage summed). Chunks with an error end it all."""
    pending = {asyncio.ensure_future(anext(s, None)): i for i, s in enumerate(streams)}
    usages: list[dict] = []
    last_usage = None
    try:
        while pending:
            done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for fut in done:
                i = pending.pop(fut)
                body = fut.result()
                if body is None:
                    continue
                pending[asyncio.ensure_future(anext(streams[i], None))] = i
                if "error" in body:
                    yield body
                    return
                if body.get("choices"):
                    body["choices"][0]["index"] = i
                    yield body
                elif body.get("usage") is not None:           # the usage-only chunk: one, summed, at the end
                    usages.append(body["usage"])
                    last_usage = body
    finally:                              # a reader still in a stream ends there before the streams close
        for fut in pending:
            fut.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        for s in streams:
            await s.aclose()
    if last_usage is not None:
        yield dict(last_usage, usage=merge_usage(usages))


class Choices:
    """The n Generations of one request, closed together (the HTTP response holds this)."""

    def __init__(self, gens: list):
        self.gens = gens
        self.request_id = gens[0].request_id

    async def aclose(self) -> None:
        for g in self.gens:
            await g.aclose()
