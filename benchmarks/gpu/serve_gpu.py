"""Served throughput over HTTP against the engine's own, on the JetMoe-8B shapes (random weights on the GPU).

``python -m benchmarks.gpu.serve_gpu`` builds one engine (bf16, CUDA graphs, ``--concurrency`` sequences per
step) and runs the same kind of workload twice: ``--num-prompts`` requests of ``--input-len`` random token ids
and exactly ``--output-len`` greedy tokens each (EOS ignored), at most ``--concurrency`` in flight,

- ``engine``: added to ``LLMEngine`` directly and stepped until done (no HTTP, no asyncio);
- ``http``: the same engine behind the real FastAPI app and uvicorn on loopback, driven by ``python -m
  server.bench`` (streaming completions) with ``--max-concurrency``.

A short warm-up runs first. Output tokens per second of each and their ratio: what the HTTP layer, SSE and the engine thread cost. Each run
uses its own prompts (different seeds), so the second never hits the first's prefix cache. The model has the
bundled tokenizer's vocabulary (4096) instead of 32000, so that every id it emits decodes; the rest of the
shapes are JetMoe-8B's. Needs the server's packages (fastapi, uvicorn; carried as wheels to the GPU machine).
``--tiny``: the same on CPU with a 2-layer model and a few short requests, a dry run.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from benchmarks.gpu.bench_gpu import JETMOE_8B, TINY, setup_device
from benchmarks.gpu.recorder import Recorder, Results
from model.bundled import BUNDLED_MODEL_DIR
from model.kernels import KernelChoice, select_kernels
from model.tokenizer import Tokenizer
from server.bench import BenchmarkConfig, run_benchmark
from server.bench.datasets import load_requests
from server.engine.config import EngineConfig
from server.engine.llm_engine import LLMEngine
from server.engine.sampling_params import SamplingParams
from tests.support.checkpoints import random_model


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="dry run on CPU with a 2-layer model")
    parser.add_argument("--concurrency", type=int, default=None, help="sequences in flight (default 64)")
    parser.add_argument("--num-prompts", type=int, default=None, help="requests per run (default 128)")
    parser.add_argument("--input-len", type=int, default=None, help="prompt tokens (default 512)")
    parser.add_argument("--output-len", type=int, default=None, help="output tokens (default 128)")
    parser.add_argument("--json", type=Path, default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)
    defaults = (4, 8, 8, 4) if args.tiny else (64, 128, 512, 128)
    for name, value in zip(("concurrency", "num_prompts", "input_len", "output_len"), defaults):
        if getattr(args, name) is None:
            setattr(args, name, value)
    return args


def workload(args: argparse.Namespace, vocab: int, seed: int) -> BenchmarkConfig:
    return BenchmarkConfig(
        num_prompts=args.num_prompts, random_input_len=args.input_len, random_output_len=args.output_len,
        random_vocab_size=vocab, max_concurrency=args.concurrency, ignore_eos=True, seed=seed,
        disable_tqdm=True,
    )  # fmt: skip


def build_engine(args: argparse.Namespace, device: torch.device) -> LLMEngine:
    tokenizer = Tokenizer.from_dir(BUNDLED_MODEL_DIR)
    config = dataclasses.replace(TINY if args.tiny else JETMOE_8B, vocab_size=tokenizer.vocab_size)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = random_model(config, device, dtype, select_kernels(device, KernelChoice(), dtype, config))
    block_size = 16
    per_seq = -(-(args.input_len + args.output_len) // block_size)
    engine_config = EngineConfig(
        model="random", device=device.type, block_size=block_size, num_kv_blocks=2 * args.concurrency * per_seq,
        max_model_len=args.input_len + args.output_len, max_num_seqs=args.concurrency,
    )  # fmt: skip
    return LLMEngine(engine_config, model, tokenizer)


def run_engine(engine: LLMEngine, config: BenchmarkConfig) -> dict:
    """The workload through ``LLMEngine`` directly: every request added at once, at most ``max_num_seqs`` run."""
    requests = load_requests(config)
    params = SamplingParams(temperature=0, max_tokens=config.random_output_len, ignore_eos=True)
    for i, request in enumerate(requests):
        engine.add_request(f"engine-{config.seed}-{i}", request.prompt, params)  # type: ignore[arg-type]
    tokens, start = 0, time.perf_counter()
    while engine.has_unfinished():
        tokens += sum(len(out.new_token_ids) for out in engine.step())
    seconds = time.perf_counter() - start
    return {"requests": len(requests), "output_tokens": tokens, "seconds": seconds,
            "output_tokens_per_s": tokens / seconds}


def run_http(engine: LLMEngine, config: BenchmarkConfig) -> dict:
    """The workload over HTTP: the real app and uvicorn on loopback, ``server.bench`` as the client."""
    from server.api import ServerSettings, create_app
    from server.engine.async_engine import AsyncEngine
    from tests.support.live_server import serve_app

    async_engine = AsyncEngine(engine)
    async_engine.start()
    app = create_app(async_engine, ServerSettings(served_model_name="jetmoe-8b-random"))
    try:
        with serve_app(app) as url:
            result = run_benchmark(dataclasses.replace(config, base_url=url))
    finally:
        async_engine.shutdown()
    m = result.metrics
    if m.failed:
        raise RuntimeError(f"{m.failed} requests failed, the first: {result.first_error}")
    return {"requests": m.completed, "output_tokens": m.total_output, "seconds": m.duration,
            "output_tokens_per_s": m.output_throughput}


def main(argv: Sequence[str] | None = None) -> Results:
    args = parse_args(argv)
    device = setup_device(args.tiny)
    torch.manual_seed(0)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    rec = Recorder(Results(device=name, shapes={"vocab_size": "bundled tokenizer's"}), args.json)
    rec.results.served["workload"] = {k: getattr(args, k) for k in ("concurrency", "num_prompts", "input_len",
                                                                    "output_len")}
    engine = rec.section("build the engine (random weights, decode graphs)", lambda: build_engine(args, device))
    if engine is None:
        return rec.results
    vocab = engine.tokenizer.vocab_size
    warm = dataclasses.replace(workload(args, vocab, 99), num_prompts=args.concurrency, random_output_len=4)
    rec.section("warm-up (first-use compiles, allocator)", lambda: run_engine(engine, warm))
    for who, fn, seed in (("engine", run_engine, 0), ("http", run_http, 1)):
        row = rec.section(f"{who}: {args.num_prompts} requests, {args.concurrency} in flight",
                          lambda f=fn, s=seed: f(engine, workload(args, vocab, s)))
        if row:
            rec.results.served[who] = row
            print(f"  {who}: {row['output_tokens_per_s']:,.0f} output tok/s ({row['output_tokens']} tokens in "
                  f"{row['seconds']:.1f} s)", flush=True)
            rec.save()
    served = rec.results.served
    if "engine" in served and "http" in served:
        served["http_over_engine"] = served["http"]["output_tokens_per_s"] / served["engine"]["output_tokens_per_s"]
        print(f"served over HTTP / engine: {served['http_over_engine']:.1%}", flush=True)
        rec.save()
    return rec.results


if __name__ == "__main__":
    main()
