"""Aggregate metrics over a run's requests, defined as vLLM's ``benchmark_serving.py`` defines them.

- request throughput: completed requests / benchmark duration;
- output token throughput: usage-reported completion tokens / duration; total adds the prompt tokens;
- TTFT and end-to-end latency: one value per completed request;
- TPOT: ``(latency - ttft) / (output_tokens - 1)`` per completed request with more than one output token;
- ITL: every gap between content chunks, over all completed requests.

Each latency is summarised in milliseconds by mean, median, std (population) and the chosen percentiles
(linear interpolation, as ``numpy.percentile``). An empty list summarises to zeros.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field

from server.bench.stream import RequestOutput

LATENCY_METRICS = ("ttft", "tpot", "itl", "e2el")


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0..100) with linear interpolation between closest ranks; 0 for no values."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100.0
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


@dataclass
class Distribution:
    """Summary of one latency, in milliseconds; ``percentiles`` maps 99.0 -> p99."""

    mean: float = 0.0
    median: float = 0.0
    std: float = 0.0
    percentiles: dict[float, float] = field(default_factory=dict)

    @classmethod
    def of(cls, seconds: Sequence[float], percentiles: Sequence[float]) -> Distribution:
        """Summarise values given in seconds."""
        ms = [s * 1000.0 for s in seconds]
        if not ms:
            return cls(percentiles={p: 0.0 for p in percentiles})
        return cls(
            mean=statistics.fmean(ms),
            median=statistics.median(ms),
            std=statistics.pstdev(ms),
            percentiles={p: percentile(ms, p) for p in percentiles},
        )


@dataclass
class BenchmarkMetrics:
    """The run's totals, rates and latency summaries (``latency`` keyed by ttft, tpot, itl, e2el)."""

    completed: int
    failed: int
    duration: float
    total_input: int
    total_output: int
    request_throughput: float
    output_throughput: float
    total_token_throughput: float
    latency: dict[str, Distribution]
    usage_reported: int = 0  # completed requests whose token counts came from the server's usage chunk


def time_per_output_token(output: RequestOutput) -> float | None:
    """``(latency - ttft) / (output_tokens - 1)``; None with fewer than two output tokens."""
    if output.output_tokens < 2:
        return None
    return (output.latency - output.ttft) / (output.output_tokens - 1)


def calculate_metrics(outputs: Sequence[RequestOutput], duration: float,
                      percentiles: Sequence[float]) -> BenchmarkMetrics:
    """Aggregate ``outputs`` (failed ones count only as failures) over a run of ``duration`` seconds."""
    done = [o for o in outputs if o.success]
    total_input = sum(o.prompt_len for o in done)
    total_output = sum(o.output_tokens for o in done)
    tpots = [t for t in map(time_per_output_token, done) if t is not None]
    samples = {
        "ttft": [o.ttft for o in done],
        "tpot": tpots,
        "itl": [gap for o in done for gap in o.itl],
        "e2el": [o.latency for o in done],
    }
    per_second = 1.0 / duration if duration > 0 else 0.0
    return BenchmarkMetrics(
        completed=len(done),
        failed=len(outputs) - len(done),
        duration=duration,
        total_input=total_input,
        total_output=total_output,
        request_throughput=len(done) * per_second,
        output_throughput=total_output * per_second,
        total_token_throughput=(total_input + total_output) * per_second,
        latency={name: Distribution.of(samples[name], percentiles) for name in LATENCY_METRICS},
        usage_reported=sum(o.usage_reported for o in done),
    )
