"""Engine faults: one request's failure stays its own (500 or an error event), a dead engine loop is answered
with 503 instead of a hang. (A failed model step is tested in test_api_http.py, a dead engine after shutdown in
test_api_limits.py, SIGTERM draining in test_cli.py.)"""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest

from model.tokenizer import Tokenizer
from tests.support.live_server import greedy_reference, in_process_engine, live_server

FAULT_SEED = 777_001
PROMPTS = ["The quick brown fox", "Hello, world! How are you today?", "Once upon a time there was",
           "I love reading books"]


@pytest.fixture(scope="module")
def references(engine_checkpoint):
    tokenizer = Tokenizer.from_dir(engine_checkpoint[0])
    refs = {p: greedy_reference(engine_checkpoint[1], tokenizer, tokenizer.encode(p), 12) for p in PROMPTS}
    return {p: r for p, r in refs.items() if r.max_tokens > 1}


def _inject_detokenizer_fault(processor, monkeypatch, after: int = 2) -> None:
    """Requests with ``seed == FAULT_SEED`` get a detokenizer that raises on its ``after + 1``-th call."""
    original = processor._detokenizer

    def new_detokenizer(prompt_ids, params):
        detokenizer = original(prompt_ids, params)
        if params.seed == FAULT_SEED:
            add_tokens, calls = detokenizer.add_tokens, [0]

            def failing(tokens):
                calls[0] += 1
                if calls[0] > after:
                    raise RuntimeError("injected detokenizer failure")
                return add_tokens(tokens)

            detokenizer.add_tokens = failing
        return detokenizer

    monkeypatch.setattr(processor, "_detokenizer", new_detokenizer)


async def _request(http: httpx.AsyncClient, path: str, body: dict) -> tuple[int, list[str] | dict]:
    """(status, the JSON body) or, for a stream, (status, its event data)."""
    if not body.get("stream"):
        response = await http.post(path, json=body)
        return response.status_code, response.json()
    events = []
    async with http.stream("POST", path, json=body) as response:
        async for line in response.aiter_lines():
            if line.startswith("data: "):
                events.append(line[6:])
    return response.status_code, events


def _streamed_text(events: list[str]) -> str:
    assert events[-1] == "[DONE]"
    return "".join(json.loads(e)["choices"][0]["text"] for e in events[:-1] if json.loads(e)["choices"])


def test_detokenizer_failure_fails_only_its_request(engine_checkpoint, references, monkeypatch) -> None:
    with live_server(engine_checkpoint[0], num_kv_blocks=128) as server:
        _inject_detokenizer_fault(server.engine.output_processor, monkeypatch)
        faulty = {"prompt": "Hello", "max_tokens": 30, "ignore_eos": True, "seed": FAULT_SEED}
        normal = [({"prompt": p, "max_tokens": r.max_tokens, "temperature": 0, "stream": i % 2 == 1}, r.text)
                  for i, (p, r) in enumerate(references.items())]
        chat_faulty = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 30, "ignore_eos": True,
                       "seed": FAULT_SEED}

        async def run():
            async with httpx.AsyncClient(base_url=server.url, timeout=60) as http:
                return await asyncio.gather(
                    _request(http, "/v1/completions", faulty),
                    _request(http, "/v1/completions", {**faulty, "stream": True}),
                    _request(http, "/v1/chat/completions", chat_faulty),
                    _request(http, "/v1/chat/completions", {**chat_faulty, "stream": True}),
                    *(_request(http, "/v1/completions", body) for body, _ in normal),
                )

        (status, body), (s_status, events), (c_status, c_body), (cs_status, c_events), *rest = asyncio.run(run())
        for status_, body_ in ((status, body), (c_status, c_body)):
            assert status_ == 500
            assert set(body_["error"]) == {"message", "type", "param", "code"}
            assert body_["error"]["type"] == "server_error" and body_["error"]["code"] == "request_failed"
            assert "injected detokenizer failure" in body_["error"]["message"]
        for status_, events_ in ((s_status, events), (cs_status, c_events)):
            assert status_ == 200 and events_[-1] != "[DONE]"
            assert len(events_) >= 2 and "choices" in json.loads(events_[0])  # it failed mid-stream
            error = json.loads(events_[-1])["error"]
            assert error["type"] == "server_error" and error["code"] == "request_failed"
        for (request, text), (status_, result) in zip(normal, rest):
            assert status_ == 200
            got = _streamed_text(result) if request["stream"] else result["choices"][0]["text"]
            assert got == text
        _wait_idle(server)


def _wait_idle(server, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not (server.engine.num_unfinished == 0 and server.state.num_in_flight == 0
               and server.engine.stats().num_running == 0 and server.engine.stats().kv_cache_usage == 0.0):
        assert time.monotonic() < deadline, server.engine.stats()
        time.sleep(0.01)


def test_dead_engine_loop_answers_503_without_hanging(engine_checkpoint, monkeypatch) -> None:
    with live_server(engine_checkpoint[0], in_process=True, num_kv_blocks=128) as server, \
            httpx.Client(base_url=server.url, timeout=10) as http:
        long = {"prompt": "Once", "max_tokens": 400, "ignore_eos": True}
        with http.stream("POST", "/v1/completions", json={**long, "stream": True}) as response:
            lines = response.iter_lines()
            assert next(line for line in lines if line.startswith("data: "))
            scheduler = in_process_engine(server).scheduler

            def crash():
                raise RuntimeError("injected engine loop crash")

            monkeypatch.setattr(scheduler, "schedule", crash)  # the next step kills the loop thread
            data = [line[6:] for line in lines if line.startswith("data: ")]
        assert data[-1] != "[DONE]"
        error = json.loads(data[-1])["error"]
        assert error["type"] == "server_error" and error["code"] == "engine_dead"
        deadline = time.monotonic() + 5
        while server.engine.is_alive:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        started = time.monotonic()
        health = http.get("/health")
        assert health.status_code == 503 and health.json()["error"]["code"] == "engine_dead"
        for path, body in (("/v1/completions", {"prompt": "hi", "max_tokens": 2}),
                           ("/v1/completions", {"prompt": "hi", "max_tokens": 2, "stream": True}),
                           ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]})):
            response = http.post(path, json=body)
            assert response.status_code == 503, response.text
            assert response.json()["error"]["type"] == "server_error"
        assert time.monotonic() - started < 5  # answered at once, not after the client's timeout
        assert server.state.num_in_flight == 0


def test_dead_engine_loop_fails_a_waiting_non_streaming_request(engine_checkpoint, monkeypatch) -> None:
    with live_server(engine_checkpoint[0], in_process=True, num_kv_blocks=128) as server, \
            httpx.Client(base_url=server.url, timeout=10) as http:
        llm = in_process_engine(server)
        step = llm.step

        def crash_later():
            if any(len(r.output_ids) >= 3 for r in llm.scheduler.running):
                raise RuntimeError("injected engine loop crash")
            return step()

        monkeypatch.setattr(llm, "step", crash_later)
        response = http.post("/v1/completions", json={"prompt": "Once", "max_tokens": 100, "ignore_eos": True})
        assert response.status_code == 503
        assert response.json()["error"]["code"] == "engine_dead"
        assert http.get("/health").status_code == 503
