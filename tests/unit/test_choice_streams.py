"""n > 1 at the front door (router/choices.py): one engine stream split per choice, the answers merged back."""
from __future__ import annotations

import asyncio

from router.choices import ChoiceStreams, merge_bodies, merge_chunks
from router.outputs import RequestOutput
from router.request_stream import RequestStream


def engine_stream(outs: list[RequestOutput]):
    """A RequestStream over queued outputs, and the list its cancel() appends to."""
    q: asyncio.Queue = asyncio.Queue()
    for o in outs:
        q.put_nowait(o)
    cancelled: list[bool] = []
    return RequestStream("r", q.get, lambda: cancelled.append(True), lambda: None if q.empty() else q.get_nowait()), \
        cancelled


def out(index, tokens, reason=None, open_choices=0, **kw):
    return RequestOutput("r", tokens, reason, 4, len(tokens), index=index, open_choices=open_choices, **kw)


async def read_all(stream):
    return [o async for o in stream]


def test_each_choice_reads_its_own_updates_and_ends_with_its_own_reason():
    async def main():
        src, cancelled = engine_stream([out(1, [5]), out(0, [7]), out(0, [8], "stop", 1), out(1, [6], "length", 0)])
        split = ChoiceStreams(src, 2)
        a, b = await asyncio.gather(read_all(split.choice(0)), read_all(split.choice(1)))
        return a, b, cancelled
    a, b, cancelled = asyncio.run(main())
    assert [o.new_token_ids for o in a] == [[7], [8]] and a[-1].finish_reason == "stop" and a[-1].finished
    assert [o.new_token_ids for o in b] == [[5], [6]] and b[-1].finish_reason == "length" and b[-1].finished
    assert not cancelled                                  # both ended normally: nothing to abort


def test_a_request_that_ends_as_a_whole_ends_every_choice():
    async def main():
        src, _ = engine_stream([out(0, [], "error", 0, error="boom")])      # its parent failed before the fork
        split = ChoiceStreams(src, 3)
        return await asyncio.gather(*(read_all(split.choice(i)) for i in range(3)))
    ends = asyncio.run(main())
    assert [(o[-1].index, o[-1].finish_reason, o[-1].error) for o in ends] == [(i, "error", "boom") for i in range(3)]


def test_the_engine_request_is_aborted_only_when_every_choice_is_closed():
    async def main():
        src, cancelled = engine_stream([out(0, [7], None, 2), out(1, [7], None, 2)])
        split = ChoiceStreams(src, 2)
        first, second = split.choice(0), split.choice(1)
        await first.__anext__()
        await first.aclose()                              # a stop string ended choice 0
        closed_one = list(cancelled)
        await second.aclose()                             # the client went away
        return closed_one, cancelled
    closed_one, cancelled = asyncio.run(main())
    assert closed_one == [] and cancelled == [True]


def test_coalescing_never_merges_two_choices_updates():
    async def main():
        src, _ = engine_stream([out(0, [1], None, 2), out(0, [2], None, 2), out(1, [3], None, 2),
                                out(1, [4], "stop", 1), out(0, [5], "length", 0)])
        return [src.coalesce(o) async for o in src]
    got = asyncio.run(main())
    assert [(o.index, o.new_token_ids, o.finish_reason) for o in got] == \
        [(0, [1, 2], None), (1, [3, 4], "stop"), (0, [5], "length")]
    assert got[-1].finished and not got[1].finished


def test_bodies_merge_with_choices_by_index_and_the_prompt_counted_once():
    def body(text, completion, accepted):
        return {"id": "x", "choices": [{"index": 0, "text": text}],
                "usage": {"prompt_tokens": 9, "completion_tokens": completion, "total_tokens": 9 + completion,
                          "completion_tokens_details": {"accepted_prediction_tokens": accepted,
                                                        "rejected_prediction_tokens": 1}}}
    merged = merge_bodies([body("a", 3, 1), body("b", 4, 2)])
    assert merged["choices"] == [{"index": 0, "text": "a"}, {"index": 1, "text": "b"}]
    assert merged["usage"] == {"prompt_tokens": 9, "completion_tokens": 7, "total_tokens": 16,
                               "completion_tokens_details": {"accepted_prediction_tokens": 3,
                                                             "rejected_prediction_tokens": 2}}


def test_streamed_chunks_carry_their_choice_and_one_summed_usage_chunk_ends_them():
    async def choice(text, completion):
        yield {"choices": [{"index": 0, "text": text}], "usage": None}
        yield {"choices": [], "usage": {"prompt_tokens": 9, "completion_tokens": completion,
                                        "total_tokens": 9 + completion}}

    async def main():
        return [c async for c in merge_chunks([choice("a", 3), choice("b", 4)])]
    chunks = asyncio.run(main())
    assert sorted((c["choices"][0]["index"], c["choices"][0]["text"]) for c in chunks[:-1]) == [(0, "a"), (1, "b")]
    assert chunks[-1] == {"choices": [], "usage": {"prompt_tokens": 9, "completion_tokens": 7, "total_tokens": 16}}


def test_an_error_chunk_ends_the_merged_stream_and_closes_every_choice():
    closed = []

    async def failing():
        for _ in range(3):                  # the other choice is waiting by then
            await asyncio.sleep(0)
        yield {"error": {"message": "generation failed"}}

    async def endless():                  # a choice still waiting for its engine update when the error comes
        try:
            yield {"choices": [{"index": 0, "text": "x"}]}
            await asyncio.Event().wait()
        finally:
            closed.append(True)

    async def main():
        return [c async for c in merge_chunks([endless(), failing()])]
    chunks = asyncio.run(main())
    assert chunks[-1] == {"error": {"message": "generation failed"}} and closed == [True]
