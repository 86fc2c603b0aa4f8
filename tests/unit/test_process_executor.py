"""The model in a child process (ProcessExecutor, what `hybridserve serve` uses at -pp 1 -ep 1) gives the
in-process engine's tokens, and a dead child is a replica failure: the requests in it fail with the
reason, the child is restarted, and the engine serves again."""
from __future__ import annotations

import asyncio
import os
import signal

import pytest

from model_shards.sampling_params import SamplingParams
from router.engine import AsyncEngine
from router.engine_config import EngineConfig
from tests.engine_helpers import collect

PROMPTS = {f"r{i}": [5 + i, 17, 42, 9 + i, 3 * i + 4] for i in range(6)}


async def run_all(engine, params):
    return await asyncio.gather(*[collect(engine, rid, p, params) for rid, p in PROMPTS.items()])


@pytest.mark.parametrize("k", [0, 2])
def test_the_child_process_gives_the_in_process_engines_tokens(preset_cache, k):
    params = SamplingParams(max_tokens=10, ignore_eos=True, temperature=0.8, seed=7)   # seeded sampling too

    async def outputs(model_process):
        engine = AsyncEngine(EngineConfig(model="tiny", max_model_len=128, num_speculative_tokens=k,
                                          model_process=model_process))
        await engine.start()
        try:
            assert type(engine.executor).__name__ == ("ProcessExecutor" if model_process else "LocalExecutor")
            return await run_all(engine, params)
        finally:
            await engine.shutdown()
    assert asyncio.run(outputs(True)) == asyncio.run(outputs(False))


def test_a_killed_child_fails_its_requests_then_the_engine_restarts_it_and_serves(preset_cache):
    async def scenario():
        engine = AsyncEngine(EngineConfig(model="tiny", max_model_len=128, model_process=True))
        await engine.start()
        try:
            first_pid = engine.executor.proc.pid
            long = asyncio.create_task(collect(engine, "long", [5, 6, 7], SamplingParams(max_tokens=100, ignore_eos=True)))
            while engine.stats_.tokens_generated < 3:           # the request is decoding in the child
                await asyncio.sleep(0.005)
            os.kill(first_pid, signal.SIGKILL)
            tokens, reason = await asyncio.wait_for(long, 60)
            assert reason == "error" and len(tokens) < 100
            assert engine.stats_.requests_failed == 1
            for _ in range(600):                                  # the rebuild runs in a thread
                if engine.executor.proc.pid != first_pid and engine.stats_.healthy:
                    break
                await asyncio.sleep(0.05)
            again = await collect(engine, "again", [5, 6, 7], SamplingParams(max_tokens=5, ignore_eos=True))
            assert again[1] == "length" and len(again[0]) == 5
            assert engine.executor.proc.pid != first_pid
            assert engine.blocks.used_blocks == 0 and engine.blocks.used_slots == 0
        finally:
            await engine.shutdown()
        assert engine.executor.proc.poll() is not None             # shutdown stops the child
    asyncio.run(scenario())


def test_a_checkpoint_the_child_cannot_load_is_a_clear_error(tmp_path):
    from cluster.process_executor import ProcessExecutor

    with pytest.raises(RuntimeError, match="could not load"):
        ProcessExecutor(tmp_path, num_blocks=4, block_size=4, num_slots=2, max_verify_positions=1)


@pytest.mark.parametrize("niceness", [-10, 5])
def test_the_model_process_runs_at_the_configured_niceness_where_the_os_allows(preset_cache, niceness):
    """The child asks for model_niceness before loading weights: at -10 (the default) it runs before the
    serving path's processes on a shared machine; raising priority needs root or CAP_SYS_NICE (else the
    child stays at the parent's value), lowering it is always allowed."""
    async def child_niceness():
        engine = AsyncEngine(EngineConfig(model="tiny", max_model_len=64, model_process=True,
                                          model_niceness=niceness))
        await engine.start()
        try:
            return os.getpriority(os.PRIO_PROCESS, engine.executor.proc.pid)
        finally:
            await engine.shutdown()
    ours = os.getpriority(os.PRIO_PROCESS, 0)
    allowed = niceness >= ours or os.geteuid() == 0
    assert asyncio.run(child_niceness()) == (niceness if allowed else ours)


def test_an_out_of_range_niceness_is_refused_by_name():
    with pytest.raises(ValueError, match=r"model_niceness: must be in \[-20, 19\], got 40"):
        EngineConfig(model_niceness=40).validate()


def test_the_server_asks_for_priority_and_the_library_leaves_it():
    """`hybridserve serve` asks for nice -10 for its model processes; an EngineConfig built in someone
    else's program leaves its host's priorities alone."""
    from router.serve_options import serve_args_from_dict, serve_config_from_args
    assert serve_config_from_args(serve_args_from_dict({})).engine.model_niceness == -10
    assert EngineConfig().model_niceness == 0
