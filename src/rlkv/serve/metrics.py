"""Prometheus metrics of a server: the engine's state read at scrape time, plus per-request timings.

    rlkv_running_requests, rlkv_waiting_requests            gauges
    rlkv_kv_pages_used, rlkv_kv_pages_free, rlkv_kv_pages_total   gauges (token droppers: slots)
    rlkv_kv_pool_bytes, rlkv_kv_used_bytes                  gauges: the KV pool and what requests hold of it,
                                                            in the bytes stored (FP8: one per element)
    rlkv_open_streams                                       gauge: requests the server awaits outputs for
    rlkv_engine_up                                          gauge: 1 while the engine takes requests
    rlkv_preemptions_total, rlkv_generation_tokens_total,
    rlkv_prompt_tokens_total, rlkv_finished_requests_total  counters since the server started
    rlkv_engine_restarts_total                              counter: engines started again after failing
    rlkv_http_requests_total{endpoint, status}              answered HTTP requests
    rlkv_time_to_first_token_seconds, rlkv_request_seconds  histograms of completed generations

Behind several replicas (`rlkv serve --data-parallel N`) the series above are the replicas' sums (one
engine_up: 1 while any replica takes requests), and each engine series is also shown per replica as
rlkv_replica_<name>{replica="0"}, ... (e.g. rlkv_replica_running_requests{replica="1"}): under its own name,
so that a query over rlkv_running_requests neither double counts nor changes meaning.

Each server has its own registry, so several apps can live in one process (tests).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from rlkv.serve.replicas import Replicas

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
SECONDS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 60, 120, 300, 600)


_SERIES = (  # (name, kind, help) of each engine series, in the order `_values` gives them
    ("running_requests", "gauge", "requests being generated"),
    ("waiting_requests", "gauge", "requests queued (new or preempted)"),
    ("kv_pages_used", "gauge", "KV pages held by running requests"),
    ("kv_pages_free", "gauge", "KV pages free"),
    ("kv_pages_total", "gauge", "KV pages in the pool"),
    ("kv_pool_bytes", "gauge", "bytes of the KV pool, as stored (FP8: one per element)"),
    ("kv_used_bytes", "gauge", "bytes of the KV pool the admitted requests hold, as stored"),
    ("open_streams", "gauge", "requests the server awaits outputs for"),
    ("engine_up", "gauge", "1 while the engine takes requests, else 0"),
    ("preemptions", "counter", "running requests preempted for memory (re-prefilled later)"),
    ("generation_tokens", "counter", "tokens generated"),
    ("prompt_tokens", "counter", "prompt tokens prefilled"),
    ("finished_requests", "counter", "requests finished"),
    ("engine_restarts", "counter", "engines started again after failing"),
)


def _values(engine) -> tuple[int, ...]:
    """The `_SERIES` values of a `Streams` (or of `Replicas`: their sums)."""
    m = engine.metrics()
    return (
        m.running,
        m.waiting,
        m.pages_used,
        m.pages_total - m.pages_used,
        m.pages_total,
        m.kv_pool_bytes,
        m.kv_bytes_used,
        engine.open_streams,
        int(engine.healthy),
        m.preemptions,
        m.generated_tokens,
        m.prompt_tokens,
        m.finished_requests,
        engine.restarts,
    )


class _EngineCollector:
    """Reads the streams' `metrics()` (safe from any thread) and their state at every scrape; behind `Replicas`,
    each replica's too."""

    def __init__(self, engine):
        self.engine = engine

    def collect(self):
        total = _values(self.engine)
        each = [_values(r) for r in self.engine.replicas] if isinstance(self.engine, Replicas) else []
        for k, (name, kind, doc) in enumerate(_SERIES):
            family = GaugeMetricFamily if kind == "gauge" else CounterMetricFamily
            yield family(f"rlkv_{name}", doc, value=total[k])
            if each:
                per_replica = family(f"rlkv_replica_{name}", f"{doc}, per replica", labels=["replica"])
                for i, values in enumerate(each):
                    per_replica.add_metric([str(i)], values[k])
                yield per_replica


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
