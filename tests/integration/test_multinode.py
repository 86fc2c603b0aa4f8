"""Two Ray nodes on one machine (Ray's own test-cluster helper), a stage on each: same tokens."""
from __future__ import annotations

import asyncio

import pytest
import ray

from model_shards.sampling_params import SamplingParams
from router.engine import AsyncEngine
from router.engine_config import EngineConfig
from tests.engine_helpers import collect, oracle

pytestmark = pytest.mark.integration


@pytest.fixture
def two_node_cluster():
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 4, "resources": {"node_a": 4}})
    cluster.add_node(num_cpus=4, resources={"node_b": 4})
    ray.init(address=cluster.address)
    cluster.wait_for_nodes()
    yield cluster
    ray.shutdown()
    cluster.shutdown()


def test_stages_on_two_nodes_give_the_oracle_tokens(two_node_cluster, preset_cache):
    engine = AsyncEngine(EngineConfig(
        model="tiny", use_ray=True, pipeline_parallel_size=2, expert_parallel_size=2, num_speculative_tokens=2,
        max_model_len=128, placement_strategy="SPREAD", stage_resources=[{"node_a": 0.01}, {"node_b": 0.01}]))
    params = SamplingParams(max_tokens=12, ignore_eos=True)
    prompts = [[5, 9, 13, 200], list(range(30, 70))]

    async def scenario():
        await engine.start()
        try:
            outs = await asyncio.gather(*[collect(engine, f"r{i}", p, params, 2) for i, p in enumerate(prompts)])
            nodes = [s["node_id"] for s in engine.executor.stats()]
            return outs, nodes
        finally:
            await engine.shutdown()

    outs, nodes = asyncio.run(scenario())
    assert len(set(nodes)) == 2, "the two stages run on different nodes"
    for (tokens, _), p in zip(outs, prompts):
        assert tokens == oracle(engine.folder, p, params)
