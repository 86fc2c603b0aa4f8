"""A model replica's stream under load: tokens held until a message carries the wanted number, with the
first token, the last output and errors never held; nothing lost, nothing reordered."""
from __future__ import annotations

import asyncio

import pytest

from router.outputs import RequestOutput
from router.request_stream import RequestStream
from router.stream_pacing import AUTO_MAX_TOKENS, paced, tokens_per_message


def _stream(outputs: list[RequestOutput]) -> RequestStream:
    it = iter(outputs)

    async def nxt():
        await asyncio.sleep(0)
        return next(it)
    return RequestStream("r", nxt, cancel=lambda: None)


def _run(outputs, want):
    async def go():
        return [o async for o in paced(_stream(outputs), lambda: want)]
    return asyncio.run(go())


def _steps(tokens_per_step: list[int], finish="length") -> list[RequestOutput]:
    outs, t = [], 0
    for i, n in enumerate(tokens_per_step):
        last = i == len(tokens_per_step) - 1
        outs.append(RequestOutput("r", list(range(t, t + n)), finish if last else None, num_output_tokens=t + n))
        t += n
    return outs


def test_auto_interval_grows_with_the_running_sequences_and_stops_at_the_cap():
    assert [tokens_per_message(None, r) for r in (0, 1, 15, 16, 31, 32, 48, 64, 500)] == [1, 1, 1, 2, 2, 3, 4, 4, 4]
    assert tokens_per_message(None, 10_000) == AUTO_MAX_TOKENS
    assert tokens_per_message(1, 64) == 1 and tokens_per_message(3, 0) == 3


@pytest.mark.parametrize("want", [1, 2, 3, 4])
def test_messages_carry_the_wanted_tokens_first_and_last_at_once(want):
    outs = _run(_steps([1] * 11), want)
    assert [t for o in outs for t in o.new_token_ids] == list(range(11))          # all, in order
    assert outs[0].new_token_ids == [0]                                          # first token alone
    assert outs[-1].finish_reason == "length" and outs[-1].num_output_tokens == 11
    assert all(len(o.new_token_ids) == want for o in outs[1:-1])
    assert 1 <= len(outs[-1].new_token_ids) <= want
    assert len(outs) == 1 + -(-10 // want)


def test_multi_token_steps_are_not_held_when_they_already_carry_enough():
    outs = _run(_steps([1, 3, 2, 4, 1]), 2)
    assert [o.new_token_ids for o in outs] == [[0], [1, 2, 3], [4, 5], [6, 7, 8, 9], [10]]


def test_an_error_goes_at_once():
    outs = _steps([1, 1, 1])
    outs[1] = RequestOutput("r", [1], "error", error="boom")
    got = _run(outs[:2], 4)
    assert [o.new_token_ids for o in got] == [[0], [1]] and got[-1].error == "boom"


def test_output_before_the_first_token_does_not_count_as_it():
    first = RequestOutput("r", [], None, prompt_logprobs=[[0.0]])
    got = _run([first] + _steps([1, 1, 1]), 3)
    assert got[0].new_token_ids == [] and got[0].prompt_logprobs == [[0.0]]
    assert got[1].new_token_ids == [0]                                           # the first token still alone
    assert [t for o in got for t in o.new_token_ids] == [0, 1, 2]


def test_choices_are_never_merged_into_each_other():
    outs = [RequestOutput("r", [10], None, index=0, open_choices=2), RequestOutput("r", [20], None, index=1, open_choices=2),
            RequestOutput("r", [11], None, index=0, open_choices=2), RequestOutput("r", [12], "length", index=0, open_choices=1),
            RequestOutput("r", [21], "length", index=1, open_choices=0)]
    got = _run(outs, 4)
    by = {}
    for o in got:
        by.setdefault(o.index, []).extend(o.new_token_ids)
    assert by == {0: [10, 11, 12], 1: [20, 21]}
    assert got[-1].finished
