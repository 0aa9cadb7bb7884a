"""The Docker image, built and run: offline from a wheelhouse on a base made from Debian packages, serving the
bundled model with host networking on a loopback port, as uid 10001, on a read-only root file system, reporting
healthy and stopping cleanly; plus ``docker compose config`` on the compose file.

Runs wherever a Docker daemon answers or can be started (root with ``dockerd``); in CI (``CI=true``) it must.
Every container and image made here is removed; the stand-in base image is kept as a cache.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import torch
import yaml

from tests.deploy.docker_env import ROOT, SCRIPTS, Docker, ensure_daemon, find_cli, find_compose, unavailable

pytestmark = pytest.mark.timeout(900)

STANDIN_BASE = "jetmoe-standin-base:bookworm"
DRAIN_TIMEOUT_S = 10
SERVED = "tiny-jetmoe"


@dataclass(frozen=True)
class Container:
    name: str
    url: str
    port: int
    started_s: float
    healthy_after_s: float


def _free_loopback_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def docker() -> Iterator[Docker]:
    cli = find_cli()
    if cli is None:
        unavailable("no Docker CLI that builds with BuildKit (install docker.io, or the buildx plugin)")
    assert cli is not None
    started = ensure_daemon(cli)
    yield cli
    if started is not None:
        os.kill(started, 15)


def _torch_for_image() -> tuple[str, str]:
    """The CPU torch the image gets: this machine's torch version, from where pip finds it here (a CUDA build
    here means PyTorch's CPU index is the place for the CPU wheel)."""
    base = torch.__version__.split("+")[0]
    default_index = "https://download.pytorch.org/whl/cpu" if torch.version.cuda else ""
    return f"torch=={base}", os.environ.get("JETMOE_DOCKER_TORCH_INDEX_URL", default_index)


@pytest.fixture(scope="module")
def image(docker: Docker, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The project's image on the stand-in base, built offline from ``wheelhouse/`` with a CA secret."""
    if docker.run("image", "inspect", STANDIN_BASE, check=False).returncode != 0:
        if os.geteuid() != 0 or subprocess.run(["which", "debootstrap"], capture_output=True).returncode != 0:
            unavailable("building the stand-in base image needs root and debootstrap")
        subprocess.run(["bash", str(SCRIPTS / "docker_standin_base.sh"), STANDIN_BASE], check=True, timeout=600,
                       env={**os.environ, "DOCKER": docker.cli})
    torch_spec, torch_index = _torch_for_image()
    subprocess.run(["bash", str(SCRIPTS / "docker_wheelhouse.sh")], check=True, timeout=600, cwd=ROOT,
                   env={**os.environ, "PYTHON": sys.executable, "TORCH_SPEC": torch_spec,
                        "TORCH_INDEX_URL": torch_index})
    ca = tmp_path_factory.mktemp("ca") / "proxy-ca.pem"
    ca.write_text("# a stand-in proxy CA bundle: trusted during the build, never kept in the image\n")
    tag = f"jetmoe-serve-test:{uuid.uuid4().hex[:12]}"
    docker.run("build", "--network", "host", "--build-arg", f"BASE_IMAGE={STANDIN_BASE}",
               "--build-arg", f"TORCH_SPEC={torch_spec}", "--secret", f"id=pip_ca,src={ca}",
               "-t", tag, str(ROOT), timeout=600)
    try:
        yield tag
    finally:
        docker.run("rmi", "-f", tag, check=False)


def _logs(docker: Docker, name: str) -> str:
    result = docker.run("logs", name, check=False)
    return (result.stdout + result.stderr)[-4000:]


@pytest.fixture(scope="module")
def container(docker: Docker, image: str) -> Iterator[Container]:
    """The image serving on a free loopback port with host networking, read-only root and a tmpfs /tmp."""
    port = _free_loopback_port()
    name = f"jetmoe-serve-test-{uuid.uuid4().hex[:12]}"
    started = time.monotonic()
    docker.run("run", "-d", "--name", name, "--network", "host", "--read-only", "--tmpfs", "/tmp",
               "-e", "JETMOE_HOST=127.0.0.1", "-e", f"JETMOE_PORT={port}",
               "-e", f"JETMOE_DRAIN_TIMEOUT={DRAIN_TIMEOUT_S}",
               "--health-interval", "1s", "--health-timeout", "5s", "--health-retries", "3", image)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = started + 120
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            running = docker.inspect(name, "{{.State.Running}}")
            assert running == "true" and time.monotonic() < deadline, \
                f"no /health 200 within 120 s (running: {running}):\n{_logs(docker, name)}"
            time.sleep(0.5)
        yield Container(name, url, port, started, time.monotonic() - started)
    finally:
        docker.run("rm", "-f", name, check=False)


def test_health_within_two_minutes(container: Container) -> None:
    assert container.healthy_after_s < 120
    response = httpx.get(f"{container.url}/health", timeout=5)
    assert response.status_code == 200 and response.json() == {"status": "ok"}


def test_host_network_and_loopback_only(docker: Docker, container: Container) -> None:
    assert docker.inspect(container.name, "{{.HostConfig.NetworkMode}}") == "host"
    assert f"at http://127.0.0.1:{container.port}" in _logs(docker, container.name)


def test_completion_is_the_bundled_models_greedy_output(container: Container) -> None:
    from transformers import AutoModelForCausalLM

    from model.bundled import BUNDLED_MODEL_DIR
    from model.tokenizer import Tokenizer
    from tests.support.live_server import greedy_reference

    hf = AutoModelForCausalLM.from_pretrained(BUNDLED_MODEL_DIR, dtype=torch.float32).eval()
    tokenizer = Tokenizer.from_dir(BUNDLED_MODEL_DIR)
    prompt = "def fibonacci(n):"
    ref = greedy_reference(hf, tokenizer, tokenizer.encode(prompt), 16)
    response = httpx.post(f"{container.url}/v1/completions", timeout=60, json={
        "model": SERVED, "prompt": prompt, "max_tokens": ref.max_tokens, "temperature": 0})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["object"] == "text_completion" and body["model"] == SERVED
    assert body["choices"][0]["text"] == ref.text and ref.text.strip()


def _sse_data(lines: Iterator[str]) -> list[str]:
    return [line[len("data: "):] for line in lines if line.startswith("data: ")]


def test_streamed_chat_ends_with_done(container: Container) -> None:
    request = {"model": SERVED, "messages": [{"role": "user", "content": "import os"}], "max_tokens": 12,
               "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{container.url}/v1/chat/completions", json=request, timeout=60) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = _sse_data(response.iter_lines())
    assert events[-1] == "[DONE]" and events.count("[DONE]") == 1
    chunks = [json.loads(event) for event in events[:-1]]
    assert all(chunk["object"] == "chat.completion.chunk" for chunk in chunks)
    assert chunks[0]["choices"][0]["delta"].get("role") == "assistant"
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert chunks[-1]["choices"][0]["finish_reason"] in ("length", "stop")


def test_server_process_is_not_root(docker: Docker, container: Container) -> None:
    status = docker.run("exec", container.name, "cat", "/proc/1/status").stdout
    uids = next(line.split()[1:] for line in status.splitlines() if line.startswith("Uid:"))
    assert uids == ["10001"] * 4
    assert docker.run("exec", container.name, "id", "-un").stdout.strip() == "jetmoe"


def test_healthcheck_reports_healthy(docker: Docker, container: Container) -> None:
    deadline = time.monotonic() + 60
    while (status := docker.inspect(container.name, "{{.State.Health.Status}}")) != "healthy":
        assert status == "starting" and time.monotonic() < deadline, status
        time.sleep(0.5)
    log = json.loads(docker.inspect(container.name, "{{json .State.Health.Log}}"))
    assert log[-1]["ExitCode"] == 0


def test_read_only_root_still_serves(docker: Docker, container: Container) -> None:
    assert docker.inspect(container.name, "{{.HostConfig.ReadonlyRootfs}}") == "true"
    denied = docker.run("exec", container.name, "touch", "/home/jetmoe/probe", check=False)
    assert denied.returncode != 0 and "Read-only file system" in denied.stderr
    docker.run("exec", container.name, "touch", "/tmp/probe")
    assert httpx.get(f"{container.url}/v1/models", timeout=5).json()["data"][0]["id"] == SERVED


def test_build_secrets_and_wheels_stay_out_of_the_image(docker: Docker, container: Container) -> None:
    # The build's mount points stay behind, empty.
    mounted = docker.run("exec", "-u", "0", container.name, "find", "/src", "/run/secrets", "-mindepth", "1",
                         "!", "-type", "d", "-size", "+0")
    assert mounted.stdout.split() == []
    copied = docker.run("exec", "-u", "0", container.name, "find", "/opt/venv", "/etc", "/tmp", "/home/jetmoe",
                        "-name", "*.whl", "-o", "-name", "pip-ca.pem", "-o", "-name", "requirements.txt", timeout=120)
    assert copied.stdout.split() == []
    # The CA bundle's text nowhere a build could have written it (the venv is covered by name above).
    found = docker.run("exec", "-u", "0", container.name, "grep", "-rl", "stand-in proxy CA", "/etc", "/home/jetmoe",
                       "/opt/venv/pyvenv.cfg", check=False, timeout=120)
    assert found.returncode == 1 and found.stdout == "", found.stdout


def test_stop_drains_in_flight_request_and_exits_zero(docker: Docker, container: Container) -> None:
    """Last in this module: it stops the container."""
    request = {"model": SERVED, "prompt": "class Stack:", "max_tokens": 48, "temperature": 0,
               "ignore_eos": True, "stream": True}
    first_chunk = threading.Event()
    events: list[str] = []

    def stream() -> None:
        with httpx.stream("POST", f"{container.url}/v1/completions", json=request, timeout=60) as response:
            for event in _sse_data(response.iter_lines()):
                events.append(event)
                first_chunk.set()

    reader = threading.Thread(target=stream, daemon=True)
    reader.start()
    assert first_chunk.wait(30)
    started = time.monotonic()
    stopped = docker.run("stop", "-t", str(DRAIN_TIMEOUT_S + 20), container.name, timeout=DRAIN_TIMEOUT_S + 30)
    elapsed = time.monotonic() - started
    reader.join(10)
    assert stopped.returncode == 0 and elapsed < DRAIN_TIMEOUT_S, elapsed
    assert docker.inspect(container.name, "{{.State.ExitCode}} {{.State.OOMKilled}}") == "0 false"
    assert events[-1] == "[DONE]"
    chunks = [json.loads(event) for event in events[:-1]]
    assert not [chunk for chunk in chunks if "error" in chunk], "the in-flight stream was cut, not drained"
    finished = [chunk["choices"][0]["finish_reason"] for chunk in chunks if chunk["choices"]]
    assert finished[-1] == "length" and all(reason is None for reason in finished[:-1])


def test_compose_file_validates(tmp_path: Path) -> None:
    compose = find_compose(find_cli())
    if compose is None:
        unavailable("neither `docker compose` nor `docker-compose` is installed")
    assert compose is not None
    command = [*compose, "-f", str(ROOT / "docker/compose.yaml"), "config"]
    env = {k: v for k, v in os.environ.items() if k != "JETMOE_MODEL_DIR"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=60,
                            env={**env, "JETMOE_MODEL_DIR": str(tmp_path)})
    assert result.returncode == 0, result.stderr
    service = yaml.safe_load(result.stdout)["services"]["jetmoe"]
    assert Path(service["build"]["context"]) == ROOT
    assert str(tmp_path) in json.dumps(service["volumes"]) and "/model" in json.dumps(service["volumes"])
    missing = subprocess.run(command, capture_output=True, text=True, timeout=60, env=env)
    assert missing.returncode != 0 and "set JETMOE_MODEL_DIR" in missing.stdout + missing.stderr
