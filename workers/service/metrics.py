"""Prometheus metrics of one app, in its own :class:`CollectorRegistry` (several apps can live in one process).

* ``fusionrank_requests_total{endpoint, status}`` — requests by route template and HTTP status;
* ``fusionrank_request_seconds{endpoint}`` — latency histogram;
* ``fusionrank_degraded_total{reason}`` — rerank calls that failed open to the first-stage order;
* ``fusionrank_model_info{version,runtime}`` — 1 for the served model version (``none`` for the noop reranker) and what
  runs its forward pass (``onnx`` / ``torch``; ``none`` without a model);
* ``fusionrank_model_reloads_total`` / ``fusionrank_model_reload_failures_total`` — promoted models the service followed
  (loaded and swapped in), and those that failed to load (the old model kept serving);
* ``fusionrank_ubi_searches{outcome}`` — what the UBI recording did with the answered searches (recorded, written, dropped,
  failed, queued).

Labels are route templates (``/v1/rerank``), never raw paths, headers or bodies: no key can end up here.
"""

from __future__ import annotations

import threading

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

#: latency buckets (seconds): fine around the 50 ms budget
BUCKETS = (0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
CONTENT_TYPE = CONTENT_TYPE_LATEST


class ServiceMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter("fusionrank_requests", "HTTP requests by endpoint and status", ["endpoint", "status"], registry=self.registry)
        self.latency = Histogram("fusionrank_request_seconds", "HTTP request latency by endpoint", ["endpoint"], buckets=BUCKETS, registry=self.registry)
        self.degraded = Counter("fusionrank_degraded", "rerank calls that failed open to the first-stage order, by reason", ["reason"], registry=self.registry)
        self.model_info = Gauge("fusionrank_model_info", "the served fusion model version and its runtime (value 1)", ["version", "runtime"],
                                registry=self.registry)
        self.rebalanced = Counter("fusionrank_rebalanced_connections", "keep-alive connections this worker closed to even out "
                                  "the connections across serve --workers processes", registry=self.registry)
        self.reloads = Counter("fusionrank_model_reloads", "promoted models loaded and swapped in (the model link moved)", registry=self.registry)
        self.reload_failures = Counter("fusionrank_model_reload_failures", "promoted models that failed to load (the old one kept serving)",
                                       registry=self.registry)
        self.ubi = Gauge("fusionrank_ubi_searches", "searches answered by /search and /rerank for the UBI tables, by outcome (recorded: "
                         "queued; written; dropped: the queue was full; failed: the store refused; queued now)", ["outcome"], registry=self.registry)
        self.ubi_stats = None  # () -> {"recorded", "written", "dropped", "failed", "queued"}: the state's UbiRecorder.stats
        self._lock = threading.Lock()

    def observe(self, endpoint: str, status: int, seconds: float) -> None:
        self.requests.labels(endpoint=endpoint, status=str(status)).inc()
        self.latency.labels(endpoint=endpoint).observe(seconds)

    def count_degraded(self, reason: str | None) -> None:
        if reason:
            self.degraded.labels(reason=reason).inc()

    def count_reload(self, *, ok: bool) -> None:
        (self.reloads if ok else self.reload_failures).inc()

    def set_model(self, version: str | None, runtime: str | None = None) -> None:
        with self._lock:
            self.model_info.clear()
            self.model_info.labels(version=version or "none", runtime=runtime or "none").set(1)

    def render(self) -> bytes:
        if self.ubi_stats is not None:
            for k, v in self.ubi_stats().items():
                self.ubi.labels(outcome=k).set(v)
        return generate_latest(self.registry)


__all__ = ["BUCKETS", "CONTENT_TYPE", "ServiceMetrics"]
