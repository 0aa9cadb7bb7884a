"""Connection hygiene against a real ``python -m server`` on loopback: a flood of silent connections under a
lowered file limit, headers and bodies sent too slowly, the parser's own errors, and the SIGTERM drain."""

from __future__ import annotations

import contextlib
import json
import os
import re
import resource
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

REPO = Path(__file__).resolve().parents[2]
HEADER_TIMEOUT = 4.0


@contextmanager
def server_process(checkpoint: Path, log: Path, *flags: str, file_limit: int | None = None) -> Iterator[tuple]:
    """``python -m server`` on a free loopback port, its log in ``log``: yields ``(process, url)``."""
    cmd = [sys.executable, "-m", "server", "--model", str(checkpoint), "--port", "0", "--device", "cpu",
           "--dtype", "float32", "--num-kv-blocks", "256", "--max-model-len", "512", "--served-model-name",
           "tiny", "--header-timeout", str(HEADER_TIMEOUT), *flags]
    env = {k: v for k, v in os.environ.items() if not k.startswith("JETMOE_")}

    def limit_files() -> None:
        if file_limit is not None:
            resource.setrlimit(resource.RLIMIT_NOFILE, (file_limit, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))

    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stderr=out, stdout=subprocess.DEVNULL,
                                preexec_fn=limit_files)
    try:
        deadline = time.monotonic() + 120
        while (match := re.search(r"at (http://127\.0\.0\.1:\d+)", log.read_text())) is None:
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.2)
        yield proc, match.group(1)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


def closed_by_server(sock: socket.socket, timeout: float) -> bytes | None:
    """What the server sent before closing ``sock`` within ``timeout`` s (None: still open)."""
    sock.settimeout(timeout)
    data = b""
    try:
        while chunk := sock.recv(4096):
            data += chunk
    except TimeoutError:
        return None
    except ConnectionResetError:
        pass
    return data


def test_a_flood_of_silent_connections_leaves_the_server_serving(engine_checkpoint, tmp_path) -> None:
    log = tmp_path / "server.log"
    with server_process(engine_checkpoint[0], log, "--log-level", "info", file_limit=1024) as (_, url):
        size_before = log.stat().st_size
        started = time.monotonic()
        flood = [socket.create_connection(("127.0.0.1", port_of(url))) for _ in range(1500)]
        try:
            time.sleep(HEADER_TIMEOUT + 1.5 - (time.monotonic() - started))  # the silent ones have timed out
            probe = time.monotonic()
            assert httpx.get(f"{url}/health", timeout=5).status_code == 200
            body = {"model": "tiny", "prompt": "Hello", "max_tokens": 4}
            assert httpx.post(f"{url}/v1/completions", json=body, timeout=5).status_code == 200
            assert time.monotonic() - probe < 5
            # Closed by twice the timeout (the 10 s timeout, 20 s bound), plus slack for a loaded machine.
            closed_by = started + 2 * HEADER_TIMEOUT + 4
            answers = [closed_by_server(s, timeout=max(0.05, closed_by - time.monotonic())) for s in flood]
            assert all(a is not None for a in answers), f"{answers.count(None)} idle connections left open"
            kinds = {a.split(b"\r\n", 1)[0] for a in answers if a}
            assert kinds <= {b"HTTP/1.1 408 Request Timeout", b"HTTP/1.1 503 Service Unavailable"}, kinds
            assert any(a.startswith(b"HTTP/1.1 408") for a in answers)  # accepted, then timed out
            assert json.loads(next(a for a in answers if a).split(b"\r\n\r\n", 1)[1])["error"]["code"]
        finally:
            for s in flood:
                s.close()
        assert log.stat().st_size - size_before < 1 << 20


def test_slow_headers_and_slow_bodies_are_cut_off(engine_checkpoint, tmp_path) -> None:
    with server_process(engine_checkpoint[0], tmp_path / "server.log", "--body-timeout", "3") as (_, url):
        port = port_of(url)
        results: dict[str, bytes | None] = {}

        def trickle(name: str, head: bytes, body: bytes) -> None:
            sock = socket.create_connection(("127.0.0.1", port))
            sock.sendall(head)
            sock.settimeout(0.5)
            started = time.monotonic()
            for byte in body:
                try:
                    sock.send(bytes([byte]))
                except OSError:
                    break
                try:
                    if sock.recv(1, socket.MSG_PEEK):
                        break  # the server answered
                except TimeoutError:
                    pass
                if time.monotonic() - started > 15:
                    break
            results[name] = closed_by_server(sock, 2.0)
            results[name + " seconds"] = str(time.monotonic() - started).encode()
            sock.close()

        post = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        jobs = {
            "slow head": (b"", b"GET /health HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"a" * 60 + b"\r\n\r\n"),
            "slow body": (post + b"Content-Length: 200\r\n\r\n", b"{" + b" " * 199),
            "endless chunks": (post + b"Transfer-Encoding: chunked\r\n\r\n", b"1\r\n \r\n" * 30),
        }
        threads = [threading.Thread(target=trickle, args=(name, *job)) for name, job in jobs.items()]
        for thread in threads:
            thread.start()
        time.sleep(1.0)
        assert httpx.get(f"{url}/health", timeout=5).status_code == 200  # others are unaffected
        for thread in threads:
            thread.join(30)
        assert results["slow head"].startswith(b"HTTP/1.1 408")
        assert float(results["slow head seconds"]) < HEADER_TIMEOUT + 2
        for name in ("slow body", "endless chunks"):
            assert results[name].startswith(b"HTTP/1.1 408"), (name, results[name])
            assert b'"code":"request_timeout"' in results[name].replace(b" ", b"")
            assert float(results[name + " seconds"]) < 3 + 2.5


@pytest.fixture(scope="module")
def plain_server(engine_checkpoint, tmp_path_factory):
    with server_process(engine_checkpoint[0], tmp_path_factory.mktemp("plain") / "server.log") as (_, url):
        yield url


@pytest.mark.parametrize(("raw", "what"), [
    (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n", "bad Content-Length"),
    (b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 200_000 + b"\r\n\r\n", "200 KB header"),
])
def test_the_parsers_errors_are_openai_json(plain_server, raw: bytes, what: str) -> None:
    sock = socket.create_connection(("127.0.0.1", port_of(plain_server)))
    with contextlib.suppress(OSError):  # the server may close before reading everything
        sock.sendall(raw)
    answer = closed_by_server(sock, 10.0)
    sock.close()
    assert answer is not None and answer.startswith(b"HTTP/1.1 400"), (what, answer)
    head, body = answer.split(b"\r\n\r\n", 1)
    assert b"content-type: application/json" in head.lower()
    assert set(json.loads(body)["error"]) == {"message", "type", "param", "code"}
    assert httpx.get(f"{plain_server}/health", timeout=5).status_code == 200


def test_sigterm_drains_then_ends_every_stream_with_an_error_and_done(engine_checkpoint, tmp_path) -> None:
    flags = ("--drain-timeout", "3", "--max-num-seqs", "32")
    with server_process(engine_checkpoint[0], tmp_path / "server.log", *flags) as (proc, url):
        body = {"model": "tiny", "prompt": "Once", "max_tokens": 480, "ignore_eos": True, "stream": True}
        events: dict[int, list[str]] = {}
        started = threading.Barrier(21)

        def stream(i: int) -> None:
            lines: list[str] = []
            with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as response:
                iterator = response.iter_lines()
                first = next(line for line in iterator if line.startswith("data: "))
                lines.append(first[6:])
                started.wait(30)
                lines += [line[6:] for line in iterator if line.startswith("data: ")]
            events[i] = lines

        threads = [threading.Thread(target=stream, args=(i,)) for i in range(20)]
        for thread in threads:
            thread.start()
        started.wait(60)
        signalled = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        during = httpx.get(f"{url}/health", timeout=5)  # a new connection: the socket still answers
        assert during.status_code == 503 and during.json()["error"]["code"] == "shutting_down"
        refused = httpx.post(f"{url}/v1/completions", json={**body, "stream": False}, timeout=5)
        assert refused.status_code == 503
        for thread in threads:
            thread.join(30)
        assert proc.wait(15) == 0
        assert time.monotonic() - signalled < 3 + 5
    assert len(events) == 20
    cut = 0
    for lines in events.values():
        assert lines[-1] == "[DONE]", lines[-3:]  # no stream is truncated
        last = json.loads(lines[-2])
        if "error" in last:  # still running at the drain timeout: ended with the error event
            assert last["error"]["code"] == "shutting_down" and last["error"]["type"] == "server_error"
            cut += 1
        else:  # finished within the drain timeout: complete
            assert last["choices"][0]["finish_reason"] == "length"
        assert all("choices" in json.loads(line) for line in lines[:-2])
    assert cut > 0, "every stream finished before the drain timeout: nothing was cut"
