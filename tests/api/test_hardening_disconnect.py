"""Disconnect storm: 200 concurrent streaming clients, half of which leave at random moments; the others get
their full greedy answers, and afterwards nothing runs and every KV block is free."""

from __future__ import annotations

import asyncio
import json
import random
import time

import httpx
import pytest

from model.tokenizer import Tokenizer
from tests.support.live_server import greedy_reference, live_server
from tests.support.prom import sample as metric

CLIENTS = 200
LEAVER_TOKENS = 40
PROMPTS = ["The quick brown fox", "Hello, world! How are you today?", "Once upon a time there was",
           "I love reading books", "def main(argv):", "The model answered"]


@pytest.fixture(scope="module")
def storm_server(engine_checkpoint):
    with live_server(engine_checkpoint[0], num_kv_blocks=256, max_num_seqs=64) as server:
        yield server


@pytest.fixture(scope="module")
def references(engine_checkpoint):
    tokenizer = Tokenizer.from_dir(engine_checkpoint[0])
    refs = {p: greedy_reference(engine_checkpoint[1], tokenizer, tokenizer.encode(p), 8) for p in PROMPTS}
    return {p: r for p, r in refs.items() if r.max_tokens > 1}


async def _client(http: httpx.AsyncClient, prompt: str, max_tokens: int, drop_after: int | None,
                  drop_before: float | None) -> str | None:
    """The streamed text, or None for a client that left (after ``drop_after`` events or, with
    ``drop_before``, after that many seconds, possibly before any byte of the answer)."""
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True}
    if drop_after is not None or drop_before is not None:
        body.update(max_tokens=LEAVER_TOKENS, ignore_eos=True)  # still generating when its client leaves

    async def run() -> str | None:
        text = ""
        async with http.stream("POST", "/v1/completions", json=body) as response:
            assert response.status_code == 200
            events = 0
            async for line in response.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if drop_after is not None and events >= drop_after:
                    return None  # leaving the block closes the connection mid-stream
                events += 1
                if line != "data: [DONE]":
                    text += json.loads(line[6:])["choices"][0]["text"]
        return text

    if drop_before is None:
        return await run()
    try:
        return await asyncio.wait_for(run(), drop_before)
    except asyncio.TimeoutError:
        return None


async def _storm(url: str, jobs: list) -> list[str | None]:
    limits = httpx.Limits(max_connections=CLIENTS, max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as http:
        return await asyncio.gather(*(_client(http, *job) for job in jobs))


def test_disconnect_storm(storm_server, references) -> None:
    rng = random.Random(1234)
    prompts = list(references)
    jobs = []
    for i in range(CLIENTS):
        prompt = prompts[i % len(prompts)]
        max_tokens = references[prompt].max_tokens
        drop_after = drop_before = None
        if i % 2:  # half the clients leave: most mid-stream, some before the first event
            if rng.random() < 0.8:
                drop_after = rng.randrange(0, LEAVER_TOKENS // 2)
            else:
                drop_before = rng.uniform(0.0, 0.5)
        jobs.append((prompt, max_tokens, drop_after, drop_before))
    with httpx.Client(base_url=storm_server.url, timeout=30) as http:
        aborted_before = metric(http.get("/metrics").text, "jetmoe:request_success_total",
                                finished_reason="abort")
        started = time.monotonic()
        results = asyncio.run(_storm(storm_server.url, jobs))
        elapsed = time.monotonic() - started
        for (prompt, _, drop_after, drop_before), text in zip(jobs, results):
            if drop_after is None and drop_before is None:
                assert text == references[prompt].text, prompt
        completed = sum(text is not None for text in results)
        assert completed >= CLIENTS // 2

        state, engine = storm_server.state, storm_server.engine
        deadline = time.monotonic() + 10
        while not (engine.num_unfinished == 0 and state.num_in_flight == 0 and state.num_not_started == 0
                   and engine.stats().num_running == 0 and engine.stats().num_waiting == 0
                   and engine.stats().kv_cache_usage == 0.0):
            assert time.monotonic() < deadline, (engine.stats(), state.num_in_flight, state.num_not_started)
            time.sleep(0.02)
        text = http.get("/metrics").text
        assert metric(text, "jetmoe:num_requests_running") == 0
        assert metric(text, "jetmoe:num_requests_waiting") == 0
        assert metric(text, "jetmoe:kv_cache_usage_perc") == 0
        aborted = metric(text, "jetmoe:request_success_total", finished_reason="abort") - aborted_before
        # the server still serves normally
        body = {"prompt": prompts[0], "max_tokens": references[prompts[0]].max_tokens, "temperature": 0}
        assert http.post("/v1/completions", json=body).json()["choices"][0]["text"] == references[prompts[0]].text
    print(f"\ndisconnect storm: {CLIENTS} streaming clients in {elapsed:.1f} s, {completed} completed with the "
          f"reference text, {CLIENTS - completed} left early ({aborted:.0f} aborted in the engine); "
          "afterwards 0 running, 0 waiting, KV usage 0")
