"""A benchmark client for OpenAI-compatible servers: ``python -m server.bench --base-url URL``.

Drives ``/v1/completions`` (or ``/v1/chat/completions``) with streaming requests at a chosen rate and
reports what vLLM's ``benchmark_serving.py`` reports: throughput, TTFT, TPOT, ITL and end-to-end latency,
from the token counts the server puts in its usage chunk. Programmatic use::

    from server.bench import BenchmarkConfig, run_benchmark

    result = run_benchmark(BenchmarkConfig(base_url="http://127.0.0.1:8000", num_prompts=8))
    print(result.metrics.output_throughput)

Only httpx and tqdm are needed; ``--plot`` also needs matplotlib.
"""

from __future__ import annotations

from server.bench.config import BenchError, BenchmarkConfig
from server.bench.runner import BenchmarkResult, benchmark, run_benchmark, run_benchmarks

__all__ = ["BenchError", "BenchmarkConfig", "BenchmarkResult", "benchmark", "run_benchmark", "run_benchmarks"]
