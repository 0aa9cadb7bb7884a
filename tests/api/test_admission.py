"""Admission by real cost: the queue limit counts sequences (prompts x n), a request that can never fit is a
400 naming the field, one that does not fit now a 429 with Retry-After, and a small request cannot ask for a
huge answer."""

from __future__ import annotations

import httpx
import pytest

from server.api import ServerSettings
from server.api.generation import MAX_PROMPTS
from tests.support.live_server import SERVED_NAME, live_server

QUEUE = 8


@pytest.fixture(scope="module")
def limited(engine_checkpoint):
    settings = ServerSettings(served_model_name=SERVED_NAME, max_queued_requests=QUEUE, max_response_entries=20_000)
    with live_server(engine_checkpoint[0], settings, max_num_seqs=16) as server, \
            httpx.Client(base_url=server.url, timeout=60) as http:
        yield server, http


def error_of(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return error


@pytest.mark.parametrize(("body", "param"), [
    ({"prompt": ["hi"] * (QUEUE + 1), "max_tokens": 2}, "prompt"),  # a prompt list past the queue limit
    ({"prompt": ["def"] * 2, "n": 5, "max_tokens": 2}, "n"),  # 10 sequences > 8
    ({"prompt": "hi", "best_of": QUEUE + 1, "max_tokens": 2}, "n"),
])
def test_a_request_that_can_never_fit_the_queue_is_a_400(limited, body, param) -> None:
    _, http = limited
    error = error_of(http.post("/v1/completions", json=body), 400)
    assert error["code"] == "too_many_sequences" and error["param"] == param


def test_more_samples_than_a_batch_holds_is_a_400(engine_checkpoint) -> None:
    with live_server(engine_checkpoint[0], max_num_seqs=4) as server:
        response = httpx.post(f"{server.url}/v1/completions", json={"prompt": "hi", "n": 5, "max_tokens": 1})
        error = error_of(response, 400)
        assert error["param"] == "n" and "at most 4" in error["message"]
        too_many = httpx.post(f"{server.url}/v1/completions", json={"prompt": ["a"] * (MAX_PROMPTS + 1)})
        assert error_of(too_many, 400)["param"] == "prompt"


def test_a_small_request_cannot_ask_for_a_huge_answer(limited) -> None:
    _, http = limited
    prompt = list(range(3, 403))  # 400 tokens, echoed with 20 alternatives each: 401 x 21 x 4 > 20000
    body = {"prompt": prompt, "echo": True, "logprobs": 20, "max_tokens": 1, "n": 4}
    error = error_of(http.post("/v1/completions", json=body), 400)
    assert error["code"] == "response_too_large" and error["param"] == "max_tokens"
    small = http.post("/v1/completions", json={**body, "n": 1, "logprobs": 5})  # 401 x 6 fits
    assert small.status_code == 200


def test_a_request_that_does_not_fit_now_gets_429_with_retry_after(limited) -> None:
    server, http = limited
    state = server.state
    slots = state.admit(QUEUE - 1, "prompt")  # as if 7 sequences were waiting
    try:
        response = http.post("/v1/completions", json={"prompt": ["a", "b"], "max_tokens": 1})
        error = error_of(response, 429)
        assert error["code"] == "queue_full" and response.headers["retry-after"] == "1"
        assert http.post("/v1/completions", json={"prompt": "a", "max_tokens": 1}).status_code == 200
    finally:
        slots.release_all()
    assert state.num_not_started == 0


def test_huge_prompts_are_rejected_before_tokenizing_and_never_stall_the_loop(api_server) -> None:
    import asyncio
    import time

    prompt = "word " * 1_600_000  # 8 MB of text: far more than any prompt of max_model_len tokens
    health: list[float] = []

    async def probe(http: httpx.AsyncClient, until: asyncio.Event) -> None:
        while not until.is_set():
            started = time.monotonic()
            assert (await http.get("/health")).status_code == 200
            health.append(time.monotonic() - started)
            await asyncio.sleep(0.02)

    async def post(http: httpx.AsyncClient, body: dict) -> tuple[int, dict, float]:
        started = time.monotonic()
        response = await http.post("/v1/completions" if "prompt" in body else "/v1/chat/completions", json=body)
        return response.status_code, response.json(), time.monotonic() - started

    async def run() -> list[tuple[int, dict, float]]:
        async with httpx.AsyncClient(base_url=api_server.url, timeout=60) as http:
            done = asyncio.Event()
            prober = asyncio.create_task(probe(http, done))
            await asyncio.sleep(0.1)
            bodies = [{"prompt": prompt, "max_tokens": 1}] * 3 + [
                {"messages": [{"role": "user", "content": prompt}], "max_tokens": 1}]
            results = await asyncio.gather(*(post(http, body) for body in bodies))
            done.set()
            await prober
            return results

    results = asyncio.run(run())
    for status, body, seconds in results:
        assert status == 400 and body["error"]["code"] == "context_length_exceeded", body
        assert seconds < 5
    health.sort()
    assert health and health[int(0.99 * (len(health) - 1))] < 0.5, health[-5:]
