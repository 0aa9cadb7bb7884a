"""Running a benchmark: pace the requests, bound their concurrency, collect the outputs and metrics."""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import datetime

import httpx
from tqdm import tqdm

from server.bench.arrivals import arrival_schedule, paced
from server.bench.client import build_payload, first_model_id, make_client, send_request
from server.bench.config import BenchmarkConfig, rate_label
from server.bench.datasets import SampleRequest, load_requests
from server.bench.metrics import BenchmarkMetrics, calculate_metrics
from server.bench.stream import RequestOutput


@dataclass
class BenchmarkResult:
    """One run at one request rate: its config, the model it hit, the metrics and every request's output."""

    config: BenchmarkConfig
    model: str
    metrics: BenchmarkMetrics
    outputs: list[RequestOutput]
    date: str

    @property
    def first_error(self) -> str | None:
        """The first failed request's error message, if any request failed."""
        return next((o.error for o in self.outputs if not o.success), None)


def run_benchmark(config: BenchmarkConfig) -> BenchmarkResult:
    """Run one benchmark at ``config.request_rate`` (blocking; starts its own event loop)."""
    return asyncio.run(benchmark(config))


def run_benchmarks(config: BenchmarkConfig, rates: Sequence[float],
                   on_result: Callable[[BenchmarkResult], None] | None = None) -> list[BenchmarkResult]:
    """One run per rate, in order, on the same prompts (blocking); ``on_result`` sees each as it ends."""
    return asyncio.run(benchmark_rates(config, rates, on_result))


async def benchmark(config: BenchmarkConfig) -> BenchmarkResult:
    """Run one benchmark at ``config.request_rate``."""
    return (await benchmark_rates(config, [config.request_rate]))[0]


async def benchmark_rates(config: BenchmarkConfig, rates: Sequence[float],
                          on_result: Callable[[BenchmarkResult], None] | None = None) -> list[BenchmarkResult]:
    """One run per rate on the same prompts, model and HTTP client; ``BenchError`` on unusable input."""
    configs = [replace(config, request_rate=rate) for rate in rates]
    for each in configs:
        each.validate()
    requests = load_requests(config)
    if len(requests) < config.num_prompts:
        print(f"warning: the dataset has {len(requests)} usable prompts; sending those, not {config.num_prompts}",
              file=sys.stderr)
    async with make_client(config) as client:
        model = config.model or await first_model_id(client, config.root_url)
        results = []
        for each in configs:
            results.append(await _run_once(client, each, model, requests))
            if on_result is not None:
                on_result(results[-1])
    return results


async def _run_once(client: httpx.AsyncClient, config: BenchmarkConfig, model: str,
                    requests: Sequence[SampleRequest]) -> BenchmarkResult:
    date = datetime.now().strftime("%Y%m%d-%H%M%S")
    outputs, duration = await _send_all(client, config, model, requests)
    metrics = calculate_metrics(outputs, duration, config.metric_percentiles)
    return BenchmarkResult(config, model, metrics, outputs, date)


async def _send_all(client: httpx.AsyncClient, config: BenchmarkConfig, model: str,
                    requests: Sequence[SampleRequest]) -> tuple[list[RequestOutput], float]:
    """Send every request on its arrival schedule; the outputs in request order and the duration."""
    schedule = arrival_schedule(len(requests), config.request_rate, config.burstiness, config.seed)
    limit = asyncio.Semaphore(config.max_concurrency) if config.max_concurrency else None
    bar = tqdm(total=len(requests), desc=f"rate {rate_label(config.request_rate)}", unit="req",
               disable=config.disable_tqdm)
    start = time.perf_counter()

    async def one(request: SampleRequest) -> RequestOutput:
        async with limit or contextlib.nullcontext():
            send_time = time.perf_counter() - start
            payload = build_payload(config, model, request)
            output = await send_request(client, config.url, payload, request.prompt_len)
        output.send_time = send_time
        bar.update(1)
        return output

    tasks = []
    try:
        async for request in paced(requests, schedule):
            tasks.append(asyncio.create_task(one(request)))
        outputs = list(await asyncio.gather(*tasks))
    finally:
        for task in tasks:
            task.cancel()
        bar.close()
    return outputs, time.perf_counter() - start
