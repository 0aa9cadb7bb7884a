"""Serving benchmark: our server over HTTP against our offline engine and transformers, in one run.

    python -m benchmarks.bench_serve [--num-requests 64] [--skip-transformers] [--skip-latency]

Throughput, on the engine benchmark's workload (``benchmarks.bench_engine``: 64 requests at once, prompts of
9-121 token ids, outputs of 16-256 tokens with ``ignore_eos``, greedy, the random benchmark JetMoe in fp32):
- ours over HTTP: ``python -m server`` (engine core in its own process), 64 concurrent ``/v1/completions``
  requests with token-id prompts; and the same server with ``--engine-in-process`` (one process, one GIL);
- ours offline: ``LLMEngine`` in this process;
- transformers ``generate`` (padded batch) and ``generate_batch`` (continuous batching), in this process;
- ``transformers serve --continuous-batching`` on the same checkpoint (needs ``pip install accelerate``): text
  prompts (it takes no token ids and has no ``ignore_eos``), so its useful tokens are the completion tokens it
  reports, each capped at the request's ``max_tokens``.

Latency: time to first token and inter-token latency p50/p99 of 16 streaming requests (prompts of 64 tokens,
128 tokens each), alone and while 4 prompts of 1,500 tokens arrive once the streams are running.

Every system runs once after a warm-up; run it on an idle machine (the load average is printed).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import torch

from benchmarks.bench_engine import (
    Workload,
    build_checkpoint,
    engine_config,
    fresh_hf,
    make_workload,
    run_generate_batch,
    run_hf_generate,
    run_ours,
)
from model.loader import load_model
from model.tokenizer import Tokenizer
from tests.support.checkpoints import BENCH_SHAPE

NAME = "bench"
STREAMS, STREAM_PROMPT, STREAM_TOKENS = 16, 64, 128
LONG_PROMPTS, LONG_LEN = 4, 1500


def log(message: str) -> None:
    print(f"[bench_serve] {message}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def running(cmd: list[str], url: str, timeout: float = 300) -> Iterator[None]:
    """A server subprocess, up once ``/v1/models`` answers; stopped on exit."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + timeout
        while True:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/v1/models", timeout=5).status_code == 200:
                    break
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{cmd[:3]} did not start (exit {proc.poll()})")
            time.sleep(0.5)
        yield
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def our_server(directory: str, port: int, work: Workload, *extra: str) -> list[str]:
    config = engine_config(directory, work)
    return [sys.executable, "-m", "server", "--model", directory, "--port", str(port), "--device", "cpu",
            "--dtype", "float32", "--served-model-name", NAME, "--num-kv-blocks", str(config.num_kv_blocks),
            "--max-num-seqs", "64", "--log-level", "warning", *extra]


async def _complete(http: httpx.AsyncClient, body: dict) -> int:
    response = await http.post("/v1/completions", json=body)
    response.raise_for_status()
    return min(int(response.json()["usage"]["completion_tokens"]), body["max_tokens"])


async def http_workload(url: str, work: Workload, prompts: list[str | list[int]], exact: bool,
                        model: str = NAME) -> tuple[float, int]:
    """Every request at once; (seconds, useful tokens)."""
    limits = httpx.Limits(max_connections=len(prompts) + 8)
    async with httpx.AsyncClient(base_url=url, timeout=3600, limits=limits) as http:
        extra = {"ignore_eos": True} if exact else {}
        bodies = [{"model": model, "prompt": p, "max_tokens": n, "temperature": 0, **extra}
                  for p, n in zip(prompts, work.max_tokens)]
        started = time.perf_counter()
        counts = await asyncio.gather(*(_complete(http, b) for b in bodies))
        seconds = time.perf_counter() - started
    if exact and list(counts) != work.max_tokens:
        raise RuntimeError("a request did not get exactly max_tokens tokens")
    return seconds, sum(counts)


@dataclass
class StreamTimes:
    ttft: list[float]
    itl: list[float]


async def _stream(http: httpx.AsyncClient, prompt: list[int], tokens: int, times: StreamTimes,
                  running: asyncio.Event | None = None) -> None:
    body = {"model": NAME, "prompt": prompt, "max_tokens": tokens, "temperature": 0, "ignore_eos": True,
            "stream": True}
    started = time.perf_counter()
    last: float | None = None
    async with http.stream("POST", "/v1/completions", json=body) as response:
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            now = time.perf_counter()
            if last is None:
                times.ttft.append(now - started)
            else:
                times.itl.append(now - last)
            last = now
            if running is not None:
                running.set()


async def latency_run(url: str, vocab: int, with_long: bool) -> StreamTimes:
    rng = random.Random(1)
    streams = [[rng.randrange(3, vocab) for _ in range(STREAM_PROMPT)] for _ in range(STREAMS)]
    longs = [[rng.randrange(3, vocab) for _ in range(LONG_LEN)] for _ in range(LONG_PROMPTS)]
    times, long_times = StreamTimes([], []), StreamTimes([], [])
    async with httpx.AsyncClient(base_url=url, timeout=600) as http:
        events = [asyncio.Event() for _ in streams]
        tasks = [asyncio.create_task(_stream(http, p, STREAM_TOKENS, times, e)) for p, e in zip(streams, events)]
        if with_long:
            await asyncio.gather(*(e.wait() for e in events))
            await asyncio.sleep(0.2)
            tasks += [asyncio.create_task(_stream(http, p, 8, long_times)) for p in longs]
        await asyncio.gather(*tasks)
    return times


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def throughput_rows(directory: str, work: Workload, args: argparse.Namespace) -> list[tuple[str, float, int, str]]:
    rows: list[tuple[str, float, int, str]] = []
    useful = work.useful_tokens
    flags = tuple(args.server_flags.split())
    for label, extra in (("ours over HTTP (engine-core process)", flags),
                         ("ours over HTTP, --engine-in-process", ("--engine-in-process", *flags))):
        port = free_port()
        with running(our_server(directory, port, work, *extra), f"http://127.0.0.1:{port}"):
            url = f"http://127.0.0.1:{port}"
            asyncio.run(http_workload(url, Workload(work.prompts[:8], [16] * 8), work.prompts[:8], True))
            seconds, _ = asyncio.run(http_workload(url, work, work.prompts, True))
        rows.append((label, seconds, useful, " ".join(extra) or "default flags"))
        log(f"{label}: {seconds:.2f} s")
    model = load_model(directory, dtype="float32", device="cpu")
    tokenizer = Tokenizer.from_dir(directory)
    config = engine_config(directory, work)
    run_ours(config, model, tokenizer, Workload(work.prompts[:8], [16] * 8))
    started = time.perf_counter()
    run_ours(config, model, tokenizer, work)
    rows.append(("ours offline (LLMEngine)", time.perf_counter() - started, useful, "same process, no HTTP"))
    log(f"offline: {rows[-1][1]:.2f} s")
    if args.skip_transformers:
        return rows
    for label, run in (("transformers generate (padded)", run_hf_generate),
                       ("transformers generate_batch (CB)", run_generate_batch)):
        hf = fresh_hf(directory)  # a fresh copy each: continuous batching switches the attention implementation
        run(hf, Workload(work.prompts[:8], [16] * 8))
        started = time.perf_counter()
        run(hf, work)
        rows.append((label, time.perf_counter() - started, useful, ""))
        log(f"{label}: {rows[-1][1]:.2f} s")
    rows.append(transformers_serve(directory, work, tokenizer))
    return rows


def transformers_serve(directory: str, work: Workload, tokenizer: Tokenizer) -> tuple[str, float, int, str]:
    label = "transformers serve --continuous-batching"
    script = shutil.which("transformers", path=str(Path(sys.executable).parent))
    if script is None:
        return (label, float("nan"), 0, "not installed")
    port = free_port()
    cmd = [script, "serve", directory, "--device", "cpu", "--dtype", "float32", "--port", str(port),
           "--continuous-batching", "--cb-block-size", "64", "--cb-num-blocks", "1024", "--cb-max-batch-tokens",
           "2048", "--log-level", "warning"]
    texts: list[str | list[int]] = [tokenizer.decode(p) for p in work.prompts]
    try:
        with running(cmd, f"http://127.0.0.1:{port}"):
            url = f"http://127.0.0.1:{port}"
            asyncio.run(http_workload(url, Workload(work.prompts[:8], [16] * 8), texts[:8], False, directory))
            seconds, tokens = asyncio.run(http_workload(url, work, texts, False, directory))
    except Exception as exc:  # a baseline that fails is reported, not fatal
        return (label, float("nan"), 0, f"failed: {type(exc).__name__}: {exc}"[:160])
    log(f"transformers serve: {seconds:.2f} s")
    return (label, seconds, tokens, "text prompts; tokens as reported, capped at max_tokens")


def latency_table(directory: str, work: Workload, extra: tuple[str, ...]) -> list[str]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    lines = []
    with running(our_server(directory, port, work, *extra), url):
        asyncio.run(latency_run(url, BENCH_SHAPE.vocab_size, False))  # warm-up
        alone = asyncio.run(latency_run(url, BENCH_SHAPE.vocab_size, False))
        loaded = asyncio.run(latency_run(url, BENCH_SHAPE.vocab_size, True))
    base = pct(alone.itl, 0.5)
    for label, t in (("16 streams alone", alone), (f"while {LONG_PROMPTS} prompts of {LONG_LEN} arrive", loaded)):
        lines.append(f"| {label} | {pct(t.ttft, 0.5) * 1e3:.0f} | {pct(t.ttft, 0.99) * 1e3:.0f} | "
                     f"{pct(t.itl, 0.5) * 1e3:.1f} | {pct(t.itl, 0.99) * 1e3:.1f} | {pct(t.itl, 0.99) / base:.2f}x |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-requests", type=int, default=64)
    parser.add_argument("--skip-transformers", action="store_true")
    parser.add_argument("--skip-latency", action="store_true")
    parser.add_argument("--skip-throughput", action="store_true")
    parser.add_argument("--server-flags", default="", help="extra flags for our server (e.g. a token budget)")
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    load = os.getloadavg()[0]
    work = make_workload(args.num_requests, BENCH_SHAPE.vocab_size)
    extra = tuple(args.server_flags.split())
    with tempfile.TemporaryDirectory() as directory:
        build_checkpoint(directory)
        if not args.skip_throughput:
            rows = throughput_rows(directory, work, args)
            print(f"\n## Serving benchmark: {len(work.prompts)} requests, useful {work.useful_tokens} tokens, "
                  f"{os.cpu_count()} CPUs, load {load:.2f} at start\n")
            generate = next((r for r in rows if r[0].startswith("transformers generate (")), None)
            print("| system | wall s | useful tok/s | x generate | note |")
            print("|---|---:|---:|---:|---|")
            for label, seconds, tokens, note in rows:
                rate = tokens / seconds if seconds == seconds and seconds > 0 else float("nan")
                ratio = rate / (generate[2] / generate[1]) if generate else float("nan")
                print(f"| {label} | {seconds:.2f} | {rate:.0f} | {ratio:.2f}x | {note} |")
        if not args.skip_latency:
            print(f"\n## Latency: {STREAMS} streams of {STREAM_TOKENS} tokens (prompts of {STREAM_PROMPT}), "
                  f"server flags: {' '.join(extra) or 'defaults'}\n")
            print("| run | TTFT p50 ms | TTFT p99 ms | ITL p50 ms | ITL p99 ms | ITL p99 / p50 alone |")
            print("|---|---:|---:|---:|---:|---:|")
            for line in latency_table(directory, work, extra):
                print(line)
    print(f"\nload average {load:.2f} at start, {os.getloadavg()[0]:.2f} at end")


if __name__ == "__main__":
    main()
