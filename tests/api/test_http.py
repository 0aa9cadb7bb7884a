"""Raw HTTP against the live server: SSE framing, error bodies and statuses, tokenizer, metrics, disconnects."""

from __future__ import annotations

import json
import socket
import time

import httpx
import openai
import pytest

from model.tokenizer import Tokenizer
from tests.support.live_server import SERVED_NAME, in_process_engine, live_server
from tests.support.prom import sample as metric

MODEL = SERVED_NAME


@pytest.fixture(scope="module")
def sdk(api_server) -> openai.OpenAI:
    return openai.OpenAI(base_url=api_server.base_url, api_key="unused", max_retries=0, timeout=60)


def sse_events(raw: str) -> list[str]:
    """Event data of a ``text/event-stream`` body, asserting the framing: one ``data:`` line per event."""
    assert raw.endswith("\n\n")
    events = []
    for block in raw[:-2].split("\n\n"):
        lines = [line for line in block.split("\n") if not line.startswith(":")]  # drop keep-alive comments
        if not lines:
            continue
        assert len(lines) == 1 and lines[0].startswith("data: "), block
        events.append(lines[0][len("data: "):])
    return events


def test_completion_sse_framing_with_usage(http) -> None:
    body = {"model": MODEL, "prompt": "Hello", "max_tokens": 5, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    response = http.post("/v1/completions", json=body)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    events = sse_events(response.text)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    *choice_chunks, usage_chunk = chunks
    assert usage_chunk["choices"] == [] and usage_chunk["usage"]["completion_tokens"] == 5
    assert usage_chunk["usage"]["total_tokens"] == usage_chunk["usage"]["prompt_tokens"] + 5
    assert len({c["id"] for c in chunks}) == 1 and all(c["object"] == "text_completion" for c in chunks)
    reasons = [c["choices"][0]["finish_reason"] for c in choice_chunks]
    assert reasons[-1] == "length" and all(r is None for r in reasons[:-1])
    assert all(c["usage"] is None for c in choice_chunks)


def test_chat_sse_framing(http) -> None:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "stream": True,
            "temperature": 0}
    response = http.post("/v1/chat/completions", json=body)
    events = sse_events(response.text)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all(c["object"] == "chat.completion.chunk" and c["id"].startswith("chatcmpl-") for c in chunks)
    assert all("role" not in c["choices"][0]["delta"] for c in chunks[1:])
    reasons = [c["choices"][0]["finish_reason"] for c in chunks]
    assert reasons[-1] in ("length", "stop") and all(r is None for r in reasons[:-1])


BAD_COMPLETIONS = [
    ({"temperature": 5}, 400, "temperature", None),
    ({"temperature": "hot"}, 400, "temperature", None),  # a pydantic (422-style) failure
    ({"n": "two"}, 400, "n", None),
    ({"max_tokens": 0}, 400, "max_tokens", None),
    ({"max_tokens": 5000}, 400, "max_tokens", "context_length_exceeded"),
    ({"logprobs": 21}, 400, "logprobs", None),
    ({"suffix": "tail"}, 400, "suffix", None),
    ({"n": 2, "best_of": 1}, 400, "best_of", None),
    ({"best_of": 2, "stream": True}, 400, "best_of", None),
    ({"prompt": []}, 400, "prompt", None),
    ({"prompt": [5, 10**6]}, 400, "prompt", None),
    ({"prompt": [[1, 2], []]}, 400, "prompt", None),
    ({"stop": [""]}, 400, "stop", None),
    ({"logit_bias": {"99999": 1}}, 400, "logit_bias", None),
    ({"model": "gpt-4"}, 404, "model", "model_not_found"),
]


@pytest.mark.parametrize(("fields", "status", "param", "code"), BAD_COMPLETIONS,
                         ids=[f"{'-'.join(f)}-{s}" for f, s, _, _ in BAD_COMPLETIONS])
def test_completion_errors(http, sdk, fields, status, param, code) -> None:
    body = {"model": MODEL, "prompt": "Hello", "max_tokens": 4, **fields}
    response = http.post("/v1/completions", json=body)
    assert response.status_code == status
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"] and error["type"] == "invalid_request_error"
    assert error["param"] == param and error["code"] == code
    expected = openai.NotFoundError if status == 404 else openai.BadRequestError
    extra = {k: v for k, v in fields.items() if k not in ("model", "prompt")}
    with pytest.raises(expected):
        sdk.completions.create(model=fields.get("model", MODEL), prompt=fields.get("prompt", "Hello"),
                               max_tokens=4, extra_body=extra)


BAD_CHATS = [
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages.0.role"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, None),
    ({"top_logprobs": 2}, "top_logprobs"),
    ({"logprobs": True, "top_logprobs": 30}, "top_logprobs"),
    ({"max_completion_tokens": 100000}, "max_tokens"),
]


@pytest.mark.parametrize(("fields", "param"), BAD_CHATS, ids=[str(i) for i in range(len(BAD_CHATS))])
def test_chat_errors(http, fields, param) -> None:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], **fields}
    response = http.post("/v1/chat/completions", json=body)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    if param is not None:
        assert error["param"] == param


@pytest.mark.parametrize("content", [b"{not json", b"[1, 2]", b""])
def test_malformed_json_is_400(http, content) -> None:
    response = http.post("/v1/completions", content=content, headers={"content-type": "application/json"})
    assert response.status_code == 400
    assert response.json()["error"]["type"] == "invalid_request_error"


def test_unknown_route_and_method_in_openai_shape(http) -> None:
    assert http.get("/v1/nothing").json()["error"]["message"]
    response = http.get("/v1/completions")
    assert response.status_code == 405 and "error" in response.json()


def test_unknown_fields_are_ignored(http) -> None:
    body = {"model": MODEL, "prompt": "Hi", "max_tokens": 2, "frobnicate": True, "user": "me"}
    assert http.post("/v1/completions", json=body).status_code == 200


def test_tokenize_and_detokenize(http, engine_checkpoint) -> None:
    tokenizer = Tokenizer.from_dir(engine_checkpoint[0])
    result = http.post("/tokenize", json={"model": MODEL, "prompt": "Hello, world!"}).json()
    assert result["tokens"] == tokenizer.encode("Hello, world!")
    assert result["count"] == len(result["tokens"]) and result["max_model_len"] == 512
    messages = [{"role": "user", "content": "hi"}]
    chat = http.post("/tokenize", json={"model": MODEL, "messages": messages}).json()
    assert chat["tokens"] == tokenizer.apply_chat_template(messages)
    text = http.post("/detokenize", json={"model": MODEL, "tokens": result["tokens"]}).json()["prompt"]
    assert text == "Hello, world!"
    assert http.post("/detokenize", json={"tokens": [10**7]}).status_code == 400
    assert http.post("/tokenize", json={"model": "nope", "prompt": "x"}).status_code == 404
    assert http.post("/tokenize", json={"model": MODEL}).status_code == 400


def test_health_models_and_openapi(http) -> None:
    assert http.get("/health").status_code == 200
    assert http.get("/v1/models").json()["data"][0]["id"] == MODEL
    schemas = http.get("/openapi.json").json()["components"]["schemas"]
    for field in ("prompt", "best_of", "echo", "logprobs", "stream_options", "logit_bias", "seed", "stop"):
        assert field in schemas["CompletionRequest"]["properties"]
    assert "max_completion_tokens" in schemas["ChatCompletionRequest"]["properties"]


def test_metrics(http) -> None:
    before = http.get("/metrics").text
    http.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 3, "ignore_eos": True})
    response = http.get("/metrics")
    assert response.headers["content-type"].startswith("text/plain")
    text = response.text
    for name in ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc"):
        assert f"# TYPE jetmoe:{name} gauge" in text
    for name in ("prefix_cache_queries", "prefix_cache_hits", "num_preemptions", "prompt_tokens",
                 "generation_tokens", "request_success"):
        assert f"# TYPE jetmoe:{name}_total counter" in text or f"# TYPE jetmoe:{name} counter" in text
    for name in ("time_to_first_token_seconds", "inter_token_latency_seconds", "e2e_request_latency_seconds",
                 "request_queue_time_seconds"):
        assert f"# TYPE jetmoe:{name} histogram" in text
    assert metric(text, "jetmoe:generation_tokens_total") - metric(before, "jetmoe:generation_tokens_total") == 3
    success = {"finished_reason": "length", "model_name": MODEL}
    assert metric(text, "jetmoe:request_success_total", **success) >= 1 + metric(
        before, "jetmoe:request_success_total", **success)
    assert 0.0 <= metric(text, "jetmoe:kv_cache_usage_perc") <= 1.0


def _wait_until(predicate, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return predicate()


def _idle(engine) -> bool:
    stats = engine.stats()
    return stats.num_running == 0 and stats.num_waiting == 0 and stats.kv_cache_usage == 0.0


def test_stream_disconnect_aborts_and_frees_blocks(api_server, http) -> None:
    aborted = metric(http.get("/metrics").text, "jetmoe:request_success_total", finished_reason="abort")
    body = {"prompt": "Once upon a time", "max_tokens": 480, "ignore_eos": True, "stream": True}
    with httpx.Client(base_url=api_server.url, timeout=60) as client, \
            client.stream("POST", "/v1/completions", json=body) as response:
        lines = response.iter_lines()
        assert next(line for line in lines if line.startswith("data: "))
        assert api_server.engine.stats().num_running == 1
    assert _wait_until(lambda: _idle(api_server.engine), 1.0)
    assert api_server.engine.num_unfinished == 0
    text = http.get("/metrics").text
    assert metric(text, "jetmoe:request_success_total", finished_reason="abort") == aborted + 1
    assert metric(text, "jetmoe:num_requests_running") == 0 and metric(text, "jetmoe:kv_cache_usage_perc") == 0


def test_non_streaming_disconnect_aborts(api_server, http) -> None:
    aborted = metric(http.get("/metrics").text, "jetmoe:request_success_total", finished_reason="abort")
    body = json.dumps({"prompt": "Once upon a time", "max_tokens": 480, "ignore_eos": True, "n": 16,
                       "temperature": 1.0}).encode()
    host, port = api_server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        assert _wait_until(lambda: api_server.engine.stats().num_running == 16, 5.0)
    assert _wait_until(lambda: _idle(api_server.engine), 1.0)
    text = http.get("/metrics").text
    assert metric(text, "jetmoe:request_success_total", finished_reason="abort") == aborted + 16


def test_engine_failure_mid_stream_is_an_error_event(engine_checkpoint, monkeypatch) -> None:
    with live_server(engine_checkpoint[0], in_process=True) as server, \
            httpx.Client(base_url=server.url, timeout=60) as http:
        sdk = openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0)
        _fail_mid_stream(server, http, sdk, monkeypatch)


def _fail_mid_stream(api_server, http, sdk, monkeypatch) -> None:
    runner = in_process_engine(api_server).runner
    execute = runner.execute

    def failing(step):
        if any(s.request.params.seed == 4242 and len(s.request.output_ids) >= 2 for s in step.scheduled):
            raise RuntimeError("injected failure")
        return execute(step)

    monkeypatch.setattr(runner, "execute", failing)
    body = {"prompt": "Hello", "max_tokens": 20, "ignore_eos": True, "seed": 4242, "stream": True}
    events = sse_events(http.post("/v1/completions", json=body).text)
    assert events[-1] != "[DONE]"
    error = json.loads(events[-1])["error"]
    assert error["type"] == "server_error" and "injected failure" in error["message"]
    assert len(events) >= 2 and "choices" in json.loads(events[0])
    with pytest.raises(openai.APIError):
        list(sdk.completions.create(model=MODEL, prompt="Hello", max_tokens=20, seed=4242, stream=True,
                                    extra_body={"ignore_eos": True}))
    with pytest.raises(openai.InternalServerError):
        sdk.completions.create(model=MODEL, prompt="Hello", max_tokens=20, seed=4242,
                               extra_body={"ignore_eos": True})
    monkeypatch.undo()
    assert _wait_until(lambda: _idle(api_server.engine), 1.0)
    assert http.post("/v1/completions", json={"prompt": "Hello", "max_tokens": 3}).status_code == 200


@pytest.mark.parametrize("path", ["/health", "/v1/models", f"/v1/models/{MODEL}", "/ping", "/version",
                                  "/tokenizer_info", "/metrics"])
def test_head_where_get_exists(http, path: str) -> None:
    get, head = http.get(path), http.head(path)
    assert head.status_code == get.status_code == 200
    assert head.content == b"" and head.headers["content-type"] == get.headers["content-type"]
