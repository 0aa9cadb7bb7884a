"""Command line of ``python -m server.bench``: flags -> ``BenchmarkConfig`` -> runs -> table, JSON, plot."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from server.bench.config import BenchError, BenchmarkConfig, parse_percentiles, parse_rates

EPILOG = """examples:
  python -m server.bench --base-url http://127.0.0.1:8000 --num-prompts 200 --random-input-len 512 \\
      --random-output-len 128 --request-rate 4 --max-concurrency 32 --save-result result.json
  python -m server.bench --base-url http://127.0.0.1:8000 --request-rate 1,2,4,inf --plot rates.png
  python -m server.bench --base-url http://127.0.0.1:8000 --endpoint chat --dataset-name sharegpt \\
      --dataset-path ShareGPT_V3_unfiltered_cleaned_split.json
"""


def build_parser() -> argparse.ArgumentParser:
    """The flags, named as in vLLM's ``benchmark_serving.py`` where both have one."""
    d = BenchmarkConfig()
    p = argparse.ArgumentParser(prog="python -m server.bench", epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                description="Benchmark an OpenAI-compatible server with streaming requests.")
    p.add_argument("--base-url", default=d.base_url, help="server address, with or without /v1 (%(default)s)")
    p.add_argument("--endpoint", choices=["completions", "chat"], default=d.endpoint,
                   help="/v1/completions or /v1/chat/completions (%(default)s)")
    p.add_argument("--model", help="model name to send (default: the first id from GET /v1/models)")
    p.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"),
                   help="bearer token (default: $OPENAI_API_KEY)")
    p.add_argument("--dataset-name", choices=["random", "sharegpt", "jsonl"], default=d.dataset_name)
    p.add_argument("--dataset-path", help="ShareGPT JSON file, or JSONL with a \"prompt\" per line")
    p.add_argument("--num-prompts", type=int, default=d.num_prompts, help="requests per rate (%(default)s)")
    p.add_argument("--random-input-len", type=int, default=d.random_input_len,
                   help="prompt tokens (%(default)s)")
    p.add_argument("--random-output-len", type=int, default=d.random_output_len,
                   help="tokens to generate (%(default)s)")
    p.add_argument("--random-range-ratio", type=float, default=d.random_range_ratio,
                   help="lengths drawn uniformly in [len*(1-r), len*(1+r)] (%(default)s)")
    p.add_argument("--random-vocab-size", type=int, default=d.random_vocab_size,
                   help="random prompt token ids are drawn from [0, N) (%(default)s)")
    p.add_argument("--sharegpt-output-len", type=int, help="output length for every ShareGPT prompt "
                   "(default: the reply's estimated length)")
    p.add_argument("--request-rate", default="inf",
                   help="requests/s, or inf for all at once; several as 1,2,4,inf (%(default)s)")
    p.add_argument("--burstiness", type=float, default=d.burstiness,
                   help="gamma shape of the arrival gaps: 1 is Poisson, <1 burstier (%(default)s)")
    p.add_argument("--max-concurrency", type=int, help="requests in flight at most (default: unlimited)")
    p.add_argument("--ignore-eos", action="store_true", help="send ignore_eos: generate exactly the lengths")
    p.add_argument("--temperature", type=float, default=d.temperature, help="(%(default)s: greedy)")
    p.add_argument("--seed", type=int, default=d.seed, help="seeds prompts and arrival times (%(default)s)")
    p.add_argument("--metric-percentiles", default="99", help="percentiles to report, e.g. 50,90,99")
    p.add_argument("--request-timeout", type=float, default=d.request_timeout,
                   help="seconds per request (%(default)s)")
    p.add_argument("--disable-tqdm", action="store_true", help="no progress bar")
    p.add_argument("--save-result", metavar="FILE.json", help="write the results as JSON")
    p.add_argument("--plot", metavar="FILE.png", help="plot latencies and throughput per request rate")
    return p


def config_from_args(args: argparse.Namespace) -> tuple[BenchmarkConfig, list[float]]:
    """The config (at the first rate) and every rate to run."""
    rates = parse_rates(args.request_rate)
    config = BenchmarkConfig(
        base_url=args.base_url, endpoint=args.endpoint, model=args.model, api_key=args.api_key,
        dataset_name=args.dataset_name, dataset_path=args.dataset_path, num_prompts=args.num_prompts,
        random_input_len=args.random_input_len, random_output_len=args.random_output_len,
        random_range_ratio=args.random_range_ratio, random_vocab_size=args.random_vocab_size,
        sharegpt_output_len=args.sharegpt_output_len, request_rate=rates[0], burstiness=args.burstiness,
        max_concurrency=args.max_concurrency, ignore_eos=args.ignore_eos, temperature=args.temperature,
        seed=args.seed, metric_percentiles=parse_percentiles(args.metric_percentiles),
        request_timeout=args.request_timeout, disable_tqdm=args.disable_tqdm,
    )
    config.validate()
    return config, rates


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; 0 when every run completed some request, 1 otherwise or on an error."""
    args = build_parser().parse_args(argv)
    try:
        config, rates = config_from_args(args)
        return _run(config, rates, args.save_result, args.plot)
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def _run(config: BenchmarkConfig, rates: list[float], save_result: str | None, plot: str | None) -> int:
    from server.bench.plot import plot_results, require_matplotlib
    from server.bench.report import format_summary, format_table, save_results
    from server.bench.runner import run_benchmarks

    if plot:
        require_matplotlib()  # fail before the run, not after it
    results = run_benchmarks(config, rates, on_result=lambda result: print(format_table(result), flush=True))
    if len(results) > 1:
        print(format_summary(results))
    if save_result:
        save_results(save_result, results)
        print(f"results saved to {save_result}")
    if plot:
        plot_results(results, plot)
        print(f"plot saved to {plot}")
    return 0 if all(r.metrics.completed for r in results) else 1
