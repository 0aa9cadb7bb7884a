"""The real thing: ``python -m server.distributed`` with 2 replicas of the bundled model in a local Ray
instance on loopback, driven over HTTP. The tests run in file order on one app: loopback sockets, prefix
affinity with outputs equal to a single server's, metrics, a replica killed mid-run, then SIGTERM."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families

from model.bundled import BUNDLED_MODEL_DIR
from server.api.settings import ServerSettings
from tests.distributed.serve_process import (
    ENGINE_FLAGS,
    SERVED_NAME,
    ServeProcess,
    replica_pids,
    requires_ray,
    serve_process,
    sse_payloads,
    wait_for_replicas,
)

pytestmark = [requires_ray, pytest.mark.timeout(180)]

LOOPBACK = {"127.0.0.1", "::ffff:127.0.0.1"}
DRAIN_TIMEOUT = 20
QUEUE_LIMIT = 2  # requests one replica takes at once
# Two long prompts that share nothing; each is asked with three different endings.
PREFIX_A = ("import os\nimport sys\n\n\nclass Config:\n    \"\"\"Settings read from the environment.\"\"\"\n\n"
            "    def __init__(self, environ=None):\n        self.environ = dict(environ or os.environ)\n"
            "        self.debug = self.environ.get('DEBUG', '') == '1'\n        self.path = self.environ.get("
            "'PATH', '').split(os.pathsep)\n\n    def get(self, key, default=None):\n        return "
            "self.environ.get(key, default)\n\n")
PREFIX_B = ("def parse_header(line):\n    \"\"\"Split a header line into its name and value.\"\"\"\n    name, "
            "_, value = line.partition(':')\n    return name.strip().lower(), value.strip()\n\n\ndef "
            "read_headers(stream):\n    headers = {}\n    for line in stream:\n        if not line.strip():\n"
            "            break\n        name, value = parse_header(line)\n        headers[name] = value\n"
            "    return headers\n\n")
ENDINGS = ["    def items(self):\n", "    def keys(self):\n", "    def __repr__(self):\n"]
FRESH = ["class Stack:\n    def __init__(self):\n        self.items = []\n\n    def push(self, item):\n",
         "async def main():\n    loop = asyncio.get_running_loop()\n    server = await loop.create_server("]


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeProcess]:
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    flags = [*ENGINE_FLAGS, "--num-replicas", "2", "--num-cpus-per-replica", "0.5", "--export-vllm-metrics",
             "--max-ongoing-requests", str(QUEUE_LIMIT), "--drain-timeout", str(DRAIN_TIMEOUT),
             "--log-level", "warning"]
    with serve_process(flags, log) as serve:
        wait_for_replicas(serve, 2, timeout=120)
        yield serve


@pytest.fixture(scope="module")
def client(app: ServeProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=app.url, timeout=60) as http:
        yield http


def _processes(root: psutil.Process) -> list[psutil.Process]:
    return [root, *root.children(recursive=True)]


def test_every_socket_of_ray_and_the_app_is_on_loopback(app: ServeProcess, client: httpx.Client) -> None:
    assert client.post("/v1/completions", json={"prompt": "x = ", "max_tokens": 2}).status_code == 200
    processes = _processes(psutil.Process(app.process.pid))
    names = " ".join(" ".join(p.cmdline()[:1]) for p in processes)
    assert "gcs_server" in names and "raylet" in names and "ServeReplica:jetmoe:EngineReplica" in names
    sockets, outside, environs = 0, [], []
    for process in processes:
        try:
            connections, environ = process.net_connections(kind="inet"), process.environ()
        except psutil.NoSuchProcess:  # a worker that ended meanwhile
            continue
        # /proc shows the environment a process started with (not the launcher's later setting), and none
        # where a process title was written over it.
        if process.pid != app.process.pid and "PATH" in environ:
            environs.append(environ)
        for conn in connections:
            sockets += 1
            for address in (conn.laddr, conn.raddr):
                if address and address.ip not in LOOPBACK:
                    outside.append((process.pid, " ".join(process.cmdline()[:2])[:80], conn.status, address))
    assert sockets > 20 and not outside, outside
    # No dashboard web server, no usage statistics.
    dashboards = [p for p in processes if any("dashboard.py" in part for part in p.cmdline())]
    assert all("--disable-frontend" in p.cmdline() for p in dashboards)
    assert len(environs) > 5 and all(environ.get("RAY_USAGE_STATS_ENABLED") == "0" for environ in environs)


def _complete(client: httpx.Client, prompt: str) -> tuple[str, dict[str, Any], str]:
    response = client.post("/v1/completions", json={"model": SERVED_NAME, "prompt": prompt, "max_tokens": 12,
                                                       "temperature": 0})
    assert response.status_code == 200, response.text
    return response.headers["x-jetmoe-replica"], response.json(), response.text


def _reference_completions(prompts: list[str]) -> list[str]:
    """The same requests, in the same order, on a single in-process server with the same engine flags."""
    import torch

    from tests.support.live_server import live_server

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with live_server(BUNDLED_MODEL_DIR, ServerSettings(served_model_name=SERVED_NAME), in_process=True) as server, \
                httpx.Client(base_url=server.url, timeout=60) as http:
            return [http.post("/v1/completions", json={"model": SERVED_NAME, "prompt": p, "max_tokens": 12,
                                                       "temperature": 0}).json()["choices"][0]["text"]
                    for p in prompts]
    finally:
        torch.set_num_threads(threads)


def test_prefix_affinity_and_outputs_equal_a_single_servers(client: httpx.Client) -> None:
    prompts = [prefix + ending for ending in ENDINGS for prefix in (PREFIX_A, PREFIX_B)]  # A, B, A, B, ...
    replicas: dict[str, list[str]] = {"A": [], "B": []}
    cached: dict[str, list[int]] = {"A": [], "B": []}
    texts = []
    for prompt in prompts:
        replica, body, _ = _complete(client, prompt)
        key = "A" if prompt.startswith(PREFIX_A) else "B"
        replicas[key].append(replica)
        cached[key].append(body["usage"]["prompt_tokens_details"]["cached_tokens"])
        texts.append(body["choices"][0]["text"])
    # Each prefix stays on one replica; the two new prefixes went to different replicas.
    assert len(set(replicas["A"])) == 1 and len(set(replicas["B"])) == 1, replicas
    assert replicas["A"][0] != replicas["B"][0], replicas
    for key in "AB":  # the repeated prefix is served from that replica's cache
        assert cached[key][0] == 0 and all(c >= 64 for c in cached[key][1:]), cached
    assert texts == _reference_completions(prompts)


def test_api_answers_as_a_single_server(client: httpx.Client) -> None:
    bad = client.post("/v1/completions", json={"prompt": "x", "max_tokens": -1})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "max_tokens"
    assert bad.headers["x-jetmoe-replica"]
    missing = client.post("/v1/chat/completions", json={"model": "nope", "messages": [{"role": "user",
                                                                                          "content": "hi"}]})
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"
    models = client.get("/v1/models").json()
    assert models["data"][0]["id"] == SERVED_NAME and models["data"][0]["max_model_len"] == 512
    with client.stream("POST", "/v1/chat/completions", json={
            "messages": [{"role": "user", "content": "import os"}], "max_tokens": 8, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}}) as stream:
        assert stream.headers["content-type"].startswith("text/event-stream")
        events = sse_payloads(list(stream.iter_lines()))
    assert events[-1] == "[DONE]" and events[-2]["usage"]["completion_tokens"] == 8


def _metrics(client: httpx.Client) -> tuple[dict[str, Any], set[str]]:
    response = client.get("/metrics")
    assert response.status_code == 200
    families = {f.name: f for f in text_string_to_metric_families(response.text)}
    return families, set(response.headers["x-jetmoe-replica"].split(","))


def _total(families: dict[str, Any], name: str, sample: str) -> float:
    return sum(s.value for s in families[name].samples if s.name == sample)


def test_metrics_through_the_app_carry_vllm_names_and_move(client: httpx.Client) -> None:
    before, names = _metrics(client)
    assert len(names) == 2
    for name in ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
                 "vllm:gpu_cache_usage_perc", "vllm:prefix_cache_hits", "vllm:prompt_tokens",
                 "vllm:generation_tokens", "vllm:time_to_first_token_seconds", "vllm:cache_config_info",
                 "jetmoe:prompt_tokens", "jetmoe:replica_info"):
        assert name in before, name
    assert {s.labels["replica"] for s in before["vllm:prompt_tokens"].samples} == names
    assert all(s.labels["model_name"] == SERVED_NAME for s in before["vllm:prompt_tokens"].samples)
    _complete(client, PREFIX_A + ENDINGS[0])
    after, _ = _metrics(client)
    assert _total(after, "vllm:prompt_tokens", "vllm:prompt_tokens_total") > \
        _total(before, "vllm:prompt_tokens", "vllm:prompt_tokens_total")
    assert _total(after, "vllm:generation_tokens", "vllm:generation_tokens_total") > \
        _total(before, "vllm:generation_tokens", "vllm:generation_tokens_total")
    assert _total(after, "vllm:prefix_cache_hits", "vllm:prefix_cache_hits_total") > \
        _total(before, "vllm:prefix_cache_hits", "vllm:prefix_cache_hits_total")


class _Stream(threading.Thread):
    """A streamed completion read on a thread: its events, and the replica that answered."""

    def __init__(self, url: str, prompt: str, max_tokens: int) -> None:
        super().__init__(daemon=True)
        self.url, self.prompt, self.max_tokens = url, prompt, max_tokens
        self.lines: list[str] = []
        self.last_line_at = 0.0  # time.monotonic() of the last line read
        self.replica: str | None = None
        self.first_token = threading.Event()
        self.leave = threading.Event()  # set: the client closes the stream
        self.error: BaseException | None = None

    def run(self) -> None:
        body = {"prompt": self.prompt, "max_tokens": self.max_tokens, "ignore_eos": True, "temperature": 0,
                "stream": True}
        try:
            with httpx.stream("POST", f"{self.url}/v1/completions", json=body, timeout=120) as response:
                self.replica = response.headers.get("x-jetmoe-replica")
                for line in response.iter_lines():
                    self.lines.append(line)
                    self.last_line_at = time.monotonic()
                    if line.startswith("data: {"):
                        self.first_token.set()
                    if self.leave.is_set():
                        break
        except BaseException as exc:  # reported by the test
            self.error = exc
        finally:
            self.first_token.set()

    def events(self) -> list[dict | str]:
        return sse_payloads(self.lines)


def _started(streams: list[_Stream]) -> list[_Stream]:
    for stream in streams:
        stream.start()
        assert stream.first_token.wait(60) and stream.error is None, stream.error
    return streams


def test_a_replica_at_its_queue_limit_is_skipped(app: ServeProcess, client: httpx.Client) -> None:
    home, _, _ = _complete(client, PREFIX_A + ENDINGS[0])
    busy = _started([_Stream(app.url, PREFIX_A + ending, 400) for ending in ENDINGS[:QUEUE_LIMIT]])
    try:
        assert {stream.replica for stream in busy} == {home}  # the prefix's replica, until it is full
        elsewhere, body, _ = _complete(client, PREFIX_A + ENDINGS[2])
        assert elsewhere != home and body["usage"]["completion_tokens"] > 0
        health = client.get("/health")  # probes never wait behind a full replica
        assert health.status_code == 200 and set(health.headers["x-jetmoe-replica"].split(",")) == {home, elsewhere}
    finally:
        for stream in busy:
            stream.leave.set()
            stream.join(60)


def test_a_killed_replica_fails_only_its_own_requests_and_is_replaced(app: ServeProcess,
                                                                       client: httpx.Client) -> None:
    pids = replica_pids(app.url)
    victim_stream, other_stream = _started([_Stream(app.url, PREFIX_A + ENDINGS[1], 400),
                                            _Stream(app.url, PREFIX_B + ENDINGS[1], 120)])
    assert victim_stream.replica != other_stream.replica
    psutil.Process(pids[victim_stream.replica]).kill()
    for stream in (victim_stream, other_stream):
        stream.join(120)
    killed, survived = victim_stream.events(), other_stream.events()
    assert survived[-1] == "[DONE]" and survived[-2]["choices"][0]["finish_reason"] == "length"
    assert "[DONE]" not in killed and killed[-1]["error"]["code"] == "engine_dead", killed[-3:]
    replaced = wait_for_replicas(app, 2, timeout=90, exclude=frozenset({victim_stream.replica}))
    assert other_stream.replica in replaced
    replica, body, _ = _complete(client, PREFIX_A + ENDINGS[2])
    assert replica in replaced and body["usage"]["completion_tokens"] > 0


def test_sigterm_drains_every_replica_then_exits_0(app: ServeProcess) -> None:
    streams = _started([_Stream(app.url, prompt, 250) for prompt in FRESH])
    assert len({s.replica for s in streams}) == 2  # two new prefixes: the least-loaded replica each
    started = time.monotonic()
    app.process.terminate()
    while httpx.get(f"{app.url}/health", timeout=30).status_code != 503:
        assert time.monotonic() - started < 10, "/health did not turn 503"
        time.sleep(0.1)
    late = httpx.post(f"{app.url}/v1/completions", json={"prompt": "x", "max_tokens": 2}, timeout=30)
    assert late.status_code == 503 and late.json()["error"]["code"] == "shutting_down"
    for stream in streams:
        stream.join(DRAIN_TIMEOUT + 10)
        events = stream.events()
        assert events[-1] == "[DONE]" and events[-2]["choices"][0]["finish_reason"] == "length", events[-2:]
        assert stream.last_line_at > started + 0.5, "the stream was not in flight during the drain"
    assert app.process.wait(DRAIN_TIMEOUT + 40) == 0, app.log_tail()
    assert time.monotonic() - started < DRAIN_TIMEOUT + 40
    assert not [p for p in psutil.process_iter(["cmdline"]) if "ServeReplica:jetmoe" in " ".join(
        p.info["cmdline"] or [])]
