"""API key: every generation endpoint answers 401 without the right bearer key (compared in constant time), the
key is checked before the body is read, and neither keys nor prompts reach the logs at the default level."""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from server.api import ServerSettings, auth
from tests.support.live_server import SERVED_NAME, in_process_engine, live_server

KEY = "sk-hardening-7f3c9e1aKEY"
WRONG = "sk-hardening-0d4b2c8eWRONG"
PROMPT = "zebra quokka marmalade 7731"
REPO = Path(__file__).resolve().parents[2]
ENDPOINTS = [("POST", "/v1/completions", {"prompt": "hi", "max_tokens": 2}),
             ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}),
             ("GET", "/v1/models", None), ("GET", f"/v1/models/{SERVED_NAME}", None),
             ("POST", "/tokenize", {"prompt": "hi"}), ("POST", "/detokenize", {"tokens": [5]})]
BAD_HEADERS = {"none": None, "wrong-key": f"Bearer {WRONG}", "basic-scheme": f"Basic {KEY}",
               "no-scheme": KEY, "key-prefix": f"Bearer {KEY[:-1]}", "key-plus-one": f"Bearer {KEY}x",
               "bearer-only": "Bearer", "non-ascii": "Bearer sk-\u00e9\u00e8"}


@pytest.fixture(scope="module")
def keyed(engine_checkpoint):
    settings = ServerSettings(served_model_name=SERVED_NAME, api_key=KEY, max_request_bytes=1024)
    with live_server(engine_checkpoint[0], settings, in_process=True, num_kv_blocks=64) as server:
        yield server


@pytest.mark.parametrize("header", list(BAD_HEADERS))
def test_every_endpoint_needs_the_key(keyed, header) -> None:
    value = BAD_HEADERS[header]
    headers = {"Authorization": value.encode("utf-8")} if value is not None else {}
    with httpx.Client(base_url=keyed.url, timeout=30) as http:
        for method, path, body in ENDPOINTS:
            response = http.request(method, path, json=body, headers=headers)
            assert response.status_code == 401, (path, response.text)
            assert response.headers["www-authenticate"] == "Bearer"
            error = response.json()["error"]
            assert set(error) == {"message", "type", "param", "code"} and error["code"] == "invalid_api_key"
            assert KEY not in response.text and WRONG not in response.text


def test_the_right_key_opens_every_endpoint(keyed) -> None:
    for scheme in ("Bearer", "bearer"):
        with httpx.Client(base_url=keyed.url, timeout=30, headers={"Authorization": f"{scheme} {KEY}"}) as http:
            for method, path, body in ENDPOINTS:
                assert http.request(method, path, json=body).status_code == 200, path


def test_the_key_is_checked_before_the_body(keyed) -> None:
    with httpx.Client(base_url=keyed.url, timeout=30) as http:
        for content in (b"{not json", b"x" * 4096):  # malformed, and over the 1 KiB limit
            response = http.post("/v1/completions", content=content, headers={"content-type": "application/json"})
            assert response.status_code == 401
        response = http.post("/v1/completions", content=b"x" * 4096,
                             headers={"content-type": "application/json", "Authorization": f"Bearer {KEY}"})
        assert response.status_code == 413


def test_keys_are_compared_in_constant_time(monkeypatch) -> None:
    calls = []
    real = auth.hmac.compare_digest

    def spy(a, b):
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(auth.hmac, "compare_digest", spy)
    assert auth.key_matches(f"Bearer {KEY}", KEY) and not auth.key_matches(f"Bearer {WRONG}", KEY)
    assert not auth.key_matches("Bearer sk-\u00e9", KEY)
    assert len(calls) == 3 and all(isinstance(a, bytes) and isinstance(b, bytes) for a, b in calls)


def test_keys_and_prompts_stay_out_of_logs_in_process(keyed, caplog) -> None:
    """Logs of every logger at INFO while requests (good, bad key, invalid, failing) carry the key and prompt."""
    caplog.set_level(logging.INFO)
    llm = in_process_engine(keyed)
    with httpx.Client(base_url=keyed.url, timeout=30) as http:
        good = {"Authorization": f"Bearer {KEY}"}
        assert http.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 3}, headers=good).status_code == 200
        assert http.post("/v1/completions", json={"prompt": PROMPT},
                         headers={"Authorization": f"Bearer {WRONG}"}).status_code == 401
        assert http.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 0}, headers=good).status_code == 400
        chat = {"messages": [{"role": "user", "content": PROMPT}], "max_tokens": 3, "stream": True}
        assert http.post("/v1/chat/completions", json=chat, headers=good).status_code == 200
        original = llm.runner.execute

        def failing(step):
            raise RuntimeError("injected failure")

        llm.runner.execute = failing
        try:
            response = http.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 3}, headers=good)
            assert response.status_code == 500
        finally:
            llm.runner.execute = original
    text = caplog.text + "".join(str(r.args) for r in caplog.records)
    assert "engine step failed" in text  # the failure was logged (at ERROR), without the request's content
    assert KEY not in text and WRONG not in text and PROMPT not in text


def test_keys_and_prompts_stay_out_of_the_cli_logs(engine_checkpoint) -> None:
    """The real server at its default log level (info: startup and access lines), then SIGTERM."""
    cmd = [sys.executable, "-m", "server", "--model", str(engine_checkpoint[0]), "--port", "0", "--device", "cpu",
           "--dtype", "float32", "--num-kv-blocks", "64", "--max-model-len", "256", "--served-model-name", "tiny",
           "--api-key", KEY]
    env = {k: v for k, v in os.environ.items() if not k.startswith("JETMOE_")}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stderr=subprocess.STDOUT, stdout=subprocess.PIPE, text=True)
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True).start()
    seen: list[str] = []
    try:
        deadline = time.monotonic() + 90
        while not any("http://" in line for line in seen):
            assert time.monotonic() < deadline and proc.poll() is None, "".join(seen)
            with contextlib.suppress(queue.Empty):
                seen.append(lines.get(timeout=0.5))
        url = re.search(r"http://[\d.]+:\d+", next(line for line in seen if "http://" in line)).group(0)
        good = {"Authorization": f"Bearer {KEY}"}
        with httpx.Client(base_url=url, timeout=30) as http:
            assert http.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 3},
                             headers=good).status_code == 200
            chat = {"messages": [{"role": "user", "content": PROMPT}], "max_tokens": 3}
            assert http.post("/v1/chat/completions", json=chat, headers=good).status_code == 200
            assert http.post("/v1/completions", json={"prompt": PROMPT},
                             headers={"Authorization": f"Bearer {WRONG}"}).status_code == 401
            assert http.post("/tokenize", json={"prompt": PROMPT, "model": "nope"}, headers=good).status_code == 404
            # A key in the query string is neither accepted nor written to the access log.
            assert http.post(f"/v1/completions?api_key={KEY}", json={"prompt": PROMPT}).status_code == 401
            assert http.get(f"/health?x=1&token={KEY}").status_code == 200
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    time.sleep(0.2)
    while not lines.empty():
        seen.append(lines.get())
    log = "".join(seen)
    assert '"POST /v1/completions HTTP/1.1" 200' in log and " 401" in log  # access lines were logged
    assert "api_key=***" in log and "token=***" in log
    assert KEY not in log and WRONG not in log and PROMPT not in log
