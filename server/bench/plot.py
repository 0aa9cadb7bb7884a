"""``--plot FILE.png``: latency percentiles and throughput against the request rate (needs matplotlib)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from server.bench.config import BenchError, percentile_label, rate_label
from server.bench.runner import BenchmarkResult

MISSING = ("--plot needs matplotlib, which is not installed: pip install matplotlib "
           "(or install this package with its 'bench' extra)")
PANELS = (("ttft", "Time to first token"), ("tpot", "Time per output token"), ("e2el", "End-to-end latency"))


def require_matplotlib() -> None:
    """Raise ``BenchError`` with install instructions when matplotlib cannot be imported."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise BenchError(MISSING) from None


def plot_results(results: Sequence[BenchmarkResult], path: str | Path) -> None:
    """A 2x2 figure: TTFT, TPOT and E2E latency (median and percentiles) and throughput, per rate."""
    require_matplotlib()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(11, 8), constrained_layout=True)
    labels = [rate_label(r.config.request_rate) for r in results]
    for ax, (name, title) in zip(axes.flat, PANELS):
        _latency_panel(ax, results, name, title)
    _throughput_panel(axes.flat[3], results)
    for ax in axes.flat:
        ax.set_xticks(range(len(labels)), labels)
        ax.set_xlabel("request rate (req/s)")
        ax.grid(True, alpha=0.3)
    model = results[0].model if results else ""
    fig.suptitle(f"{model}: {len(results[0].outputs) if results else 0} requests per rate")
    try:
        fig.savefig(path, dpi=120)
    except OSError as exc:
        raise BenchError(f"cannot write {str(path)!r}: {exc.strerror or exc}") from None
    finally:
        plt.close(fig)


def _latency_panel(ax: Any, results: Sequence[BenchmarkResult], name: str, title: str) -> None:
    xs = range(len(results))
    dists = [r.metrics.latency[name] for r in results]
    ax.plot(xs, [d.median for d in dists], marker="o", label="median")
    ax.plot(xs, [d.mean for d in dists], marker=".", linestyle=":", label="mean")
    for p in dists[0].percentiles if dists else ():
        ax.plot(xs, [d.percentiles.get(p, 0.0) for d in dists], marker="^", linestyle="--",
                label=percentile_label(p))
    ax.set_title(title)
    ax.set_ylabel("ms")
    ax.legend()


def _throughput_panel(ax: Any, results: Sequence[BenchmarkResult]) -> None:
    xs = range(len(results))
    ax.plot(xs, [r.metrics.output_throughput for r in results], marker="o", color="tab:green",
            label="output tok/s")
    ax.plot(xs, [r.metrics.total_token_throughput for r in results], marker=".", linestyle=":",
            color="tab:olive", label="total tok/s")
    ax.set_ylabel("tokens/s")
    ax.set_title("Throughput")
    twin = ax.twinx()
    twin.plot(xs, [r.metrics.request_throughput for r in results], marker="s", linestyle="--",
              color="tab:purple", label="requests/s")
    twin.set_ylabel("requests/s")
    lines = ax.get_lines() + twin.get_lines()
    ax.legend(lines, [line.get_label() for line in lines], loc="upper left")
