"""Overload: ``max_queued_requests`` bounds the waiting queue; a burst of 4x that many gets 429s at once for
the excess, every accepted request completes with the greedy reference text, and memory stays bounded."""

from __future__ import annotations

import asyncio
import json
import threading
import time

import httpx
import psutil
import pytest

from model.tokenizer import Tokenizer
from server.api import ServerSettings
from tests.support.live_server import SERVED_NAME, greedy_reference, live_server

QUEUE = 4
BURST = 4 * QUEUE
PROMPTS = ["The quick brown fox", "Hello, world! How are you today?", "Once upon a time there was",
           "I love reading books", "def main(argv):", "import os\nimport sys\n", "The model answered",
           "Hello, world!"]


@pytest.fixture(scope="module")
def busy_server(engine_checkpoint):
    """One sequence runs at a time, at most QUEUE requests wait."""
    settings = ServerSettings(served_model_name=SERVED_NAME, max_queued_requests=QUEUE)
    with live_server(engine_checkpoint[0], settings, max_num_seqs=1, num_kv_blocks=128) as server:
        yield server


@pytest.fixture(scope="module")
def references(engine_checkpoint):
    tokenizer = Tokenizer.from_dir(engine_checkpoint[0])
    refs = {p: greedy_reference(engine_checkpoint[1], tokenizer, tokenizer.encode(p), 10) for p in PROMPTS}
    return {p: r for p, r in refs.items() if r.max_tokens > 0}


class Blocker:
    """A long streaming request holding the only running slot until ``release``."""

    def __init__(self, url: str) -> None:
        self.client = httpx.Client(base_url=url, timeout=60)
        body = {"prompt": "block", "max_tokens": 480, "ignore_eos": True, "stream": True}
        self.stream = self.client.stream("POST", "/v1/completions", json=body)
        response = self.stream.__enter__()
        assert response.status_code == 200
        self.lines = response.iter_lines()
        assert next(line for line in self.lines if line.startswith("data: "))

    def release(self) -> None:
        self.stream.__exit__(None, None, None)
        self.client.close()


async def _one(client: httpx.AsyncClient, i: int, prompt: str, max_tokens: int,
               rejected: list[int]) -> tuple[int, str, float]:
    """(status, text, seconds to the status line) of one request; odd ones stream, every third is chat."""
    started = time.monotonic()
    stream = i % 2 == 1
    body = {"max_tokens": max_tokens, "temperature": 0, "stream": stream}
    if i % 3 == 0:
        path = "/v1/chat/completions"
        body["messages"] = [{"role": "user", "content": prompt}]
    else:
        path = "/v1/completions"
        body["prompt"] = prompt
    async with client.stream("POST", path, json=body) as response:
        elapsed = time.monotonic() - started
        if response.status_code != 200:
            rejected.append(i)
            await response.aread()
            assert response.json()["error"]["code"] == "queue_full", response.text
            return response.status_code, "", elapsed
        if not stream:
            choice = json.loads(await response.aread())["choices"][0]
            return 200, choice["message"]["content"] if i % 3 == 0 else choice["text"], elapsed
        text = ""
        async for line in response.aiter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                choice = json.loads(line[6:])["choices"][0]
                text += choice["delta"].get("content", "") if i % 3 == 0 else choice["text"]
        return 200, text, elapsed


async def _burst(url: str, jobs: list[tuple[int, str, int]], rejected: list[int]) -> list[tuple[int, str, float]]:
    limits = httpx.Limits(max_connections=len(jobs), max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:
        return await asyncio.gather(*(_one(client, i, p, n, rejected) for i, p, n in jobs))


def _reference_texts(server, references) -> dict[tuple[bool, str], str]:
    """Each prompt run alone, as a completion and as a chat (the 'reference run')."""
    texts = {}
    with httpx.Client(base_url=server.url, timeout=60) as http:
        for prompt, ref in references.items():
            body = {"prompt": prompt, "max_tokens": ref.max_tokens, "temperature": 0}
            texts[(False, prompt)] = http.post("/v1/completions", json=body).json()["choices"][0]["text"]
            assert texts[(False, prompt)] == ref.text
            chat = {"messages": [{"role": "user", "content": prompt}], "max_tokens": ref.max_tokens,
                    "temperature": 0}
            texts[(True, prompt)] = http.post("/v1/chat/completions", json=chat).json()["choices"][0][
                "message"]["content"]
    return texts


def _round(server, references, expected) -> list[tuple[int, str, float]]:
    prompts = list(references)
    jobs = [(i, prompts[i % len(prompts)], references[prompts[i % len(prompts)]].max_tokens) for i in range(BURST)]
    blocker = Blocker(server.url)
    peak_waiting = 0
    stop = threading.Event()

    def watch() -> None:
        nonlocal peak_waiting
        while not stop.is_set():
            peak_waiting = max(peak_waiting, server.engine.stats().num_waiting)
            time.sleep(0.002)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    results: list = []
    rejected: list[int] = []  # filled as the 429s arrive
    runner = threading.Thread(target=lambda: results.extend(asyncio.run(_burst(server.url, jobs, rejected))))
    runner.start()
    try:
        # every request is answered (429) or admitted while the blocker still holds the only slot
        deadline = time.monotonic() + 30
        while server.state.num_not_started < QUEUE or len(rejected) < BURST - QUEUE:
            assert time.monotonic() < deadline, (server.state.num_not_started, len(rejected))
            assert len(rejected) <= BURST - QUEUE, "more requests refused than the queue limit implies"
            time.sleep(0.01)
        stats = server.engine.stats()
        assert stats.num_running == 1 and stats.num_waiting <= QUEUE
        assert server.state.num_not_started == QUEUE
    finally:
        blocker.release()
    runner.join(60)
    stop.set()
    watcher.join()
    assert not runner.is_alive() and len(results) == BURST
    assert peak_waiting <= QUEUE
    statuses = [status for status, _, _ in results]
    assert statuses.count(200) == QUEUE and statuses.count(429) == BURST - QUEUE, statuses
    assert all(elapsed < 5 for status, _, elapsed in results if status == 429)
    for (i, prompt, _), (status, text, _) in zip(jobs, results):
        if status == 200:
            assert text == expected[(i % 3 == 0, prompt)], (i, prompt)
    return results


def test_burst_beyond_the_queue_limit(busy_server, references) -> None:
    expected = _reference_texts(busy_server, references)
    process = psutil.Process()
    _round(busy_server, references, expected)  # warm-up: first-use allocations
    rss_before = process.memory_info().rss
    slowest_429 = 0.0
    for _ in range(3):
        results = _round(busy_server, references, expected)
        slowest_429 = max([slowest_429] + [elapsed for status, _, elapsed in results if status == 429])
    growth = process.memory_info().rss - rss_before
    print(f"\noverload: {BURST} requests per burst, queue limit {QUEUE}: {QUEUE} accepted (reference text), "
          f"{BURST - QUEUE} answered 429 within {slowest_429 * 1000:.0f} ms; "
          f"RSS growth over 3 bursts {growth / 2**20:+.1f} MiB")
    assert growth < 64 * 2**20, f"RSS grew by {growth / 2**20:.1f} MiB over 3 bursts"
    state, stats = busy_server.state, busy_server.engine.stats()
    assert state.num_not_started == 0 and state.num_in_flight == 0
    assert stats.num_running == 0 and stats.num_waiting == 0 and stats.kv_cache_usage == 0.0
