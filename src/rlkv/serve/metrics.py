"""Prometheus metrics of a server: the engine's state read at scrape time, plus per-request timings.

    rlkv_running_requests, rlkv_waiting_requests            gauges
    rlkv_kv_pages_used, rlkv_kv_pages_free, rlkv_kv_pages_total   gauges (token droppers: slots)
    rlkv_open_streams                                       gauge: requests the server awaits outputs for
    rlkv_engine_up                                          gauge: 1 while the engine takes requests
    rlkv_preemptions_total, rlkv_generation_tokens_total,
    rlkv_prompt_tokens_total, rlkv_finished_requests_total  counters since the server started
    rlkv_engine_restarts_total                              counter: engines started again after failing
    rlkv_http_requests_total{endpoint, status}              answered HTTP requests
    rlkv_time_to_first_token_seconds, rlkv_request_seconds  histograms of completed generations

Each server has its own registry, so several apps can live in one process (tests).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
SECONDS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 60, 120, 300, 600)


class _EngineCollector:
    """Reads the streams' `metrics()` (safe from any thread) and their state at every scrape."""

    def __init__(self, engine):
        self.engine = engine

    def collect(self):
        m = self.engine.metrics()
        gauges = (
            ("running_requests", "requests being generated", m.running),
            ("waiting_requests", "requests queued (new or preempted)", m.waiting),
            ("kv_pages_used", "KV pages held by running requests", m.pages_used),
            ("kv_pages_free", "KV pages free", m.pages_total - m.pages_used),
            ("kv_pages_total", "KV pages in the pool", m.pages_total),
            ("open_streams", "requests the server awaits outputs for", self.engine.open_streams),
            ("engine_up", "1 while the engine takes requests, else 0", int(self.engine.healthy)),
        )
        for name, doc, value in gauges:
            yield GaugeMetricFamily(f"rlkv_{name}", doc, value=value)
        counters = (
            ("preemptions", "running requests preempted for memory (re-prefilled later)", m.preemptions),
            ("generation_tokens", "tokens generated", m.generated_tokens),
            ("prompt_tokens", "prompt tokens prefilled", m.prompt_tokens),
            ("finished_requests", "requests finished", m.finished_requests),
            ("engine_restarts", "engines started again after failing", self.engine.restarts),
        )
        for name, doc, value in counters:
            yield CounterMetricFamily(f"rlkv_{name}", doc, value=value)


class ServerMetrics:
    def __init__(self, engine):
        self.registry = CollectorRegistry()
        self.registry.register(_EngineCollector(engine))
        self.http = Counter(
            "rlkv_http_requests", "HTTP requests answered", ["endpoint", "status"], registry=self.registry
        )
        self.ttft = Histogram(
            "rlkv_time_to_first_token_seconds",
            "from arrival to the first generated token",
            buckets=SECONDS,
            registry=self.registry,
        )
        self.latency = Histogram(
            "rlkv_request_seconds", "from arrival to the last generated token", buckets=SECONDS, registry=self.registry
        )

    def count(self, request, status: int) -> None:
        """Count an answer to `request` (a Starlette Request) under its route; unknown paths are "other"."""
        endpoint = getattr(request.scope.get("route"), "path", "other")
        self.http.labels(endpoint=endpoint, status=str(status)).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
