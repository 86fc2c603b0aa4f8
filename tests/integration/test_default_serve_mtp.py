"""`hybridserve serve` with no model arguments serves the shipped default model with MTP on (adaptive, at
most 3 drafts): a few greedy completions have drafts accepted, in each response's usage and, the same
count, in /metrics."""
from __future__ import annotations

import httpx
import pytest

from benchmarks.served import ServedCluster

pytestmark = pytest.mark.integration

PROMPT = "def fibonacci(n):\n    if n < 2:\n        return n\n    return"


def test_serve_without_arguments_accepts_mtp_drafts():
    with ServedCluster(num_cpus=4) as s:
        before = s.metrics()
        details = []
        for _ in range(3):
            r = httpx.post(s.url + "/v1/completions", timeout=120,
                           json={"prompt": PROMPT, "max_tokens": 32, "temperature": 0, "ignore_eos": True})
            assert r.status_code == 200, r.text
            usage = r.json()["usage"]
            assert usage["completion_tokens"] == 32
            details.append(usage["completion_tokens_details"])
        name = "spec_decode_num_accepted_tokens_per_pos_total"      # summed over positions

        def accepted(m: dict) -> float:
            return sum(v for k, v in m.items() if k.startswith(name)) - \
                sum(v for k, v in before.items() if k.startswith(name))
        in_usage = sum(d["accepted_prediction_tokens"] for d in details)
        assert in_usage > 0, details
        # The replica's counters reach /metrics a moment after the response: wait until they add up.
        s.wait_until(lambda m: accepted(m) == in_usage, 30, "/metrics to count the accepted drafts of the usage")
