"""Bad input: each answered with an OpenAI-shaped 4xx, and the server still answers a normal request after it.

The cases already in ``tests/api/test_http.py.py`` (e.g. ``temperature: 5``, ``logprobs: 21``, ``messages: []``, unknown
role ``wizard``, token id 10**6) are not repeated here.
"""

from __future__ import annotations

import json
import socket

import httpx
import pytest

from server.api.body import loads_strict
from server.cli import parse_args
from server.engine.sampling_params import (
    MAX_ALLOWED_TOKEN_IDS,
    MAX_BAD_WORDS,
    MAX_N,
    MAX_STOP_STRINGS,
    MAX_STOP_TOKEN_IDS,
)
from tests.support.live_server import SERVED_NAME

MODEL = SERVED_NAME
LIMIT = 8 * 1024 * 1024  # the default --max-request-bytes
COMPLETIONS, CHAT = "/v1/completions", "/v1/chat/completions"
HI = [{"role": "user", "content": "hi"}]


def _raw(text: str) -> bytes:
    return text.encode()


# (path, body: a dict sent as JSON, or raw bytes, expected status, expected param or ... for any)
CASES = {
    # malformed JSON (beyond tests/api/test_http.py's '{not json', '[1, 2]' and an empty body)
    "truncated-json": (COMPLETIONS, _raw('{"prompt": "hi"'), 400, ...),
    "trailing-garbage": (COMPLETIONS, _raw('{"prompt": "hi"} x'), 400, ...),
    "json-string-body": (COMPLETIONS, _raw('"hi"'), 400, ...),
    "json-null-body": (COMPLETIONS, _raw("null"), 400, ...),
    "deeply-nested": (COMPLETIONS, _raw('{"prompt": ' + "[" * 100_000 + "]" * 100_000 + "}"), 400, ...),
    "huge-integer-literal": (COMPLETIONS, _raw('{"prompt": "hi", "max_tokens": ' + "9" * 5000 + "}"), 400, ...),
    # wrong types (strict JSON types, as OpenAI's)
    "prompt-number": (COMPLETIONS, {"prompt": 5}, 400, "prompt"),
    "prompt-object": (COMPLETIONS, {"prompt": {"text": "hi"}}, 400, "prompt"),
    "prompt-mixed-list": (COMPLETIONS, {"prompt": [1, "a"]}, 400, "prompt"),
    "max-tokens-string": (COMPLETIONS, {"prompt": "hi", "max_tokens": "5"}, 400, "max_tokens"),
    "max-tokens-float": (COMPLETIONS, {"prompt": "hi", "max_tokens": 5.5}, 400, "max_tokens"),
    "stream-string": (COMPLETIONS, {"prompt": "hi", "stream": "yes"}, 400, "stream"),
    "stream-int": (COMPLETIONS, {"prompt": "hi", "stream": 1}, 400, "stream"),
    "n-bool": (COMPLETIONS, {"prompt": "hi", "n": True}, 400, "n"),
    "stop-number": (COMPLETIONS, {"prompt": "hi", "stop": 5}, 400, "stop"),
    "stop-list-of-numbers": (COMPLETIONS, {"prompt": "hi", "stop": [5]}, 400, "stop"),
    "logit-bias-list": (COMPLETIONS, {"prompt": "hi", "logit_bias": [1, 2]}, 400, "logit_bias"),
    "stream-options-string": (COMPLETIONS, {"prompt": "hi", "stream_options": "usage"}, 400, "stream_options"),
    "messages-string": (CHAT, {"messages": "hi"}, 400, "messages"),
    "content-number": (CHAT, {"messages": [{"role": "user", "content": 5}]}, 400, "messages.0.content"),
    "role-missing": (CHAT, {"messages": [{"content": "hi"}]}, 400, "messages.0.role"),
    "detokenize-strings": ("/detokenize", {"tokens": ["a"]}, 400, "tokens.0"),
    # NaN / Infinity (not JSON) and out-of-range numbers
    "nan-literal": (COMPLETIONS, _raw('{"prompt": "hi", "temperature": NaN}'), 400, ...),
    "infinity-literal": (COMPLETIONS, _raw('{"prompt": "hi", "top_p": Infinity}'), 400, ...),
    "minus-infinity-literal": (CHAT, _raw('{"messages": [], "temperature": -Infinity}'), 400, ...),
    "float-overflow": (COMPLETIONS, _raw('{"prompt": "hi", "temperature": 1e400}'), 400, "temperature"),
    "logit-bias-overflow": (COMPLETIONS, _raw('{"prompt": "hi", "logit_bias": {"5": 1e999}}'), 400, ...),
    "top-p-zero": (COMPLETIONS, {"prompt": "hi", "top_p": 0}, 400, "top_p"),
    "top-p-above-1": (COMPLETIONS, {"prompt": "hi", "top_p": 1.5}, 400, "top_p"),
    "top-k-below-minus-1": (COMPLETIONS, {"prompt": "hi", "top_k": -2}, 400, "top_k"),
    "min-p-above-1": (COMPLETIONS, {"prompt": "hi", "min_p": 2}, 400, "min_p"),
    "presence-penalty": (COMPLETIONS, {"prompt": "hi", "presence_penalty": 3}, 400, "presence_penalty"),
    "frequency-penalty": (CHAT, {"messages": HI, "frequency_penalty": -2.5}, 400, "frequency_penalty"),
    "repetition-penalty-zero": (COMPLETIONS, {"prompt": "hi", "repetition_penalty": 0}, 400,
                                "repetition_penalty"),
    "repetition-penalty-tiny": (COMPLETIONS, {"prompt": "hi", "repetition_penalty": 1e-308}, 400,
                                "repetition_penalty"),
    "repetition-penalty-huge": (CHAT, {"messages": HI, "repetition_penalty": 1e6}, 400, "repetition_penalty"),
    "stop-token-ids-too-many": (COMPLETIONS, {"prompt": "hi", "stop_token_ids": [5] * (MAX_STOP_TOKEN_IDS + 1)},
                                400, "stop_token_ids"),
    "bad-words-too-many": (CHAT, {"messages": HI, "bad_words": ["x"] * (MAX_BAD_WORDS + 1)}, 400, "bad_words"),
    "allowed-ids-too-many": (COMPLETIONS, {"prompt": "hi", "allowed_token_ids": [5] * (MAX_ALLOWED_TOKEN_IDS + 1)},
                             400, "allowed_token_ids"),
    "logit-bias-value": (COMPLETIONS, {"prompt": "hi", "logit_bias": {"5": 101}}, 400, "logit_bias"),
    "seed-too-large": (COMPLETIONS, {"prompt": "hi", "seed": 2**64}, 400, "seed"),
    "seed-too-small": (COMPLETIONS, {"prompt": "hi", "seed": -(2**63) - 1}, 400, "seed"),
    "n-huge": (COMPLETIONS, {"prompt": "hi", "n": 10**30}, 400, "n"),
    "max-tokens-huge": (COMPLETIONS, {"prompt": "hi", "max_tokens": 10**30}, 400, "max_tokens"),
    # empty prompts (an empty list and empty messages are in tests/api/test_http.py)
    "prompt-empty-string": (COMPLETIONS, {"prompt": ""}, 400, "prompt"),
    "prompt-list-with-empty-string": (COMPLETIONS, {"prompt": ["hi", ""]}, 400, "prompt"),
    "prompt-list-of-empty-lists": (COMPLETIONS, {"prompt": [[]]}, 400, "prompt"),
    "tokenize-neither": ("/tokenize", {}, 400, "prompt"),
    # token ids outside the vocabulary
    "prompt-negative-id": (COMPLETIONS, {"prompt": [-1]}, 400, "prompt"),
    "prompt-batch-negative-id": (COMPLETIONS, {"prompt": [[5], [-3]]}, 400, "prompt"),
    "stop-token-id-beyond-vocab": (COMPLETIONS, {"prompt": "hi", "stop_token_ids": [10**6]}, 400,
                                   "stop_token_ids"),
    "stop-token-id-negative": (COMPLETIONS, {"prompt": "hi", "stop_token_ids": [-1]}, 400, "stop_token_ids.0"),
    "logit-bias-negative-id": (COMPLETIONS, {"prompt": "hi", "logit_bias": {"-1": 1}}, 400, "logit_bias"),
    "logit-bias-padded-id": (COMPLETIONS, {"prompt": "hi", "logit_bias": {" 5": 1}}, 400, "logit_bias"),
    "logit-bias-word": (CHAT, {"messages": HI, "logit_bias": {"abc": 1}}, 400, "logit_bias"),
    "logit-bias-huge-id": (CHAT, {"messages": HI, "logit_bias": {"9" * 5000: 1}}, 400, "logit_bias"),
    "detokenize-negative": ("/detokenize", {"tokens": [-1]}, 400, "tokens.0"),
    # invalid UTF-8 and lone surrogates
    "invalid-utf8": (COMPLETIONS, b'{"prompt": "caf\xe9 \xff"}', 400, ...),
    "utf16-body": (COMPLETIONS, '{"prompt": "hi"}'.encode("utf-16"), 400, ...),
    "lone-surrogate-prompt": (COMPLETIONS, _raw('{"prompt": "a\\ud800b"}'), 400, ...),
    "lone-surrogate-stop": (COMPLETIONS, _raw('{"prompt": "hi", "stop": ["\\udfff"]}'), 400, ...),
    "lone-surrogate-chat": (CHAT, _raw('{"messages": [{"role": "user", "content": "\\ud83d"}]}'), 400, ...),
    "lone-surrogate-tokenize": ("/tokenize", _raw('{"prompt": "\\udc00"}'), 400, ...),
    "lone-surrogate-key": (COMPLETIONS, _raw('{"prompt": "hi", "\\ud800": 1}'), 400, ...),
    # prompts beyond --max-model-len (512 here)
    "long-text-prompt": (COMPLETIONS, {"prompt": "hello " * 600, "max_tokens": 1}, 400, "max_tokens"),
    "long-token-prompt": (COMPLETIONS, {"prompt": [5] * 513, "max_tokens": 1}, 400, "max_tokens"),
    "long-batch-prompt": (COMPLETIONS, {"prompt": ["hi", "hello " * 600], "max_tokens": 1}, 400, "max_tokens"),
    "long-chat": (CHAT, {"messages": [{"role": "user", "content": "hello " * 600}]}, 400, "max_tokens"),
    # max_tokens 0 or negative (0 for completions is in tests/api/test_http.py)
    "max-tokens-negative": (COMPLETIONS, {"prompt": "hi", "max_tokens": -5}, 400, "max_tokens"),
    "chat-max-tokens-zero": (CHAT, {"messages": HI, "max_tokens": 0}, 400, "max_tokens"),
    "chat-max-completion-tokens-negative": (CHAT, {"messages": HI, "max_completion_tokens": -1}, 400,
                                            "max_completion_tokens"),
    # n (and best_of) beyond the limit
    "n-beyond-limit": (COMPLETIONS, {"prompt": "hi", "n": MAX_N + 1}, 400, "n"),
    "n-zero": (COMPLETIONS, {"prompt": "hi", "n": 0}, 400, "n"),
    "chat-n-beyond-limit": (CHAT, {"messages": HI, "n": MAX_N + 1}, 400, "n"),
    "best-of-beyond-limit": (COMPLETIONS, {"prompt": "hi", "best_of": MAX_N + 1}, 400, "best_of"),
    # logprobs beyond 20 (completions' 21 and chat's top_logprobs 30 are in tests/api/test_http.py)
    "logprobs-negative": (COMPLETIONS, {"prompt": "hi", "logprobs": -1}, 400, "logprobs"),
    "chat-top-logprobs-21": (CHAT, {"messages": HI, "logprobs": True, "top_logprobs": 21}, 400, "top_logprobs"),
    "chat-logprobs-int": (CHAT, {"messages": HI, "logprobs": 5}, 400, "logprobs"),
    # unknown roles (beyond 'wizard')
    "role-function": (CHAT, {"messages": [{"role": "function", "content": "hi"}]}, 400, "messages.0.role"),
    "role-null": (CHAT, {"messages": [{"role": None, "content": "hi"}]}, 400, "messages.0.role"),
    "role-uppercase": (CHAT, {"messages": HI + [{"role": "USER", "content": "hi"}]}, 400, "messages.1.role"),
    "tokenize-unknown-role": ("/tokenize", {"messages": [{"role": "robot", "content": "x"}]}, 400,
                              "messages.0.role"),
    # stop lists too long
    "stop-list-too-long": (COMPLETIONS, {"prompt": "hi", "stop": ["x"] * (MAX_STOP_STRINGS + 1)}, 400, "stop"),
    "chat-stop-list-too-long": (CHAT, {"messages": HI, "stop": [f"s{i}" for i in range(100)]}, 400, "stop"),
    # a body over the size limit: declared, and streamed without a Content-Length (below)
    "body-over-limit": (COMPLETIONS, {"prompt": "x" * LIMIT}, 413, None),
}


def assert_openai_error(response: httpx.Response, status: int, param=...) -> dict:
    assert response.status_code == status, response.text[:500]
    assert response.headers["content-type"].startswith("application/json")
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    assert error["type"] == "invalid_request_error"
    if param is not ...:
        assert error["param"] == param, error
    return error


def assert_healthy(http: httpx.Client) -> None:
    """A normal request right after the bad one is answered as usual."""
    response = http.post(COMPLETIONS, json={"model": MODEL, "prompt": "Hello", "max_tokens": 2, "temperature": 0})
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["completion_tokens"] >= 1


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_an_openai_4xx(http, name) -> None:
    path, body, status, param = CASES[name]
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    response = http.post(path, content=content, headers={"content-type": "application/json"})
    assert_openai_error(response, status, param)
    assert_healthy(http)


def test_codes_of_json_size_and_context_errors(http) -> None:
    assert assert_openai_error(http.post(COMPLETIONS, content=b'{"prompt": NaN}',
                                         headers={"content-type": "application/json"}), 400)["code"] == "invalid_json"
    assert assert_openai_error(http.post(COMPLETIONS, json={"prompt": "x" * LIMIT}), 413)["code"] == \
        "request_too_large"
    long_prompt = http.post(COMPLETIONS, json={"prompt": [5] * 600, "max_tokens": 1})
    error = assert_openai_error(long_prompt, 400, "max_tokens")
    assert error["code"] == "context_length_exceeded" and "512" in error["message"] and "600" in error["message"]


def test_body_over_limit_without_content_length_is_413(api_server, http) -> None:
    """A chunked body is counted as it streams in: the limit does not rely on Content-Length."""
    sent = 0

    def chunks():
        nonlocal sent
        yield b'{"prompt": "'
        for _ in range(LIMIT // 65536 + 2):
            sent += 65536
            yield b"x" * 65536
        yield b'"}'

    response = http.post(COMPLETIONS, content=chunks(), headers={"content-type": "application/json"})
    assert "content-length" not in response.request.headers
    assert_openai_error(response, 413)
    assert_healthy(http)


def test_raw_chunked_body_over_the_limit_is_413(api_server, http) -> None:
    """Chunked transfer encoding on a raw socket: the excess is read and dropped, then the 413 is readable."""
    host, port = api_server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\n")
        chunk = b"x" * (1 << 20)
        for _ in range(LIMIT // len(chunk) + 2):
            sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        sock.sendall(b"0\r\n\r\n")
        head = sock.recv(65536)
    assert head.startswith(b"HTTP/1.1 413"), head[:200]
    assert_healthy(http)


def test_huge_declared_body_is_refused_before_it_is_sent(api_server, http) -> None:
    """A Content-Length far beyond the limit is answered at once (and the connection closed), unread."""
    host, port = api_server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 1073741824\r\n\r\n{\"prompt\": \"")
        head = b""
        while chunk := sock.recv(65536):  # until the server closes the connection
            head += chunk
    assert head.startswith(b"HTTP/1.1 413"), head[:200]
    assert b"connection: close" in head.lower() and b"request_too_large" in head
    assert_healthy(http)


def test_max_request_bytes_flag_and_variable() -> None:
    assert parse_args(["--model", "m"], environ={})[1].max_request_bytes == LIMIT
    assert parse_args(["--model", "m", "--max-request-bytes", "64KiB"], environ={})[1].max_request_bytes == 65536
    settings = parse_args(["--model", "m"], environ={"JETMOE_MAX_REQUEST_BYTES": "1000"})[1]
    assert settings.max_request_bytes == 1000


def test_strict_json_loader() -> None:
    assert loads_strict(b'{"a": [1, 2.5, "\\ud83d\\ude00", null]}') == {"a": [1, 2.5, "\U0001F600", None]}
    for bad in (b'{"a": NaN}', b"[Infinity]", b'"\\ud800"', b'{"\\udfff": 1}', b"\xff", b"\xef\xbb\xbf{}"):
        with pytest.raises(json.JSONDecodeError):
            loads_strict(bad)
