"""Replica autoscaling on what the engine knows, not only on requests in flight.

Serve's default policy scales on ongoing requests per replica. For an LLM engine that misses the two
things that actually run out: batch slots (a replica runs at most `max_num_seqs` sequences; the rest
wait in its queue) and KV-cache blocks (long contexts fill the cache while the request count looks
small). So each model replica reports three numbers with every Serve metrics push
(`ModelServer.record_autoscaling_stats`, keys `ENGINE_METRICS`), and `EngineLoadPolicy` asks for
enough replicas to bring the most loaded of three signals to its target:

    ongoing    = ongoing requests / (target_ongoing_requests x replicas)      (Serve's own signal)
    sequences  = (running + waiting sequences) / (target_sequences x replicas)
    kv_cache   = mean KV-cache usage over replicas / target_kv_usage
    desired    = replicas x max(ongoing, sequences, kv_cache)

Serve wraps the policy with its bounds (min/max replicas), scaling factors and up/down delays, so a
brief spike does not add a replica and scale-down waits `downscale_delay_s`. The same engine numbers
are on `/metrics` (`hybridserve:num_requests_running`, `...waiting`, `...kv_cache_usage_perc`) for an
external autoscaler (KEDA, an HPA on Prometheus); docs/DEPLOY.md gives the queries.
"""
from __future__ import annotations

from typing import Any

from .outputs import EngineStats

RUNNING, WAITING, KV_USAGE = "engine_running", "engine_waiting", "engine_kv_usage"
ENGINE_METRICS = (RUNNING, WAITING, KV_USAGE)
POLICY_PATH = "router.autoscaling:EngineLoadPolicy"


def engine_autoscaling_stats(stats: EngineStats) -> dict[str, float]:
    """What a replica reports to Serve's autoscaler each metrics push."""
    kv = stats.kv_blocks_used / stats.kv_blocks_total if stats.kv_blocks_total else 0.0
    return {RUNNING: float(stats.running), WAITING: float(stats.waiting), KV_USAGE: kv}


def load_ratios(current_replicas: int, ongoing_requests: float, target_ongoing: float,
                metrics: dict[str, dict[Any, float]], target_sequences: float, target_kv_usage: float
                ) -> dict[str, float]:
    """Each signal as load / target (1.0: on target) over `current_replicas`; `metrics` maps a metric
    name to {replica: value} as Serve aggregates it over its look-back window."""
    n = max(1, current_replicas)
    ratios = {"ongoing": ongoing_requests / (target_ongoing * n)}
    running, waiting = metrics.get(RUNNING) or {}, metrics.get(WAITING) or {}
    if running or waiting:
        ratios["sequences"] = (sum(running.values()) + sum(waiting.values())) / (target_sequences * n)
    kv = metrics.get(KV_USAGE) or {}
    if kv:
        ratios["kv_cache"] = sum(kv.values()) / len(kv) / target_kv_usage
    return ratios


class EngineLoadPolicy:
    """A Serve custom autoscaling policy (`autoscaling_config.policy.policy_function`); Serve builds it
    once with `policy_kwargs` and calls it every control-loop tick with an AutoscalingContext."""

    def __init__(self, target_sequences: float, target_kv_usage: float = 0.8):
        if target_sequences <= 0:
            raise ValueError(f"target_sequences: must be > 0, got {target_sequences}")
        if not 0.0 < target_kv_usage <= 1.0:
            raise ValueError(f"target_kv_usage: must be in (0, 1], got {target_kv_usage}")
        self.target_sequences = target_sequences
        self.target_kv_usage = target_kv_usage

    def __call__(self, ctx) -> tuple[float, dict]:
        n = ctx.current_num_replicas
        if n == 0:                       # Serve's cold-start path scales from zero before calling us
            return ctx.target_num_replicas, dict(ctx.policy_state)
        ratios = load_ratios(n, ctx.total_num_requests, ctx.config.get_target_ongoing_requests(),
                             ctx.aggregated_metrics or {}, self.target_sequences, self.target_kv_usage)
        signal = max(ratios, key=ratios.get)
        state = {k: v for k, v in ctx.policy_state.items() if not k.startswith("hybridserve_")}
        state.update({"hybridserve_signal": signal, **{f"hybridserve_{k}": v for k, v in ratios.items()}})
        return n * ratios[signal], state
