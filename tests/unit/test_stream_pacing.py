"""A model replica's stream under load: tokens held until a message carries the wanted number, with the
first token, the last output and errors never held; nothing lost, nothing reordered."""
from __future__ import annotations

import asyncio

import pytest

from router.outputs import RequestOutput
from router.request_stream import RequestStream
from router.stream_pacing import AUTO_MAX_TOKENS, AUTO_MIN_INTERVAL_S, min_interval_s, paced, tokens_per_message


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


# ---- at most one message per interval (auto mode) --------------------------------------------------------
def _live_stream(outputs: list[RequestOutput], gap_s: float) -> RequestStream:
    """An engine-like stream: outputs made one per `gap_s` into a queue, readable as they are made, and
    what queued is taken by coalesce (the engine's RequestStream has next_ready)."""
    q: asyncio.Queue = asyncio.Queue()

    async def produce():
        for o in outputs:
            await asyncio.sleep(gap_s)
            q.put_nowait(o)

    task = asyncio.get_running_loop().create_task(produce())

    def ready():
        return None if q.empty() else q.get_nowait()
    return RequestStream("r", q.get, cancel=task.cancel, next_ready=ready)


def _run_live(outputs, gap_s, min_interval):
    async def go():
        loop = asyncio.get_running_loop()
        return [(o, loop.time()) async for o in paced(_live_stream(outputs, gap_s), lambda: 1, min_interval)]
    return asyncio.run(go())


def test_auto_mode_sends_at_most_one_message_per_interval_and_takes_along_what_came_meanwhile():
    assert min_interval_s(None) == AUTO_MIN_INTERVAL_S > 0 and min_interval_s(1) == 0.0 == min_interval_s(4)
    sent = _run_live(_steps([1] * 40), gap_s=0.0, min_interval=0.05)   # tokens far faster than the interval
    outs = [o for o, _ in sent]
    assert [t for o in outs for t in o.new_token_ids] == list(range(40))          # all, in order
    assert outs[0].new_token_ids == [0] and outs[-1].finish_reason == "length"
    assert len(outs) <= 4                       # the first token, then what came during each wait, the last
    times = [t for _, t in sent]
    assert all(b - a >= 0.05 - 1e-3 for a, b in zip(times[1:-1], times[2:-1]))   # none sooner than the interval


def test_a_stream_slower_than_the_interval_is_not_held_and_a_fixed_setting_is_never_held():
    outs = [o for o, _ in _run_live(_steps([1] * 8), gap_s=0.02, min_interval=0.005)]
    assert [o.new_token_ids for o in outs] == [[i] for i in range(8)]              # a message per token
    outs = [o for o, _ in _run_live(_steps([1] * 30), gap_s=0.0, min_interval=0.0)]
    assert [t for o in outs for t in o.new_token_ids] == list(range(30))
    assert len(outs) > 4                        # no interval: only what queued at each read is merged


def test_interleaved_choices_lose_nothing_when_messages_wait_for_the_interval():
    """n > 1: outputs of three choices interleaved, faster than the interval: every choice gets all its tokens,
    in order (a second read behind a held choice must not overwrite it)."""
    outs = []
    for t in range(10):
        for i in range(3):
            last = t == 9
            outs.append(RequestOutput("r", [100 * i + t], "length" if last else None, num_output_tokens=t + 1,
                                      index=i, open_choices=2 - i if last else 3))
    got: dict[int, list[int]] = {}
    for o, _ in _run_live(outs, gap_s=0.0, min_interval=0.02):
        got.setdefault(o.index, []).extend(o.new_token_ids)
    assert got == {i: [100 * i + t for t in range(10)] for i in range(3)}
