"""Which layers each pipeline stage owns and which experts each expert-parallel rank owns."""
from __future__ import annotations

from model_shards.config import ModelConfig


def split_layers(cfg: ModelConfig, num_stages: int) -> list[tuple[int, int]]:
    """Contiguous [start, stop) ranges balanced by the planner's per-layer cost model."""
    n = cfg.num_hidden_layers
    if not 1 <= num_stages <= n:
        raise ValueError(f"pipeline_parallel_size: must be in 1..{n} (the number of layers), got {num_stages}")
    costs = _layer_costs(cfg)
    # Exact min-max contiguous partition by dynamic programming (n is at most a few hundred).
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + c)
    inf = float("inf")
    best = [[inf] * (n + 1) for _ in range(num_stages + 1)]
    cut = [[0] * (n + 1) for _ in range(num_stages + 1)]
    best[0][0] = 0.0
    for s in range(1, num_stages + 1):
        for j in range(s, n + 1):
            for i in range(s - 1, j):
                v = max(best[s - 1][i], prefix[j] - prefix[i])
                if v < best[s][j]:
                    best[s][j], cut[s][j] = v, i
    bounds, j = [], n
    for s in range(num_stages, 0, -1):
        i = cut[s][j]
        bounds.append((i, j))
        j = i
    return bounds[::-1]


def expert_ranges(num_experts: int, ep: int) -> list[tuple[int, int]]:
    if ep < 1 or num_experts % ep:
        raise ValueError(f"expert_parallel_size: {ep} must divide n_routed_experts ({num_experts})")
    per = num_experts // ep
    return [(r * per, (r + 1) * per) for r in range(ep)]


def _layer_costs(cfg: ModelConfig) -> list[float]:
    try:
        from .planner import layer_costs
    except ImportError:  # TODO(lead): planner lands in parallel; use its cost model only
        return [{"M": 1.0, "*": 1.0, "E": 1.5, "-": 1.0}[k] for k in cfg.hybrid_override_pattern]
    return list(layer_costs(cfg))
