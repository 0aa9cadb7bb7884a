"""An engine replica without Ray: the single server's app driven in-process (``ReplicaCore``), its health,
drain and metrics, and the merge of several replicas' metrics."""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from prometheus_client.parser import text_string_to_metric_families

from model.bundled import BUNDLED_MODEL_DIR
from server.api.settings import ServerSettings
from server.distributed.asgi import ForwardedRequest, ResponseStart
from server.distributed.metrics import merge_metrics
from server.distributed.replica import ReplicaCore, ReplicaDeadError
from tests.support.live_server import start_engine

SETTINGS = ServerSettings(served_model_name="tiny-jetmoe", export_vllm_metrics=True)


@contextmanager
def _replica() -> Iterator[ReplicaCore]:
    engine = start_engine(BUNDLED_MODEL_DIR, in_process=True)  # the core on a thread: quicker to start
    try:
        yield ReplicaCore(engine, SETTINGS, "replica-a")
    finally:
        engine.shutdown()


@pytest.fixture(scope="module")
def core() -> Iterator[ReplicaCore]:
    with _replica() as replica:
        yield replica


def _post(path: str, payload: dict) -> ForwardedRequest:
    body = json.dumps(payload).encode()
    return ForwardedRequest("POST", path, headers=((b"content-type", b"application/json"),
                                                   (b"content-length", str(len(body)).encode())), body=body)


async def _answer(core: ReplicaCore, request: ForwardedRequest) -> tuple[ResponseStart, list[bytes]]:
    parts = [part async for part in core.forward(request)]
    start, body = parts[0], parts[1:]
    assert isinstance(start, ResponseStart) and all(isinstance(p, bytes) for p in body)
    return start, body  # type: ignore[return-value]


def test_a_request_runs_through_the_single_servers_app(core: ReplicaCore) -> None:
    start, body = asyncio.run(_answer(core, _post("/v1/completions", {"prompt": "def f(x):", "max_tokens": 5,
                                                                        "temperature": 0})))
    assert start.status == 200 and start.header(b"x-jetmoe-replica") == b"replica-a" and start.replica == "replica-a"
    answer = json.loads(b"".join(body))
    assert answer["usage"]["completion_tokens"] == 5 and answer["model"] == "tiny-jetmoe"
    start, body = asyncio.run(_answer(core, _post("/v1/completions", {"prompt": "x", "max_tokens": 0})))
    assert start.status == 400 and json.loads(b"".join(body))["error"]["param"] == "max_tokens"
    start, body = asyncio.run(_answer(core, ForwardedRequest("GET", "/v1/models")))
    assert start.status == 200 and json.loads(b"".join(body))["data"][0]["id"] == "tiny-jetmoe"


def test_a_stream_streams_and_leaving_it_early_aborts_the_request(core: ReplicaCore) -> None:
    payload = {"prompt": "import os", "max_tokens": 6, "temperature": 0, "stream": True}
    start, body = asyncio.run(_answer(core, _post("/v1/completions", payload)))
    text = b"".join(body).decode()
    assert (start.header(b"content-type") or b"").startswith(b"text/event-stream")
    assert text.count("data: {") == 6 and text.rstrip().endswith("data: [DONE]")

    async def leave_early() -> None:
        parts = core.forward(_post("/v1/completions", {**payload, "max_tokens": 400, "ignore_eos": True}))
        async for part in parts:
            if isinstance(part, bytes) and b"data: {" in part:
                break
        await parts.aclose()  # type: ignore[attr-defined]

    asyncio.run(leave_early())
    deadline = time.monotonic() + 10
    while core.engine.num_unfinished or core.engine.stats().num_running:
        assert time.monotonic() < deadline, "the request was not aborted"
        time.sleep(0.05)


def test_metrics_name_the_replica_and_merge(core: ReplicaCore) -> None:
    asyncio.run(_answer(core, _post("/v1/completions", {"prompt": "x = 1", "max_tokens": 3})))
    name, text = asyncio.run(core.metrics())
    families = {f.name: f for f in text_string_to_metric_families(text)}
    (info,) = families["jetmoe:replica_info"].samples
    assert name == "replica-a" and info.labels["replica"] == "replica-a" and info.labels["pid"] == str(os.getpid())
    merged = merge_metrics([(name, text), ("replica-b", text.replace('replica="replica-a"', 'replica="replica-b"'))])
    assert merged.count(b"# TYPE vllm:prompt_tokens_total counter") == 1
    families = {f.name: f for f in text_string_to_metric_families(merged.decode())}
    prompt = [s for s in families["vllm:prompt_tokens"].samples if s.name == "vllm:prompt_tokens_total"]
    assert {s.labels["replica"] for s in prompt} == {"replica-a", "replica-b"}
    assert len({s.value for s in prompt}) == 1 and prompt[0].value >= 4  # "x = 1" with <s>, and earlier ones
    buckets = [s for s in families["vllm:time_to_first_token_seconds"].samples if s.name.endswith("_bucket")]
    assert {s.labels["replica"] for s in buckets} == {"replica-a", "replica-b"}
    assert {s.labels["replica"] for s in families["jetmoe:replica_info"].samples} == {"replica-a", "replica-b"}


def test_drain_refuses_new_requests_and_a_dead_engine_fails_the_health_check() -> None:
    with _replica() as core:
        _drain_then_die(core)


def _drain_then_die(core: ReplicaCore) -> None:
    core.check_health()
    asyncio.run(core.drain())
    start, body = asyncio.run(_answer(core, _post("/v1/completions", {"prompt": "x", "max_tokens": 2})))
    assert start.status == 503 and json.loads(b"".join(body))["error"]["code"] == "shutting_down"
    core.check_health()  # draining is not dead: Serve must not replace a draining replica
    asyncio.run(core.shutdown())
    with pytest.raises(ReplicaDeadError):
        core.check_health()
