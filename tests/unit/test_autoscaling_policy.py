"""The engine autoscaling policy: replicas follow the most loaded of ongoing requests, sequences and KV use."""
from __future__ import annotations

from types import SimpleNamespace

import pytest

from router.autoscaling import KV_USAGE, POLICY_PATH, RUNNING, WAITING, EngineLoadPolicy, engine_autoscaling_stats
from router.engine_config import EngineConfig
from router.outputs import EngineStats
from router.serve_app import ServeConfig


def ctx(replicas: int, ongoing: float, metrics: dict, target_ongoing: float = 16.0, state=None):
    cfg = SimpleNamespace(get_target_ongoing_requests=lambda: target_ongoing)
    return SimpleNamespace(current_num_replicas=replicas, target_num_replicas=replicas, total_num_requests=ongoing,
                           aggregated_metrics=metrics, config=cfg, policy_state=state or {})


def per_replica(*values):
    return {f"r{i}": v for i, v in enumerate(values)}


def test_a_replica_reports_running_waiting_and_kv_usage():
    s = EngineStats(running=3, waiting=5, kv_blocks_total=40, kv_blocks_used=30)
    assert engine_autoscaling_stats(s) == {RUNNING: 3.0, WAITING: 5.0, KV_USAGE: 0.75}
    assert engine_autoscaling_stats(EngineStats())[KV_USAGE] == 0.0          # no cache yet: not a division by 0


def test_kv_cache_usage_alone_asks_for_more_replicas():
    policy = EngineLoadPolicy(target_sequences=16, target_kv_usage=0.5)
    desired, state = policy(ctx(2, ongoing=2, metrics={RUNNING: per_replica(1, 1), WAITING: per_replica(0, 0),
                                                         KV_USAGE: per_replica(0.9, 0.7)}))
    assert desired == pytest.approx(2 * 0.8 / 0.5)
    assert state["hybridserve_signal"] == "kv_cache"


def test_waiting_sequences_ask_for_more_replicas_even_with_few_ongoing_requests_counted():
    policy = EngineLoadPolicy(target_sequences=4)
    desired, state = policy(ctx(1, ongoing=1, metrics={RUNNING: per_replica(4), WAITING: per_replica(8),
                                                         KV_USAGE: per_replica(0.1)}))
    assert desired == pytest.approx(3.0) and state["hybridserve_signal"] == "sequences"


def test_ongoing_requests_still_count_and_idle_replicas_scale_down():
    policy = EngineLoadPolicy(target_sequences=16)
    desired, state = policy(ctx(1, ongoing=48, metrics={}))        # no engine metrics yet: Serve's signal
    assert desired == pytest.approx(3.0) and state["hybridserve_signal"] == "ongoing"
    desired, _ = policy(ctx(3, ongoing=0, metrics={RUNNING: per_replica(0, 0, 0), WAITING: per_replica(0, 0, 0),
                                                    KV_USAGE: per_replica(0, 0, 0)}))
    assert desired == 0.0                                          # Serve clamps to min_replicas


def test_policy_state_keeps_serves_own_keys():
    desired, state = EngineLoadPolicy(8)(ctx(1, 0, {}, state={"__decision_counters": 2, "hybridserve_old": 1.0}))
    assert state["__decision_counters"] == 2 and "hybridserve_old" not in state


@pytest.mark.parametrize("kw", [{"target_sequences": 0}, {"target_sequences": 4, "target_kv_usage": 1.5}])
def test_bad_targets_are_refused(kw):
    with pytest.raises(ValueError, match=next(iter(k for k in kw if kw[k] in (0, 1.5)))):
        EngineLoadPolicy(**kw)


def test_serve_accepts_the_policy_in_the_deployments_autoscaling_config():
    from ray.serve.config import AutoscalingConfig

    cfg = ServeConfig(engine=EngineConfig(max_num_seqs=8), min_replicas=1, max_replicas=4, target_kv_cache_usage=0.6)
    parsed = AutoscalingConfig(**cfg.autoscaling_config())
    assert parsed.policy.policy_function == POLICY_PATH
    assert parsed.policy.policy_kwargs == {"target_sequences": 8.0, "target_kv_usage": 0.6}
    assert isinstance(parsed.policy.get_policy()(**parsed.policy.policy_kwargs), EngineLoadPolicy)
    fixed = ServeConfig(min_replicas=1, max_replicas=4, autoscaling_policy="ongoing").autoscaling_config()
    assert "policy" not in fixed                                    # Serve's default policy
