"""HTTP side: the request bodies, one streamed request, and the model lookup (``GET /v1/models``)."""

from __future__ import annotations

import time
from typing import Any

import httpx

from server.bench.config import BenchError, BenchmarkConfig
from server.bench.datasets import SampleRequest
from server.bench.stream import RequestOutput, StreamRecorder, http_error_message, parse_sse_line


def make_client(config: BenchmarkConfig) -> httpx.AsyncClient:
    """A client with no pool limit beyond ``max_concurrency`` and no pool timeout (queued requests wait)."""
    limits = httpx.Limits(max_connections=config.max_concurrency, max_keepalive_connections=config.max_concurrency)
    timeout = httpx.Timeout(config.request_timeout, connect=30.0, pool=None)
    return httpx.AsyncClient(limits=limits, timeout=timeout, headers=auth_headers(config.api_key))


def auth_headers(api_key: str | None) -> dict[str, str]:
    """``Authorization: Bearer <key>`` when a key is given."""
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def build_payload(config: BenchmarkConfig, model: str, request: SampleRequest) -> dict[str, Any]:
    """A streaming body that asks for the usage chunk; ``ignore_eos`` only when set (a vLLM extension)."""
    payload: dict[str, Any] = {
        "model": model,
        "temperature": config.temperature,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if config.endpoint == "chat":
        payload["messages"] = [{"role": "user", "content": request.prompt}]
        payload["max_completion_tokens"] = request.output_len
    else:
        payload["prompt"] = request.prompt
        payload["max_tokens"] = request.output_len
    if config.ignore_eos:
        payload["ignore_eos"] = True
    return payload


async def send_request(client: httpx.AsyncClient, url: str, payload: dict[str, Any],
                       prompt_len: int) -> RequestOutput:
    """Post one streaming request and time its chunks; any failure is recorded, never raised."""
    recorder = StreamRecorder(prompt_len)
    start = time.perf_counter()
    try:
        async with client.stream("POST", url, json=payload) as response:
            if response.status_code != 200:
                recorder.error = http_error_message(response.status_code, await response.aread())
                return recorder.finish()
            async for line in response.aiter_lines():
                data = parse_sse_line(line)
                if data is not None:
                    recorder.on_data(data, time.perf_counter() - start)
                if recorder.error:
                    break
    except httpx.HTTPError as exc:
        recorder.error = recorder.error or f"{type(exc).__name__}: {exc or 'no details'}"
    return recorder.finish()


async def first_model_id(client: httpx.AsyncClient, root_url: str) -> str:
    """The first model id that ``GET /v1/models`` lists."""
    url = f"{root_url}/v1/models"
    try:
        response = await client.get(url)
    except httpx.HTTPError as exc:
        raise BenchError(f"cannot reach {url}: {type(exc).__name__}: {exc}") from None
    if response.status_code != 200:
        raise BenchError(f"GET {url} failed ({http_error_message(response.status_code, response.content)}); "
                         "pass --model")
    try:
        models = response.json()["data"]
        return str(models[0]["id"])
    except (ValueError, KeyError, IndexError, TypeError):
        raise BenchError(f"GET {url} listed no model; pass --model") from None
