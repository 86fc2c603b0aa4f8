"""The one stream of a request's outputs, and the one way to end a request early.

Every layer that hands a request's `RequestOutput`s on (the engine to the replica, the replica to the
ingress over a Ray Serve handle) hands on a `RequestStream`. Whoever stops reading before the finished
output (HTTP disconnect, stop string, gRPC cancel or deadline, shutdown, a replica's caller gone)
closes it, and closing is the cancellation:

    engine.add_request ──RequestStream(cancel=engine.abort)──▶ ModelServer.generate (async with)
        ──Serve handle──▶ RequestStream(cancel=handle_gen.cancel) ──▶ Generation ──▶ HTTP / gRPC

Closing the ingress-side stream cancels the replica call; Serve cancels the replica's generator, whose
`async with` closes the engine-side stream, whose cancel aborts the request in the engine (blocks and
slot freed now, or when the pass in flight returns). `cancel` runs at most once, and never after the
finished output, so a request that ended normally is never aborted.
"""
from __future__ import annotations

import logging
from typing import Awaitable, Callable

from .outputs import RequestOutput

log = logging.getLogger("hybridserve.engine")


class RequestStream:
    """An async iterator of `RequestOutput`s ending with the finished one; `aclose()` ends it early.

    A class rather than an async generator on purpose: a generator that was never started ignores
    `aclose()`, so a client that vanished before its first byte would leave the request running.
    """

    def __init__(self, request_id: str, next_output: Callable[[], Awaitable[RequestOutput]],
                 cancel: Callable[[], None], next_ready: Callable[[], RequestOutput | None] | None = None):
        self.request_id = request_id
        self._next, self._cancel, self._ready = next_output, cancel, next_ready
        self.finished = False          # the finished output was read, or the stream was closed
        self._held: RequestOutput | None = None   # read by coalesce() but about another choice (n > 1)

    def __aiter__(self) -> "RequestStream":
        return self

    async def __anext__(self) -> RequestOutput:
        if self.finished:
            raise StopAsyncIteration
        if self._held is not None:
            out, self._held = self._held, None
            self.finished = out.finished
            return out
        try:
            out = await self._next()
        except StopAsyncIteration:      # the source ended without a finished output: treat as lost
            await self.aclose()
            raise
        self.finished = out.finished
        return out

    def coalesce(self, out: RequestOutput) -> RequestOutput:
        """`out` merged with the outputs already queued behind it (none are waited for): one message
        instead of several when the reader fell a step or more behind, as a busy replica does. Nothing is
        read while another choice's output waits to go next (it would be overwritten)."""
        while self._ready is not None and self._held is None and out.finish_reason is None:
            more = self._ready()
            if more is None:
                break
            if more.index != out.index:    # n > 1: another choice's update goes as the next message
                self._held = more
                break
            out = merge_outputs(out, more)
        self.finished = out.finished
        return out

    async def aclose(self) -> None:
        """End the request if it is still running; safe to call any number of times."""
        self.close_nowait()

    def close_nowait(self) -> None:
        """aclose(), callable where nothing can be awaited (router/choices.py)."""
        if self.finished:
            return
        self.finished = True
        try:
            self._cancel()
        except Exception:  # noqa: BLE001 - a failed cancel must not mask why the stream was closed
            log.warning("cancelling request %s failed", self.request_id, exc_info=True)

    async def __aenter__(self) -> "RequestStream":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()


def merge_outputs(first: RequestOutput, then: RequestOutput) -> RequestOutput:
    """Two consecutive updates of one request as one: the tokens of both, the later state."""
    logprobs = None if first.logprobs is None else first.logprobs + (then.logprobs or [])
    return RequestOutput(first.request_id, first.new_token_ids + then.new_token_ids, then.finish_reason,
                         then.num_prompt_tokens, then.num_output_tokens, then.error, then.num_verified_drafts,
                         then.num_accepted_drafts, then.num_verify_steps, logprobs,
                         first.prompt_logprobs if first.prompt_logprobs is not None else then.prompt_logprobs,
                         index=then.index, open_choices=then.open_choices)
