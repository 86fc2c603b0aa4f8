"""Look-ahead (`async_scheduling`, router/scheduler.py) in a real engine: a decode step is planned while
the pass before it is in flight, its input the token that pass samples (filled in by the worker).

What it must never change: the tokens (greedy and seeded random, MTP off and adaptive, in this process
and in the child process `hybridserve serve` uses). What it must not leak: a request that stops, or is
aborted, while its look-ahead step is out ends with exactly the tokens it would have had, that step's
token is dropped, and its blocks and slot are freed; shown by the engine's own counters.
The scheduler's invariants under look-ahead (random workloads, failures, preemption, n > 1) are
tests/unit/test_scheduler_properties.py's.
"""
from __future__ import annotations

import asyncio

import pytest

from model_shards.sampling_params import SamplingParams
from router.engine import AsyncEngine
from router.engine_config import EngineConfig
from tests.engine_helpers import collect

PROMPTS = {f"r{i}": [5 + i, 17, 42, 9 + i, 3 * i + 4, 11 + 2 * i] for i in range(5)}


def make_engine(async_scheduling: bool, **kw) -> AsyncEngine:
    return AsyncEngine(EngineConfig(model="tiny", max_model_len=128, async_scheduling=async_scheduling, **kw))


async def outputs(engine: AsyncEngine, params_of) -> dict:
    await engine.start()
    try:
        got = await asyncio.gather(*[collect(engine, rid, p, params_of(i)) for i, (rid, p) in enumerate(PROMPTS.items())])
        return dict(zip(PROMPTS, got))
    finally:
        await engine.shutdown()


def greedy_and_seeded(i: int) -> SamplingParams:
    return SamplingParams(max_tokens=20 + 3 * i, ignore_eos=True,
                          **({} if i % 2 else dict(temperature=0.8, seed=100 + i)))


@pytest.mark.parametrize("model_process", [False, True], ids=["in-process", "child-process"])
@pytest.mark.parametrize("k", [0, 3], ids=["mtp-off", "adaptive-k3"])
def test_tokens_are_the_same_with_and_without_look_ahead(preset_cache, k, model_process):
    on = make_engine(True, num_speculative_tokens=k, model_process=model_process)
    assert on.look_ahead
    with_it = asyncio.run(outputs(on, greedy_and_seeded))
    without = asyncio.run(outputs(make_engine(False, num_speculative_tokens=k, model_process=model_process),
                                  greedy_and_seeded))
    assert with_it == without
    tokens = sum(len(t) for t, _ in with_it.values())
    if k == 0:      # every token but each request's first (its prompt pass) came from a look-ahead step
        assert on.scheduler.ahead.num_planned == tokens - len(PROMPTS)
    else:           # seeded random sampling keeps k drafts every step: only greedy requests look ahead
        assert on.scheduler.ahead.num_planned > 0


def test_look_ahead_is_off_where_passes_may_run_out_of_order():
    engine = make_engine(True, num_microbatches=2)
    try:
        assert not engine.look_ahead and not engine.scheduler.config.look_ahead
    finally:
        engine.executor.shutdown()


def test_a_stop_with_a_look_ahead_step_out_ends_as_without_it_and_frees_everything(preset_cache):
    """The stop token is one the request would produce mid-stream: the step planned after it is dropped."""
    free = asyncio.run(outputs(make_engine(False), lambda i: SamplingParams(max_tokens=30, ignore_eos=True)))
    stops = {rid: next(t for j, t in enumerate(toks) if 3 <= j and t not in toks[:j])
             for rid, (toks, _) in free.items()}

    def stopping(i: int) -> SamplingParams:
        return SamplingParams(max_tokens=30, stop_token_ids=(stops[f"r{i}"],))
    on = make_engine(True)
    with_it = asyncio.run(outputs(on, stopping))
    assert with_it == asyncio.run(outputs(make_engine(False), stopping))
    assert all(reason == "stop" and len(toks) < 30 for toks, reason in with_it.values())
    assert on.scheduler.ahead.num_dropped == len(PROMPTS)
    stats = on.stats()
    assert (stats.running, stats.kv_blocks_used, stats.mamba_slots_used) == (0, 0, 0)


def test_an_abort_with_a_look_ahead_step_out_frees_the_request_within_a_pass(preset_cache):
    async def run():
        engine = make_engine(True)
        await engine.start()
        try:
            params = SamplingParams(max_tokens=100, ignore_eos=True)
            stream = engine.add_request("long", PROMPTS["r0"], params)
            got = 0
            async for out in stream:
                got += len(out.new_token_ids)
                seq = engine.scheduler.seqs[engine._seq_of["long"]]
                if got >= 5 and seq.ahead is not None:
                    break
            assert seq.ahead is not None and engine.stats().running == 1
            dropped = engine.scheduler.ahead.num_dropped
            await stream.aclose()                       # the client goes away
            for _ in range(500):                        # freed when the pass in flight returns
                if engine.stats().running == 0:
                    break
                await asyncio.sleep(0.01)
            stats = engine.stats()
            assert (stats.running, stats.kv_blocks_used, stats.mamba_slots_used) == (0, 0, 0)
            assert stats.requests_aborted == 1 and got < 100
            assert engine.scheduler.ahead.num_dropped == dropped + 1
            # ... and the engine goes on: a new request gets the same tokens as without look-ahead.
            again = await collect(engine, "next", PROMPTS["r1"], SamplingParams(max_tokens=12, ignore_eos=True))
        finally:
            await engine.shutdown()
        return again
    again = asyncio.run(run())
    ref = asyncio.run(outputs(make_engine(False), lambda i: SamplingParams(max_tokens=12, ignore_eos=True)))
    assert again == ref["r1"]
