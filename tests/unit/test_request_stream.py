"""A request's stream coalesces what queued behind the output being sent, and nothing else: tokens in
order, the last state, never a wait, and a request that finished inside a coalesced message is not
aborted when its stream is closed."""
from __future__ import annotations

import asyncio

from router.outputs import RequestOutput
from router.request_stream import RequestStream, merge_outputs


def queued_stream(outputs: list[RequestOutput]):
    q: asyncio.Queue = asyncio.Queue()
    for out in outputs:
        q.put_nowait(out)
    cancels = []
    stream = RequestStream("r", q.get, lambda: cancels.append("r"), lambda: None if q.empty() else q.get_nowait())
    return stream, q, cancels


def out(tokens, finish=None, n_out=0):
    return RequestOutput("r", list(tokens), finish, 5, n_out)


def test_what_queued_behind_an_output_goes_with_it_in_order_with_the_last_state():
    async def scenario():
        stream, q, cancels = queued_stream([out([1], n_out=1), out([2, 3], n_out=3), out([4], "length", 4)])
        first = await stream.__anext__()
        merged = stream.coalesce(first)
        assert merged.new_token_ids == [1, 2, 3, 4] and merged.finish_reason == "length"
        assert merged.num_output_tokens == 4 and merged.num_prompt_tokens == 5
        assert stream.finished and q.empty()
        await stream.aclose()                      # ended normally: closing must not abort it
        assert cancels == []
        assert [o async for o in stream] == []
    asyncio.run(scenario())


def test_coalescing_never_waits_for_an_output_that_is_not_there_yet():
    async def scenario():
        stream, q, cancels = queued_stream([out([7], n_out=1)])
        merged = stream.coalesce(await stream.__anext__())
        assert merged.new_token_ids == [7] and not stream.finished
        q.put_nowait(out([8], "stop", 2))
        assert stream.coalesce(await stream.__anext__()).finish_reason == "stop"
        await stream.aclose()
        assert cancels == []
    asyncio.run(scenario())


def test_a_stream_closed_while_running_still_aborts_after_coalescing():
    async def scenario():
        stream, _, cancels = queued_stream([out([1], n_out=1), out([2], n_out=2)])
        assert stream.coalesce(await stream.__anext__()).new_token_ids == [1, 2]
        await stream.aclose()
        assert cancels == ["r"]
    asyncio.run(scenario())


def test_merge_keeps_the_error_of_the_later_output():
    failed = merge_outputs(out([1], n_out=1), RequestOutput("r", [], "error", 5, 1, error="engine failure"))
    assert failed.new_token_ids == [1] and failed.finish_reason == "error" and failed.error == "engine failure"
