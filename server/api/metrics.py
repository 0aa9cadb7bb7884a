"""Prometheus metrics under the ``jetmoe:`` prefix, with the names vLLM users already chart.

Engine gauges and counters are read from ``engine.stats()`` at scrape time by a custom collector; token
counters, finished requests and latency histograms are recorded by the API as outputs stream by.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from server.engine.async_engine import AsyncEngine
from server.engine.request import RequestOutput

PREFIX = "jetmoe:"
_LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                    20.0, 40.0, 80.0)
_E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
                240.0, 480.0, 960.0)


class EngineStatsCollector(Collector):
    """Gauges and counters the engine keeps itself, read when Prometheus scrapes."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine

    def collect(self) -> Iterator[Metric]:
        stats = self.engine.stats()
        yield GaugeMetricFamily(f"{PREFIX}num_requests_running", "Sequences in the running batch.",
                                value=stats.num_running)
        yield GaugeMetricFamily(f"{PREFIX}num_requests_waiting", "Sequences waiting to be scheduled.",
                                value=stats.num_waiting)
        yield GaugeMetricFamily(f"{PREFIX}kv_cache_usage_perc", "Fraction of KV cache blocks in use (0..1).",
                                value=stats.kv_cache_usage)
        yield CounterMetricFamily(f"{PREFIX}prefix_cache_queries", "Prompt tokens looked up in the prefix cache.",
                                  value=stats.prefix_cache_queries)
        yield CounterMetricFamily(f"{PREFIX}prefix_cache_hits", "Prompt tokens found in the prefix cache.",
                                  value=stats.prefix_cache_hits)
        yield CounterMetricFamily(f"{PREFIX}num_preemptions", "Sequences preempted (recomputed later).",
                                  value=stats.num_preemptions)


class ServerMetrics:
    """One registry per app, so several apps (tests) never share counters."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(EngineStatsCollector(engine))
        reg = self.registry
        self.prompt_tokens = Counter(f"{PREFIX}prompt_tokens", "Prompt tokens processed.", registry=reg)
        self.generation_tokens = Counter(f"{PREFIX}generation_tokens", "Tokens generated.", registry=reg)
        self.request_success = Counter(f"{PREFIX}request_success", "Finished sequences by finish reason.",
                                       ["finished_reason"], registry=reg)
        self.ttft = Histogram(f"{PREFIX}time_to_first_token_seconds", "Time to the first token.",
                              buckets=_LATENCY_BUCKETS, registry=reg)
        self.itl = Histogram(f"{PREFIX}inter_token_latency_seconds", "Time between consecutive tokens.",
                             buckets=_LATENCY_BUCKETS, registry=reg)
        self.e2e = Histogram(f"{PREFIX}e2e_request_latency_seconds", "Time from arrival to the last token.",
                             buckets=_E2E_BUCKETS, registry=reg)
        self.queue_time = Histogram(f"{PREFIX}request_queue_time_seconds", "Time spent waiting to be scheduled.",
                                    buckets=_E2E_BUCKETS, registry=reg)

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def tracker(self, num_samples: int) -> RequestTracker:
        return RequestTracker(self, num_samples)


class RequestTracker:
    """Records one engine request's tokens and latencies from the deltas it yields."""

    def __init__(self, metrics: ServerMetrics, num_samples: int) -> None:
        self.metrics = metrics
        self.num_samples = num_samples
        self.start = time.monotonic()
        self.last_token: dict[int, float] = {}
        self.finished: set[int] = set()

    def observe(self, output: RequestOutput) -> None:
        now, m = time.monotonic(), self.metrics
        count = len(output.new_token_ids)
        if not self.last_token and count:
            m.prompt_tokens.inc(output.num_prompt_tokens)
            m.ttft.observe(now - self.start)
            _observe_queue_time(m, output)
        elif count and output.index in self.last_token:
            gap = (now - self.last_token[output.index]) / count
            for _ in range(count):
                m.itl.observe(gap)
        if count:
            m.generation_tokens.inc(count)
            self.last_token[output.index] = now
        if output.finished and output.index not in self.finished:
            self.finished.add(output.index)
            m.request_success.labels(finished_reason=output.finish_reason or "stop").inc()
            if len(self.finished) == self.num_samples:
                m.e2e.observe(now - self.start)

    def close(self, reason: str) -> None:
        """The request ended early (``abort`` or ``error``): count its unfinished samples."""
        for index in range(self.num_samples):
            if index not in self.finished:
                self.finished.add(index)
                self.metrics.request_success.labels(finished_reason=reason).inc()


def _observe_queue_time(metrics: ServerMetrics, output: RequestOutput) -> None:
    queue_time = output.queue_time
    if queue_time is not None:
        metrics.queue_time.observe(queue_time)
