"""Prometheus metrics under the ``jetmoe:`` prefix with vLLM's metric names, and optionally under ``vllm:`` too.

Every series carries a ``model_name`` label (the served model name), as vLLM's do, so that Kubernetes LLM
routers (llm-d's endpoint picker, KServe, vLLM's production-stack) can read this server unchanged when the
``vllm:`` names are exported as well (``--export-vllm-metrics``). Engine gauges and counters are read from
``engine.stats()`` at scrape time by a custom collector, with ``cache_config_info`` (block size, number of KV
blocks) as an info-style gauge of value 1; token counters, finished requests and latency histograms are
recorded by the API as outputs stream by.

Speculative decoding (``--speculative-config``) exports vLLM's ``spec_decode_num_drafts``,
``spec_decode_num_draft_tokens`` and ``spec_decode_num_accepted_tokens`` counters (``_total``): the acceptance
rate is accepted / draft tokens, the mean accepted length 1 + accepted / drafts. They stay 0 without it.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from server.engine.client import EngineClient
from server.engine.request import RequestOutput

PREFIX = "jetmoe:"
VLLM_PREFIX = "vllm:"
_LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                    20.0, 40.0, 80.0)
_E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
                240.0, 480.0, 960.0)


class EngineStatsCollector(Collector):
    """Gauges and counters the engine keeps itself, read when Prometheus scrapes, under every prefix."""

    def __init__(self, engine: EngineClient, model_name: str, prefixes: tuple[str, ...],
                 cache_config: Mapping[str, str]) -> None:
        self.engine = engine
        self.model_name = model_name
        self.prefixes = prefixes
        self.cache_config = dict(cache_config)

    def collect(self) -> Iterator[Metric]:
        stats = self.engine.stats()
        gauges = {
            "num_requests_running": ("Sequences in the running batch.", stats.num_running),
            "num_requests_waiting": ("Sequences waiting to be scheduled.", stats.num_waiting),
            "kv_cache_usage_perc": ("Fraction of KV cache blocks in use (0..1).", stats.kv_cache_usage),
        }
        counters = {
            "prefix_cache_queries": ("Prompt tokens looked up in the prefix cache.", stats.prefix_cache_queries),
            "prefix_cache_hits": ("Prompt tokens found in the prefix cache.", stats.prefix_cache_hits),
            "num_preemptions": ("Sequences preempted (recomputed later).", stats.num_preemptions),
            "spec_decode_num_drafts": ("Proposals of speculative tokens verified (one per sequence and step).",
                                       stats.spec_decode_num_drafts),
            "spec_decode_num_draft_tokens": ("Speculative tokens proposed and verified.",
                                             stats.spec_decode_num_draft_tokens),
            "spec_decode_num_accepted_tokens": ("Speculative tokens accepted.", stats.spec_decode_num_accepted_tokens),
        }
        for prefix in self.prefixes:
            if prefix == VLLM_PREFIX:  # the name older routers read
                gauges["gpu_cache_usage_perc"] = ("Fraction of KV cache blocks in use (0..1).", stats.kv_cache_usage)
            for name, (text, value) in gauges.items():
                yield self._family(GaugeMetricFamily, prefix + name, text, value)
            for name, (text, value) in counters.items():
                yield self._family(CounterMetricFamily, prefix + name, text, value)
            info = GaugeMetricFamily(f"{prefix}cache_config_info", "KV cache configuration (value 1).",
                                     labels=["model_name", *self.cache_config])
            info.add_metric([self.model_name, *self.cache_config.values()], 1.0)
            yield info

    def _family(self, kind: type, name: str, text: str, value: float) -> Metric:
        family = kind(name, text, labels=["model_name"])
        family.add_metric([self.model_name], value)
        return family


@dataclass(frozen=True)
class _Series:
    """One prefix's request metrics, with the model name already bound."""

    prompt_tokens: Counter
    generation_tokens: Counter
    request_success: Counter  # labelled by finished_reason still
    ttft: Histogram
    itl: Histogram
    e2e: Histogram
    queue_time: Histogram


def _series(prefix: str, model_name: str, reg: CollectorRegistry) -> _Series:
    label = {"model_name": model_name}

    def histogram(name: str, text: str, buckets: tuple[float, ...]) -> Histogram:
        return Histogram(prefix + name, text, ["model_name"], buckets=buckets, registry=reg).labels(**label)

    return _Series(
        prompt_tokens=Counter(f"{prefix}prompt_tokens", "Prompt tokens processed.", ["model_name"],
                              registry=reg).labels(**label),
        generation_tokens=Counter(f"{prefix}generation_tokens", "Tokens generated.", ["model_name"],
                                  registry=reg).labels(**label),
        request_success=Counter(f"{prefix}request_success", "Finished sequences by finish reason.",
                                ["model_name", "finished_reason"], registry=reg),
        ttft=histogram("time_to_first_token_seconds", "Time to the first token.", _LATENCY_BUCKETS),
        itl=histogram("inter_token_latency_seconds", "Time between consecutive tokens.", _LATENCY_BUCKETS),
        e2e=histogram("e2e_request_latency_seconds", "Time from arrival to the last token.", _E2E_BUCKETS),
        queue_time=histogram("request_queue_time_seconds", "Time spent waiting to be scheduled.", _E2E_BUCKETS),
    )


class ServerMetrics:
    """One registry per app, so several apps (tests) never share counters.

    ``vllm_names`` exports every series under ``vllm:`` as well as ``jetmoe:``; ``cache_config`` becomes the
    labels of ``cache_config_info``.
    """

    def __init__(self, engine: EngineClient, model_name: str, vllm_names: bool = False,
                 cache_config: Mapping[str, str] | None = None) -> None:
        self.model_name = model_name
        self.prefixes = (PREFIX, VLLM_PREFIX) if vllm_names else (PREFIX,)
        self.registry = CollectorRegistry()
        self.registry.register(EngineStatsCollector(engine, model_name, self.prefixes, cache_config or {}))
        self.series = [_series(prefix, model_name, self.registry) for prefix in self.prefixes]

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def tracker(self, num_samples: int) -> RequestTracker:
        return RequestTracker(self, num_samples)

    def finished(self, reason: str) -> None:
        for s in self.series:
            s.request_success.labels(model_name=self.model_name, finished_reason=reason).inc()


class RequestTracker:
    """Records one engine request's tokens and latencies from the deltas it yields."""

    def __init__(self, metrics: ServerMetrics, num_samples: int) -> None:
        self.metrics = metrics
        self.num_samples = num_samples
        self.start = time.monotonic()
        self.last_token: dict[int, float] = {}
        self.finished: set[int] = set()

    def observe(self, output: RequestOutput) -> None:
        now, series = time.monotonic(), self.metrics.series
        count = len(output.new_token_ids)
        if not self.last_token and count:
            for s in series:
                s.prompt_tokens.inc(output.num_prompt_tokens)
                s.ttft.observe(now - self.start)
                if output.queue_time is not None:
                    s.queue_time.observe(output.queue_time)
        elif count and output.index in self.last_token:
            gap = (now - self.last_token[output.index]) / count
            for s in series:
                for _ in range(count):
                    s.itl.observe(gap)
        if count:
            for s in series:
                s.generation_tokens.inc(count)
            self.last_token[output.index] = now
        if output.finished and output.index not in self.finished:
            self.finished.add(output.index)
            self.metrics.finished(output.finish_reason or "stop")
            if len(self.finished) == self.num_samples:
                for s in series:
                    s.e2e.observe(now - self.start)

    def close(self, reason: str) -> None:
        """The request ended early (``abort`` or ``error``): count its unfinished samples."""
        for index in range(self.num_samples):
            if index not in self.finished:
                self.finished.add(index)
                self.metrics.finished(reason)
