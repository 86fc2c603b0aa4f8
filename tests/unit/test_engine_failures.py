"""The engine loop under failure: what fails is what a failure concerns, the loop goes on, nothing leaks.

Failures are injected into a real in-process engine (tiny preset) by wrapping its executor: a pass
that raises when it carries one poison request, an actor death, a result the scheduler cannot apply.
"""
from __future__ import annotations

import asyncio

import pytest

from model_shards.sampling_params import SamplingParams
from router.engine import AsyncEngine
from router.engine_config import EngineConfig
from tests.engine_helpers import collect, oracle

PARAMS = SamplingParams(max_tokens=12, ignore_eos=True)
PROMPTS = {f"ok{i}": [5 + i, 17, 42, 9 + i] for i in range(4)}


class InjectingExecutor:
    """The real executor, except that a pass carrying a request of `poison` raises `error`."""

    def __init__(self, engine, error: Exception, fatal: bool = False, times: int = 10**9):
        self.engine, self.inner, self.error, self.fatal, self.left = engine, engine.executor, error, fatal, times
        self.poison: set[str] = set()
        self.rebuilds = 0

    async def submit(self, plan):
        poison_ids = {self.engine._seq_of.get(rid) for rid in self.poison}
        if self.left > 0 and any(s.seq_id in poison_ids for s in plan.seqs):
            self.left -= 1
            await asyncio.sleep(0)
            raise self.error
        return await self.inner.submit(plan)

    def is_fatal(self, err):
        return self.fatal

    def rebuild(self):
        self.rebuilds += 1

    def shutdown(self):
        self.inner.shutdown()


def engine_with(error: Exception, fatal: bool = False, **kw) -> tuple[AsyncEngine, InjectingExecutor]:
    engine = AsyncEngine(EngineConfig(model="tiny", max_model_len=128, **kw))
    injecting = InjectingExecutor(engine, error, fatal)
    engine.executor = injecting
    return engine, injecting


async def run_with_poison(engine, injecting, poison_prompt):
    await engine.start()
    try:
        tasks = {rid: asyncio.create_task(collect(engine, rid, p, PARAMS)) for rid, p in PROMPTS.items()}
        injecting.poison.add("poison")
        poison = asyncio.create_task(collect(engine, "poison", poison_prompt, PARAMS))
        done = {rid: await asyncio.wait_for(t, 60) for rid, t in tasks.items()}
        return done, await asyncio.wait_for(poison, 60)
    finally:
        await engine.shutdown()


def test_a_pass_that_fails_because_of_one_request_fails_that_request_alone(preset_cache):
    engine, injecting = engine_with(OverflowError("int too big to convert"), num_speculative_tokens=2)
    done, (poison_tokens, poison_reason) = asyncio.run(run_with_poison(engine, injecting, [7, 8, 9]))
    assert poison_reason == "error"
    for rid, (tokens, reason) in done.items():           # its neighbours: full, exact answers
        assert reason == "length" and tokens == oracle(engine.folder, PROMPTS[rid], PARAMS), rid
    assert engine.stats_.requests_failed == 1 and engine.blocks.all_free()
    assert not engine.scheduler.running and not engine.scheduler.waiting


def test_an_actor_death_fails_the_admitted_requests_rebuilds_and_serves_again(preset_cache):
    engine, injecting = engine_with(RuntimeError("actor died"), fatal=True)
    injecting.left = 1

    async def scenario():
        await engine.start()
        try:
            injecting.poison.add("victim")
            first = asyncio.create_task(collect(engine, "victim", [5, 6, 7], PARAMS))
            victim = await asyncio.wait_for(first, 30)
            after = await asyncio.wait_for(collect(engine, "after", [5, 6, 7], PARAMS), 30)
            return victim, after
        finally:
            await engine.shutdown()

    (_, victim_reason), (after_tokens, after_reason) = asyncio.run(scenario())
    assert victim_reason == "error" and injecting.rebuilds == 1
    assert after_reason == "length" and after_tokens == oracle(engine.folder, [5, 6, 7], PARAMS)
    assert engine.stats_.healthy and engine.blocks.all_free()


def test_a_result_the_scheduler_cannot_apply_fails_its_requests_and_the_loop_goes_on(preset_cache):
    engine = AsyncEngine(EngineConfig(model="tiny", max_model_len=128))
    real_update = engine.scheduler.update
    broken = {"left": 1}

    def update(result):
        if broken["left"]:
            broken["left"] -= 1
            raise TypeError("unsupported operand")
        return real_update(result)
    engine.scheduler.update = update

    async def scenario():
        await engine.start()
        try:
            first = await asyncio.wait_for(collect(engine, "first", [5, 6, 7], PARAMS), 30)
            second = await asyncio.wait_for(collect(engine, "second", [5, 6, 7], PARAMS), 30)
            return first, second, engine.is_running
        finally:
            await engine.shutdown()

    (_, first_reason), (second_tokens, second_reason), alive = asyncio.run(scenario())
    assert first_reason == "error" and alive
    assert second_reason == "length" and len(second_tokens) == 12
    assert engine.blocks.all_free()


def test_abort_of_a_request_in_a_pass_frees_it_when_that_pass_returns(preset_cache):
    engine = AsyncEngine(EngineConfig(model="tiny", max_model_len=512))

    async def scenario():
        await engine.start()
        try:
            stream = engine.add_request("long", [5, 6, 7], SamplingParams(max_tokens=400, ignore_eos=True))
            got = 0
            async for out in stream:
                got += len(out.new_token_ids)
                if got >= 3:
                    break
            held = engine.blocks.used_slots
            await stream.aclose()
            for _ in range(100):                  # a pass may be in flight: freed when it returns
                if engine.blocks.all_free():
                    break
                await asyncio.sleep(0.01)
            return got, held, engine.stats_.steps
        finally:
            await engine.shutdown()

    got, held, steps = asyncio.run(scenario())
    assert held == 1 and engine.blocks.all_free() and not engine.scheduler.running
    assert engine.stats_.requests_aborted == 1
    assert engine.stats_.tokens_generated < 400 and steps < 50       # it did not run to max_tokens


def test_shutdown_ends_every_open_stream_with_an_error(preset_cache):
    engine = AsyncEngine(EngineConfig(model="tiny", max_model_len=512))

    async def scenario():
        await engine.start()
        stream = engine.add_request("open", [5, 6, 7], SamplingParams(max_tokens=400, ignore_eos=True))
        await stream.__anext__()
        await engine.shutdown()
        outs = [o async for o in stream]
        return outs

    outs = asyncio.run(scenario())
    assert outs[-1].finish_reason == "error" and "shut down" in outs[-1].error
    assert engine.blocks.all_free()


def test_the_kv_block_override_sets_the_cache_and_lowers_the_context_to_what_it_holds(preset_cache):
    engine = AsyncEngine(EngineConfig(model="tiny", num_kv_blocks=10, block_size=16, max_model_len=1024,
                                      num_speculative_tokens=2))
    assert engine.blocks.num_blocks == 10
    assert engine.max_model_len == 10 * 16 - 2 + 1          # kv_positions(L, k) = L - 1 + k
    with pytest.raises(ValueError, match="num_kv_blocks"):
        EngineConfig(model="tiny", num_kv_blocks=0).validate()
    with pytest.raises(ValueError, match="gpu_memory_utilization"):
        EngineConfig(model="tiny", gpu_memory_utilization=1.5).validate()


def test_gpu_memory_utilization_is_the_share_the_planner_may_use(preset_cache):
    small = AsyncEngine(EngineConfig(model="tiny", max_num_seqs=64, max_model_len=512, device_memory_gib=0.004,
                                     gpu_memory_utilization=0.5))
    large = AsyncEngine(EngineConfig(model="tiny", max_num_seqs=64, max_model_len=512, device_memory_gib=0.004,
                                     gpu_memory_utilization=1.0))
    assert small.plan.devices.usable_bytes * 2 == pytest.approx(large.plan.devices.usable_bytes, rel=1e-6)
    assert small.blocks.num_blocks < large.blocks.num_blocks


def test_a_sequence_whose_planning_raises_fails_alone_and_the_loop_does_not_spin(preset_cache):
    engine = AsyncEngine(EngineConfig(model="tiny", max_model_len=128))
    real = engine.scheduler._plan_seq

    def plan_seq(seq, *a, **kw):
        step = real(seq, *a, **kw)                  # blocks grown and the step built, then it goes wrong
        if seq.request_id == "bad" and step is not None:
            raise KeyError("bad params")
        return step
    engine.scheduler._plan_seq = plan_seq

    async def scenario():
        await engine.start()
        try:
            return await asyncio.wait_for(asyncio.gather(
                collect(engine, "bad", [5, 6, 7], PARAMS), collect(engine, "good", [8, 9], PARAMS)), 30)
        finally:
            await engine.shutdown()

    (_, bad_reason), (good_tokens, good_reason) = asyncio.run(scenario())
    assert bad_reason == "error" and good_reason == "length"
    assert good_tokens == oracle(engine.folder, [8, 9], PARAMS)
    assert engine.blocks.all_free() and engine.stats_.requests_failed == 1


def test_ready_after_an_idle_spell_and_not_ready_when_a_pass_never_returns(preset_cache):
    from router import serve_app

    engine = AsyncEngine(EngineConfig(model="tiny", max_model_len=128, stall_timeout_s=0.3))
    hang = asyncio.Event()

    class Hanging:
        async def submit(self, plan):
            await hang.wait()
        is_fatal = staticmethod(lambda e: False)
        rebuild = shutdown = staticmethod(lambda: None)

    async def scenario():
        await engine.start()
        await asyncio.sleep(0.5)                                    # idle longer than the stall timeout
        stream = engine.add_request("a", [5, 6], PARAMS)
        stepping_after_idle = engine.is_stepping
        await stream.__anext__()
        engine.executor = Hanging()                                 # the next pass never comes back
        await asyncio.sleep(0.5)
        server = serve_app.ModelServer.__new__(serve_app.ModelServer)
        server.engine = engine
        stalled_not_ready = not engine.is_stepping
        await asyncio.sleep(0.3)
        with pytest.raises(RuntimeError, match="stalled"):
            await server.check_health()                             # Serve replaces the replica
        hang.set()
        await engine.shutdown()
        return stepping_after_idle, stalled_not_ready

    stepping_after_idle, stalled_not_ready = asyncio.run(scenario())
    assert stepping_after_idle and stalled_not_ready


@pytest.mark.parametrize("make_error,transport,fatal", [
    (lambda E: E.RayTaskError("run", "tb", ValueError("bad seed")), "ray", False),     # a stage's Python error
    (lambda E: E.ActorDiedError(), "ray", True),
    (lambda E: E.RayTaskError("run", "tb", E.ActorDiedError()), "ray", True),        # stage 1 fed by a dead stage 0
    (lambda E: E.ObjectLostError("00" * 28, "", ""), "ray", True),
    (lambda E: E.RayTaskError("run", "tb", ValueError("bad seed")), "gloo", True),    # later stages wait to recv
])
def test_the_ray_executor_rebuilds_only_when_actors_or_their_objects_are_lost(make_error, transport, fatal):
    import ray.exceptions as E

    from cluster.ray_executor import RayExecutor

    ex = RayExecutor.__new__(RayExecutor)
    ex.transport, ex.pp, ex.ep = transport, 2, 1
    assert ex.is_fatal(make_error(E)) is fatal


def test_any_failed_pass_over_expert_collectives_rebuilds_the_replica():
    """-pp 1 -ep 2 over gloo: the shards wait in the failed pass's exchange; only a rebuild frees them."""
    import ray.exceptions as E

    from cluster.ray_executor import RayExecutor

    ex = RayExecutor.__new__(RayExecutor)
    ex.transport, ex.pp, ex.ep = "gloo", 1, 2
    assert ex.is_fatal(E.RayTaskError("run", "tb", ValueError("bad seed")))
    ex.transport = "ray"                       # a Ray call per layer: a Python error leaves the actors usable
    assert not ex.is_fatal(E.RayTaskError("run", "tb", ValueError("bad seed")))
