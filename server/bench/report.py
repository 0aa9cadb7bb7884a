"""Results for people and programs: vLLM's result table, a per-rate summary, and the JSON record."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from server.bench.config import BenchError, percentile_label, rate_label
from server.bench.metrics import LATENCY_METRICS
from server.bench.runner import BenchmarkResult

WIDTH = 50
SECTIONS = {
    "ttft": ("Time to First Token", "TTFT"),
    "tpot": ("Time per Output Token (excl. 1st token)", "TPOT"),
    "itl": ("Inter-token Latency", "ITL"),
    "e2el": ("End-to-end Latency", "E2EL"),
}


def _row(label: str, value: Any) -> str:
    text = f"{value:.2f}" if isinstance(value, float) else str(value)
    return f"{label + ':':<40} {text:<10}"


def format_table(result: BenchmarkResult) -> str:
    """The table vLLM's benchmark prints (plus failures, std and the first error)."""
    m, config = result.metrics, result.config
    lines = [" Serving Benchmark Result ".center(WIDTH, "=")]
    lines += [
        _row("Successful requests", m.completed),
        _row("Failed requests", m.failed),
        _row("Request rate configured (RPS)", rate_label(config.request_rate)),
        _row("Maximum request concurrency", config.max_concurrency or "unlimited"),
        _row("Benchmark duration (s)", m.duration),
        _row("Total input tokens", m.total_input),
        _row("Total generated tokens", m.total_output),
        _row("Request throughput (req/s)", m.request_throughput),
        _row("Output token throughput (tok/s)", m.output_throughput),
        _row("Total token throughput (tok/s)", m.total_token_throughput),
    ]
    for name in LATENCY_METRICS:
        title, short = SECTIONS[name]
        dist = m.latency[name]
        lines.append(f" {title} ".center(WIDTH, "-"))
        lines += [_row(f"Mean {short} (ms)", dist.mean), _row(f"Median {short} (ms)", dist.median),
                  _row(f"Std {short} (ms)", dist.std)]
        lines += [_row(f"{percentile_label(p).upper()} {short} (ms)", v) for p, v in dist.percentiles.items()]
    lines.append("=" * WIDTH)
    if m.completed and m.usage_reported < m.completed:
        lines.append(f"Note: {m.completed - m.usage_reported} request(s) had no usage chunk; "
                     "their output tokens are counted as content chunks.")
    if result.first_error:
        lines.append(f"First error: {result.first_error}")
    return "\n".join(lines)


def format_summary(results: Sequence[BenchmarkResult]) -> str:
    """One line per request rate: throughput and median/p99 latencies, for comparing rates at a glance."""
    header = (f"{'rate':>6} {'ok':>5} {'fail':>5} {'req/s':>8} {'out tok/s':>10} {'TTFT p50':>9} "
              f"{'TTFT p99':>9} {'TPOT p50':>9} {'TPOT p99':>9} {'E2E p50':>9}   (latencies in ms)")
    lines = [header]
    for r in results:
        m, lat = r.metrics, r.metrics.latency
        p99 = {name: _top_percentile(r, name) for name in ("ttft", "tpot")}
        lines.append(f"{rate_label(r.config.request_rate):>6} {m.completed:>5} {m.failed:>5} "
                     f"{m.request_throughput:>8.2f} {m.output_throughput:>10.2f} {lat['ttft'].median:>9.2f} "
                     f"{p99['ttft']:>9.2f} {lat['tpot'].median:>9.2f} {p99['tpot']:>9.2f} {lat['e2el'].median:>9.2f}")
    return "\n".join(lines)


def _top_percentile(result: BenchmarkResult, name: str) -> float:
    """The highest requested percentile of ``name`` (p99 by default)."""
    values = result.metrics.latency[name].percentiles
    return values[max(values)] if values else 0.0


def result_json(result: BenchmarkResult) -> dict[str, Any]:
    """The JSON record, with vLLM's field names (per-request ``ttfts``/``itls``/``e2els`` in seconds)."""
    m, config = result.metrics, result.config
    record: dict[str, Any] = {
        "date": result.date,
        "endpoint_type": "openai-chat" if config.endpoint == "chat" else "openai",
        "base_url": config.root_url,
        "model_id": result.model,
        "dataset_name": config.dataset_name,
        "num_prompts": len(result.outputs),
        "request_rate": "inf" if math.isinf(config.request_rate) else config.request_rate,
        "burstiness": config.burstiness,
        "max_concurrency": config.max_concurrency,
        "seed": config.seed,
        "ignore_eos": config.ignore_eos,
        "duration": m.duration,
        "completed": m.completed,
        "failed": m.failed,
        "total_input_tokens": m.total_input,
        "total_output_tokens": m.total_output,
        "request_throughput": m.request_throughput,
        "output_throughput": m.output_throughput,
        "total_token_throughput": m.total_token_throughput,
        "usage_reported": m.usage_reported,
        "first_error": result.first_error,
    }
    for name in LATENCY_METRICS:
        dist = m.latency[name]
        record.update({f"mean_{name}_ms": dist.mean, f"median_{name}_ms": dist.median,
                       f"std_{name}_ms": dist.std})
        record.update({f"{percentile_label(p)}_{name}_ms": v for p, v in dist.percentiles.items()})
    outputs = result.outputs
    record.update({
        "input_lens": [o.prompt_len for o in outputs],
        "output_lens": [o.output_tokens for o in outputs],
        "ttfts": [o.ttft for o in outputs],
        "itls": [o.itl for o in outputs],
        "e2els": [o.latency for o in outputs],
        "errors": [o.error for o in outputs],
    })
    return record


def save_results(path: str | Path, results: Sequence[BenchmarkResult]) -> None:
    """One run: its record (as vLLM saves it); several rates: ``{"runs": [record, ...]}``."""
    records = [result_json(r) for r in results]
    payload: Any = records[0] if len(records) == 1 else {"runs": records}
    try:
        Path(path).write_text(json.dumps(payload) + "\n", encoding="utf-8")
    except OSError as exc:
        raise BenchError(f"cannot write {str(path)!r}: {exc.strerror or exc}") from None
