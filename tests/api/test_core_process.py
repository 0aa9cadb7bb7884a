"""The engine core in its own process: a dead core is noticed at once, a dead API process takes the core with
it, a core that cannot load fails startup with its reason, and stop strings found in the API process end the
sequence in the core."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
import pytest

from server.engine.config import EngineConfig
from server.engine.multiproc.client import CoreStartupError, MultiprocEngine
from tests.support.live_server import SERVED_NAME, live_server

REPO = Path(__file__).resolve().parents[2]
LONG = {"model": SERVED_NAME, "prompt": "Once", "max_tokens": 400, "ignore_eos": True, "stream": True}


async def _stream_until_end(http: httpx.AsyncClient, started: asyncio.Event) -> tuple[list[str], float]:
    events: list[str] = []
    async with http.stream("POST", "/v1/completions", json=LONG) as response:
        async for line in response.aiter_lines():
            if line.startswith("data: "):
                events.append(line[6:])
                started.set()
    return events, time.monotonic()


async def _kill_core_under_streams(server, count: int) -> tuple[float, list[tuple[list[str], float]]]:
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
        started = [asyncio.Event() for _ in range(count)]
        tasks = [asyncio.create_task(_stream_until_end(http, event)) for event in started]
        await asyncio.wait_for(asyncio.gather(*(event.wait() for event in started)), 60)
        assert server.engine.stats().num_running == count
        killed = time.monotonic()
        os.kill(server.engine.process.pid, signal.SIGKILL)
        return killed, await asyncio.wait_for(asyncio.gather(*tasks), 10)


def test_a_killed_core_ends_every_stream_with_an_error_and_the_server_answers_503(engine_checkpoint) -> None:
    with live_server(engine_checkpoint[0], num_kv_blocks=256) as server:
        killed, results = asyncio.run(_kill_core_under_streams(server, 8))
        for events, ended in results:
            assert ended - killed < 2.0
            assert events[-1] != "[DONE]" and "choices" in json.loads(events[0])
            assert json.loads(events[-1])["error"]["code"] == "engine_dead"
        with httpx.Client(base_url=server.url, timeout=10) as http:
            health = http.get("/health")
            assert health.status_code == 503 and health.json()["error"]["code"] == "engine_dead"
            for body in ({**LONG, "max_tokens": 2}, {**LONG, "stream": False, "max_tokens": 2}):
                response = http.post("/v1/completions", json=body)
                assert response.status_code == 503 and response.json()["error"]["code"] == "engine_dead"
            assert http.get("/v1/models").status_code == 200  # the API process itself is up
        assert server.state.num_in_flight == 0


def test_the_core_exits_when_the_api_process_is_killed(engine_checkpoint) -> None:
    cmd = [sys.executable, "-m", "server", "--model", str(engine_checkpoint[0]), "--port", "0", "--device", "cpu",
           "--dtype", "float32", "--num-kv-blocks", "64", "--max-model-len", "256", "--cpu-threads", "1"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("JETMOE_")}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stderr is not None
        for line in proc.stderr:
            if "http://" in line:
                break
        children = psutil.Process(proc.pid).children(recursive=True)
        assert any("spawn" in " ".join(child.cmdline()) for child in children)  # the engine core
        proc.kill()
        proc.wait(10)
        _, alive = psutil.wait_procs(children, timeout=5)
        assert not [p for p in alive if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_a_core_that_cannot_load_the_model_fails_startup_with_its_reason(engine_checkpoint, tmp_path) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    for item in Path(engine_checkpoint[0]).iterdir():
        if item.name != "model.safetensors":
            (broken / item.name).write_bytes(item.read_bytes())
    engine = MultiprocEngine(EngineConfig(model=str(broken), device="cpu", dtype="float32", num_kv_blocks=16),
                             cpu_threads=1, log_level="error")
    with pytest.raises(CoreStartupError, match="safetensors|weights|checkpoint"):
        engine.start()
    assert not engine.process.is_alive()


def test_a_stop_string_ends_the_sequence_in_the_core(api_server) -> None:
    with httpx.Client(base_url=api_server.url, timeout=60) as http:
        body = {"model": SERVED_NAME, "prompt": "Once", "temperature": 0, "max_tokens": 6, "ignore_eos": True}
        text = http.post("/v1/completions", json=body).json()["choices"][0]["text"]
        stop = text[-3:]
        body = {**body, "max_tokens": 400, "stop": [stop], "n": 2}
        choices = http.post("/v1/completions", json=body).json()["choices"]
        assert [c["finish_reason"] for c in choices] == ["stop", "stop"]
        assert all(stop not in c["text"] and text.startswith(c["text"]) for c in choices)
        deadline = time.monotonic() + 1.0
        while api_server.engine.stats().num_running or api_server.engine.stats().kv_cache_usage:
            assert time.monotonic() < deadline, api_server.engine.stats()  # 400 tokens would take far longer
            time.sleep(0.01)
