"""A Docker CLI and daemon for the image tests: found, or started when this machine can start one.

With ``CI=true`` a missing Docker is a failure; elsewhere the tests that need it are skipped.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = ROOT / "scripts"
IN_CI = os.environ.get("CI") == "true"


def unavailable(reason: str) -> None:
    """Skip the test, or fail it in CI, where everything the Docker tests need is installed."""
    if IN_CI:
        pytest.fail(f"CI must run the Docker tests: {reason}", pytrace=False)
    pytest.skip(reason)


@dataclass(frozen=True)
class Docker:
    """One Docker CLI binary and the environment that makes its ``build`` use BuildKit."""

    cli: str
    env: dict[str, str] = field(default_factory=dict)

    def run(self, *args: str, timeout: float = 60, check: bool = True,
            extra_env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        """``docker ARGS``; raises with the command's output when ``check`` and it fails."""
        env = {**os.environ, **self.env, **(extra_env or {})}
        result = subprocess.run([self.cli, *args], capture_output=True, text=True, timeout=timeout, env=env)
        if check and result.returncode != 0:
            raise AssertionError(f"docker {' '.join(args)} exited {result.returncode}:\n"
                                 f"{result.stdout[-4000:]}\n{result.stderr[-4000:]}")
        return result

    def inspect(self, name: str, template: str) -> str:
        """``docker inspect -f TEMPLATE NAME``, stripped."""
        return self.run("inspect", "-f", template, name).stdout.strip()


def _quiet(args: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=30)


def find_cli() -> Docker | None:
    """The first Docker CLI that can build with BuildKit: with the buildx plugin, or a 20.10-era CLI whose
    built-in BuildKit ``DOCKER_BUILDKIT=1`` turns on (later CLIs need buildx for that)."""
    candidates = dict.fromkeys(p for p in (shutil.which("docker"), "/usr/bin/docker") if p and Path(p).exists())
    for cli in candidates:
        if _quiet([cli, "buildx", "version"]).returncode == 0:
            return Docker(cli)
        version = _quiet([cli, "version", "--format", "{{.Client.Version}}"]).stdout.strip()
        if version.split(".")[0].isdigit() and int(version.split(".")[0]) < 23:
            return Docker(cli, {"DOCKER_BUILDKIT": "1"})
    return None


def ensure_daemon(docker: Docker) -> int | None:
    """Make sure a daemon answers: start one with ``scripts/docker_daemon.sh`` when none does and this
    process may (root, ``dockerd`` on PATH). Returns the pid of a daemon started here, else None."""
    if docker.run("info", check=False, timeout=30).returncode == 0:
        return None
    if os.geteuid() != 0 or shutil.which("dockerd") is None:
        unavailable("no Docker daemon answers and this process cannot start dockerd (needs root and dockerd)")
    started = subprocess.run(["bash", str(SCRIPTS / "docker_daemon.sh")], capture_output=True, text=True,
                             timeout=120, env={**os.environ, "DOCKER": docker.cli})
    if started.returncode != 0:
        unavailable(f"dockerd did not start: {started.stderr[-2000:]}")
    return int(started.stdout.split()[-1]) if started.stdout.strip() else None


def find_compose(docker: Docker | None) -> list[str] | None:
    """``docker compose`` (the v2 plugin) or ``docker-compose`` (v1, Debian's package), whichever exists."""
    if docker is not None and _quiet([docker.cli, "compose", "version"]).returncode == 0:
        return [docker.cli, "compose"]
    legacy = shutil.which("docker-compose")
    return [legacy] if legacy else None
