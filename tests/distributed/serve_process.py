"""``python -m server.distributed`` as a child process for the tests: start, wait for N replicas, stop.

The child runs in a session of its own, so that signals meant for pytest never reach Ray's processes; on exit
whatever of that session is still alive is killed.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from model.bundled import BUNDLED_MODEL_DIR

ROOT = Path(__file__).resolve().parents[2]
IN_CI = os.environ.get("CI", "").lower() == "true"
# CI installs the ray extra (Makefile): there a missing Ray fails these tests instead of skipping them.
requires_ray = pytest.mark.skipif(importlib.util.find_spec("ray") is None and not IN_CI,
                                  reason="Ray Serve is not installed (pip install -e '.[ray]')")

SERVED_NAME = "tiny-jetmoe"
# The bundled model with a small KV cache, as tests/support/live_server.py's ENGINE_DEFAULTS.
ENGINE_FLAGS = ["--model", str(BUNDLED_MODEL_DIR), "--served-model-name", SERVED_NAME, "--device", "cpu",
                "--dtype", "float32", "--block-size", "16", "--num-kv-blocks", "256", "--max-model-len", "512",
                "--cpu-threads", "1"]


@dataclass
class ServeProcess:
    process: subprocess.Popen[bytes]
    url: str
    log: Path

    def log_tail(self, chars: int = 6000) -> str:
        return self.log.read_text(errors="replace")[-chars:]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def replica_pids(url: str) -> dict[str, int]:
    """Replica name -> pid, from ``jetmoe:replica_info`` in the app's /metrics (empty when none answers)."""
    try:
        response = httpx.get(f"{url}/metrics", timeout=10)
    except httpx.HTTPError:
        return {}
    if response.status_code != 200:
        return {}
    return {s.labels["replica"]: int(s.labels["pid"])
            for family in text_string_to_metric_families(response.text) if family.name == "jetmoe:replica_info"
            for s in family.samples}


def wait_for_replicas(serve: ServeProcess, count: int, timeout: float, exclude: frozenset[str] = frozenset(),
                      ) -> dict[str, int]:
    """Wait until ``count`` replicas (none of them in ``exclude``) answer /metrics and /health is 200."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if serve.process.poll() is not None:
            raise AssertionError(f"the server exited with {serve.process.returncode}:\n{serve.log_tail()}")
        pids = replica_pids(serve.url)
        if len(pids) == count and not set(pids) & exclude:
            try:
                if httpx.get(f"{serve.url}/health", timeout=10).status_code == 200:
                    return pids
            except httpx.HTTPError:
                pass
        time.sleep(0.5)
    raise AssertionError(f"{count} replicas did not come up within {timeout:g} s:\n{serve.log_tail()}")


@contextmanager
def serve_process(flags: list[str], log: Path) -> Iterator[ServeProcess]:
    """The distributed server on a free 127.0.0.1 port with ``flags``, in a local Ray instance."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    with log.open("wb") as out:
        process = subprocess.Popen([sys.executable, "-m", "server.distributed", "--port", str(port), *flags],
                                   cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, start_new_session=True)
    serve = ServeProcess(process, f"http://127.0.0.1:{port}", log)
    try:
        yield serve
    finally:
        stop(serve)


def stop(serve: ServeProcess, timeout: float = 60.0) -> int | None:
    """SIGTERM (the drain), then after ``timeout`` kill what is left of the child's session."""
    if serve.process.poll() is None:
        serve.process.send_signal(signal.SIGTERM)
        with suppress(subprocess.TimeoutExpired):
            serve.process.wait(timeout)
    with suppress(ProcessLookupError, PermissionError):
        os.killpg(serve.process.pid, signal.SIGKILL)  # the session the child leads: Ray's processes
    serve.process.wait(10)
    return serve.process.returncode


def sse_payloads(lines: list[str]) -> list[dict | str]:
    """The data of an SSE stream's events: JSON objects, and the final ``[DONE]``."""
    out: list[dict | str] = []
    for line in lines:
        if line.startswith("data: "):
            data = line[len("data: "):]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out
