"""MTP (speculative decoding) acceptance during the benchmark, from the server's Prometheus `/metrics`.

Counters are scraped before and after the measured rounds; the figures use the differences, summed over
labels other than `position` (replicas, models). Definitions:
- acceptance rate at draft position p = accepted[p] / drafted[p];
- overall acceptance rate = sum(accepted) / sum(drafted);
- mean acceptance length = tokens a sequence gains per verification round = 1 + sum(accepted) / rounds,
  where rounds = drafted[0] for hybridserve (every round with drafts proposes a first draft token) and
  vLLM's `spec_decode_num_drafts` when that is exported.
hybridserve exports `hybridserve:spec_decode_num_{draft,accepted}_tokens_per_pos_total{position}`; vLLM
`vllm:spec_decode_num_{draft_tokens,accepted_tokens,drafts}_total` and accepted tokens per position.
"""
from __future__ import annotations

from collections import defaultdict

HS = "hybridserve:spec_decode_num_{}_tokens_per_pos_total"
VLLM = "vllm:spec_decode_num_{}_total"
VLLM_ACCEPTED_PER_POS = "vllm:spec_decode_num_accepted_tokens_per_pos_total"

Samples = dict[str, dict[str, float]]     # sample name -> position label ("" if none) -> summed value


def parse_metrics(text: str) -> Samples:
    from prometheus_client.parser import text_string_to_metric_families

    out: Samples = defaultdict(lambda: defaultdict(float))
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if "spec_decode" in s.name:
                out[s.name][s.labels.get("position", "")] += s.value
    return {k: dict(v) for k, v in out.items()}


async def scrape(session, root_url: str) -> Samples | None:
    """The spec-decode counters, or None when the server has no readable /metrics."""
    try:
        async with session.get(root_url.rstrip("/") + "/metrics") as resp:
            if resp.status != 200:
                return None
            return parse_metrics(await resp.text())
    except Exception:  # noqa: BLE001 - /metrics is optional
        return None


def _delta(before: Samples, after: Samples, name: str) -> dict[str, float]:
    a, b = after.get(name, {}), before.get(name, {})
    return {k: v - b.get(k, 0.0) for k, v in a.items()}


def _by_position(d: dict[str, float]) -> list[float]:
    return [d[k] for k in sorted((k for k in d if k.isdigit()), key=int)]


def spec_decode_figures(before: Samples | None, after: Samples | None) -> dict | None:
    """The acceptance figures over the benchmark, or None when the server drafted nothing."""
    if before is None or after is None:
        return None
    drafted = _by_position(_delta(before, after, HS.format("draft")))
    accepted = _by_position(_delta(before, after, HS.format("accepted")))
    rounds = drafted[0] if drafted else 0.0
    if not any(drafted):
        draft_total = sum(_delta(before, after, VLLM.format("draft_tokens")).values())
        accepted_total = sum(_delta(before, after, VLLM.format("accepted_tokens")).values())
        rounds = sum(_delta(before, after, VLLM.format("drafts")).values())
        accepted = _by_position(_delta(before, after, VLLM_ACCEPTED_PER_POS))
        drafted = [rounds] * len(accepted) if rounds else []
        if not draft_total:
            return None
    else:
        draft_total, accepted_total = sum(drafted), sum(accepted)
    return {
        "draft_tokens": draft_total, "accepted_tokens": accepted_total,
        "acceptance_rate": accepted_total / draft_total,
        "mean_acceptance_length": 1.0 + accepted_total / rounds if rounds else None,
        "acceptance_rate_per_position": [a / d if d else None for a, d in zip(accepted, drafted)],
    }
