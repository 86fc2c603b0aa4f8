"""Prometheus metrics of the front door, with vLLM's names under the `hybridserve:` prefix.

Two sources:
- Per-request timings measured where the client is (the ingress): time to first token, inter-token
  latency (one observation per streamed update; with MTP an update may carry several tokens),
  end-to-end latency, token counts, finished requests by reason, rejections by HTTP status.
- Engine state, read on scrape from every model replica's latest `EngineStats` (`set_engine_stats`):
  waiting/running requests, KV-block and Mamba-slot use, engine steps, MTP drafted/accepted tokens per
  draft position, and a histogram of the drafts the speculation policy chose per sequence per step.
  These carry a `replica` label; sum over it for the deployment.

Each Metrics object has its own registry, so tests and several apps in one process do not collide.
"""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from .outputs import EngineStats

P = "hybridserve:"
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                    10.0, 20.0, 40.0, 80.0)
_E2E_BUCKETS = (0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
                120.0, 240.0, 480.0)


class _EngineCollector:
    """Turns the latest EngineStats of each replica into gauges and counters at scrape time."""

    def __init__(self, model_name: str):
        self.model_name = model_name
        self.stats: dict[str, EngineStats] = {}

    def collect(self):
        labels = ["model_name", "replica"]
        g = {name: GaugeMetricFamily(P + name, doc, labels=labels) for name, doc in [
            ("num_requests_running", "Requests the engine is running (holding a Mamba slot)."),
            ("num_requests_waiting", "Requests queued in the engine, not yet admitted."),
            ("kv_cache_blocks_used", "KV-cache blocks in use."),
            ("kv_cache_blocks_total", "KV-cache blocks of the replica."),
            ("kv_cache_usage_perc", "Fraction of KV-cache blocks in use (0..1)."),
            ("mamba_slots_used", "Mamba state slots in use (one per running sequence)."),
            ("mamba_slots_total", "Mamba state slots of the replica."),
            ("engine_healthy", "1 while the replica's actors are up (0 while they are rebuilt)."),
            ("engine_stepping", "1 while the engine loop is alive and passes come back (what /ready needs)."),
        ]}
        steps = CounterMetricFamily(P + "engine_steps", "Batches the engine has run.", labels=labels)
        ends = {name: CounterMetricFamily(P + name, doc, labels=labels) for name, doc in [
            ("engine_requests_aborted", "Requests the engine cancelled while they ran (client gone, stop string)."),
            ("engine_requests_failed", "Requests the engine ended with an error."),
            ("engine_generation_tokens", "Output tokens the engine produced for requests."),
        ]}
        pos_labels = labels + ["position"]
        drafted = CounterMetricFamily(P + "spec_decode_num_draft_tokens_per_pos",
                                      "MTP draft tokens proposed, by draft position (0 = first).", labels=pos_labels)
        accepted = CounterMetricFamily(P + "spec_decode_num_accepted_tokens_per_pos",
                                       "MTP draft tokens accepted, by draft position (0 = first).", labels=pos_labels)
        chosen = HistogramMetricFamily(P + "spec_decode_drafts_per_seq",
                                       "MTP drafts proposed per sequence per step, as the speculation policy chose "
                                       "(one observation per sampling step of a sequence with MTP on).", labels=labels)
        for replica, s in sorted(self.stats.items()):
            lv = [self.model_name, replica]
            g["num_requests_running"].add_metric(lv, s.running)
            g["num_requests_waiting"].add_metric(lv, s.waiting)
            g["kv_cache_blocks_used"].add_metric(lv, s.kv_blocks_used)
            g["kv_cache_blocks_total"].add_metric(lv, s.kv_blocks_total)
            g["kv_cache_usage_perc"].add_metric(lv, s.kv_blocks_used / s.kv_blocks_total if s.kv_blocks_total else 0.0)
            g["mamba_slots_used"].add_metric(lv, s.mamba_slots_used)
            g["mamba_slots_total"].add_metric(lv, s.mamba_slots_total)
            g["engine_healthy"].add_metric(lv, 1.0 if s.healthy else 0.0)
            g["engine_stepping"].add_metric(lv, 1.0 if s.stepping else 0.0)
            steps.add_metric(lv, s.steps)
            ends["engine_requests_aborted"].add_metric(lv, s.requests_aborted)
            ends["engine_requests_failed"].add_metric(lv, s.requests_failed)
            ends["engine_generation_tokens"].add_metric(lv, s.tokens_generated)
            for i, (d, a) in enumerate(zip(s.drafted_per_position, s.accepted_per_position)):
                drafted.add_metric(lv + [str(i)], d)
                accepted.add_metric(lv + [str(i)], a)
            if s.drafts_per_seq:
                cum = [sum(s.drafts_per_seq[:i + 1]) for i in range(len(s.drafts_per_seq))]
                chosen.add_metric(lv, [(str(float(i)), c) for i, c in enumerate(cum)] + [("+Inf", cum[-1])],
                                  sum_value=sum(i * c for i, c in enumerate(s.drafts_per_seq)))
        yield from g.values()
        yield steps
        yield from ends.values()
        yield drafted
        yield accepted
        yield chosen


class Metrics:
    def __init__(self, model_name: str):
        self.model_name = model_name
        self.registry = CollectorRegistry(auto_describe=True)
        r, m = self.registry, ["model_name"]
        self.ttft = Histogram(P + "time_to_first_token_seconds", "Time from request arrival to its first token.",
                              m, buckets=_LATENCY_BUCKETS, registry=r)
        self.itl = Histogram(P + "inter_token_latency_seconds", "Time between two streamed updates of a request.",
                             m, buckets=_LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram(P + "e2e_request_latency_seconds", "Time from request arrival to its last token.",
                             m, buckets=_E2E_BUCKETS, registry=r)
        self.prompt_tokens = Counter(P + "prompt_tokens", "Prompt tokens of finished requests.", m, registry=r)
        self.generation_tokens = Counter(P + "generation_tokens", "Generated tokens.", m, registry=r)
        self.request_success = Counter(P + "request_success", "Finished requests, by finish reason.",
                                       m + ["finished_reason"], registry=r)
        self.request_rejected = Counter(P + "request_rejected", "Requests refused before generation, by status.",
                                        m + ["status"], registry=r)
        self.engine = _EngineCollector(model_name)
        r.register(self.engine)

    def set_engine_stats(self, stats: dict[str, EngineStats]) -> None:
        self.engine.stats = dict(stats)

    def observe_first_token(self, seconds: float) -> None:
        self.ttft.labels(self.model_name).observe(seconds)

    def observe_gap(self, seconds: float) -> None:
        self.itl.labels(self.model_name).observe(seconds)

    def observe_finished(self, e2e_s: float, prompt_tokens: int, output_tokens: int, reason: str) -> None:
        self.e2e.labels(self.model_name).observe(e2e_s)
        self.prompt_tokens.labels(self.model_name).inc(prompt_tokens)
        self.generation_tokens.labels(self.model_name).inc(output_tokens)
        self.request_success.labels(self.model_name, reason).inc()

    def observe_rejected(self, status: int) -> None:
        self.request_rejected.labels(self.model_name, str(status)).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
