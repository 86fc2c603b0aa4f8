"""When each request is sent: Poisson (or burstier / smoother) arrivals, seeded, as vLLM's `bench serve`.

Inter-arrival gaps are gamma-distributed with shape = burstiness and scale = 1 / (rate * burstiness):
the mean gap is 1/rate whatever the burstiness; burstiness 1 is a Poisson process, below 1 burstier,
above 1 more regular (the coefficient of variation of the gaps is 1/sqrt(burstiness)).
"""
from __future__ import annotations

import math

import numpy as np


def arrival_offsets(n: int, request_rate: float, burstiness: float = 1.0, seed: int = 0) -> list[float]:
    """Send times in seconds after the start; the first request goes at 0, `inf` sends all at once."""
    if n <= 0:
        return []
    if math.isinf(request_rate):
        return [0.0] * n
    if not request_rate > 0:
        raise ValueError(f"--request-rate: must be positive or inf, got {request_rate}")
    if not burstiness > 0:
        raise ValueError(f"--burstiness: must be positive, got {burstiness}")
    rng = np.random.default_rng(seed)
    gaps = rng.gamma(shape=burstiness, scale=1.0 / (request_rate * burstiness), size=n - 1)
    return [0.0] + np.cumsum(gaps).tolist()
