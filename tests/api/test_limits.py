"""API key, the waiting-queue limit (429), draining and a dead engine (503)."""

from __future__ import annotations

import threading
import time

import httpx
import openai
import pytest

from server.api import ServerSettings
from tests.support.live_server import SERVED_NAME, live_server

KEY = "s3cret-key"
MODEL = SERVED_NAME


@pytest.fixture(scope="module")
def guarded(engine_checkpoint):
    """One sequence at a time, one queued request at most, and an API key."""
    settings = ServerSettings(served_model_name=MODEL, api_key=KEY, max_queued_requests=1)
    with live_server(engine_checkpoint[0], settings, max_num_seqs=1) as server:
        yield server


def _client(server, key: str | None = KEY) -> httpx.Client:
    headers = {"Authorization": f"Bearer {key}".strip()} if key is not None else {}
    return httpx.Client(base_url=server.url, headers=headers, timeout=60)


@pytest.mark.parametrize("key", [None, "wrong", "", KEY + "x"])
def test_missing_or_wrong_key_is_401(guarded, key) -> None:
    with _client(guarded, key) as http:
        for method, path, body in [("POST", "/v1/completions", {"prompt": "hi"}), ("GET", "/v1/models", None),
                                   ("POST", "/tokenize", {"prompt": "hi"}),
                                   ("POST", "/v1/chat/completions", {"messages": []})]:
            response = http.request(method, path, json=body)
            assert response.status_code == 401
            assert response.json()["error"]["code"] == "invalid_api_key"
    sdk = openai.OpenAI(base_url=guarded.base_url, api_key=key or "none", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        sdk.completions.create(model=MODEL, prompt="hi", max_tokens=2)


def test_right_key_passes_and_probes_stay_open(guarded) -> None:
    sdk = openai.OpenAI(base_url=guarded.base_url, api_key=KEY, max_retries=0)
    assert sdk.completions.create(model=MODEL, prompt="hi", max_tokens=2).choices
    with _client(guarded, None) as http:
        assert http.get("/health").status_code == 200
        assert http.get("/metrics").status_code == 200


def test_full_queue_is_429(guarded) -> None:
    sdk = openai.OpenAI(base_url=guarded.base_url, api_key=KEY, max_retries=0, timeout=60)
    stream = sdk.completions.create(model=MODEL, prompt="long", max_tokens=480, stream=True,
                                    extra_body={"ignore_eos": True})
    next(iter(stream))  # the only running slot is taken
    waiter = threading.Thread(target=sdk.completions.create,
                              kwargs={"model": MODEL, "prompt": "next", "max_tokens": 2})
    waiter.start()
    deadline = time.monotonic() + 5
    while guarded.engine.stats().num_waiting < 1:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    with _client(guarded) as http:
        response = http.post("/v1/completions", json={"prompt": "third", "max_tokens": 2})
    assert response.status_code == 429
    assert response.json()["error"]["code"] == "queue_full"
    with pytest.raises(openai.RateLimitError):
        sdk.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    stream.close()  # frees the slot: the waiting request runs
    waiter.join(10)
    assert not waiter.is_alive()
    assert sdk.completions.create(model=MODEL, prompt="after", max_tokens=2).choices


def test_draining_answers_503(guarded) -> None:
    guarded.state.draining = True
    try:
        with _client(guarded) as http:
            assert http.get("/health").status_code == 503
            response = http.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2})
            assert response.status_code == 503
            assert response.json()["error"]["code"] == "shutting_down"
        sdk = openai.OpenAI(base_url=guarded.base_url, api_key=KEY, max_retries=0)
        with pytest.raises(openai.InternalServerError):
            sdk.completions.create(model=MODEL, prompt="hi", max_tokens=2)
    finally:
        guarded.state.draining = False
    with _client(guarded) as http:
        assert http.get("/health").status_code == 200


def test_dead_engine_answers_503(engine_checkpoint) -> None:
    with live_server(engine_checkpoint[0], num_kv_blocks=64) as server, _client(server) as http:
        assert http.get("/health").status_code == 200
        server.engine.shutdown()
        assert http.get("/health").status_code == 503
        response = http.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2})
        assert response.status_code == 503 and response.json()["error"]["type"] == "server_error"
