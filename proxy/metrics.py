"""Prometheus metrics at ``GET /metrics``, one registry per app (so that several apps in a process don't mix).

Counters and histograms are updated where things happen (requests, generations, loads); queue depth and
loaded models are read from the model manager when Prometheus scrapes.
"""

from __future__ import annotations

from collections.abc import Iterator

from litestar import Controller, Response, get
from litestar.di import NamedDependency
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from proxy.manager import ModelManager
from proxy.security import Access, requires

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class ManagerCollector(Collector):
    """Queue depth, requests in flight and loaded models, read from the manager at scrape time."""

    def __init__(self, manager: ModelManager) -> None:
        self.manager = manager

    def collect(self) -> Iterator[GaugeMetricFamily]:
        queued = GaugeMetricFamily("clemproxy_queued_requests", "Requests waiting for a model", labels=["model"])
        running = GaugeMetricFamily("clemproxy_running_requests", "Requests generating", labels=["model"])
        loaded = GaugeMetricFamily("clemproxy_model_loaded", "1 when the model is loaded", labels=["model"])
        memory = GaugeMetricFamily("clemproxy_model_bytes", "Weights in memory of a loaded model", labels=["model"])
        for name, slot in self.manager.slots():
            queued.add_metric([name], slot.queue.queued)
            running.add_metric([name], len(slot.queue.running))
            loaded.add_metric([name], 1 if slot.is_loaded else 0)
            memory.add_metric([name], slot.model_bytes if slot.is_loaded else 0)
        yield from (queued, running, loaded, memory)


class Metrics:
    """The server's Prometheus metrics; the manager's gauges join once it exists (``watch``), since the manager
    counts into these metrics too."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "clemproxy_requests", "HTTP requests", ["route", "model", "status"], registry=self.registry
        )
        self.latency = Histogram(
            "clemproxy_request_seconds", "Request latency", ["route"], buckets=LATENCY_BUCKETS, registry=self.registry
        )
        self.first_token = Histogram(
            "clemproxy_time_to_first_token_seconds",
            "From the request's turn on the model to its first text",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.tokens = Counter("clemproxy_generated_tokens", "Tokens generated", ["model"], registry=self.registry)
        self.load_seconds = Histogram(
            "clemproxy_model_load_seconds",
            "Model load time",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.load_failures = Counter(
            "clemproxy_model_load_failures", "Failed model loads", ["model"], registry=self.registry
        )

    def watch(self, manager: ModelManager) -> None:
        self.registry.register(ManagerCollector(manager))


class MetricsController(Controller):
    path = "/metrics"
    include_in_schema = False
    opt = requires(Access.ADMIN)

    @get("/")
    async def metrics(self, metrics: NamedDependency[Metrics]) -> Response[bytes]:
        return Response(
            content=generate_latest(metrics.registry), media_type="text/plain; version=0.0.4; charset=utf-8"
        )
