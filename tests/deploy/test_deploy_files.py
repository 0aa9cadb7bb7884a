"""Deployment files: the Dockerfile lints clean and its arguments parse; compose, Kubernetes and Prometheus
files are valid YAML carrying what they promise."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from server.cli import parse_args

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = (ROOT / "Dockerfile").read_text()


def instruction(name: str) -> str:
    """The arguments of a Dockerfile instruction, with backslash continuations joined."""
    joined = re.sub(r"\\\n\s*", " ", DOCKERFILE)
    match = re.search(rf"^{name}\s+(.+)$", joined, re.MULTILINE)
    assert match, f"Dockerfile has no {name}"
    return match.group(1).strip()


def load(relative: str) -> list[dict]:
    return [doc for doc in yaml.safe_load_all((ROOT / relative).read_text()) if doc]


def test_hadolint_passes() -> None:
    binary = shutil.which("hadolint") or str(Path(__import__("sys").executable).parent / "hadolint")
    result = subprocess.run([binary, str(ROOT / "Dockerfile")], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_shape() -> None:
    # The default base is a pinned CUDA PyTorch image with a C compiler (the -devel variant): Triton compiles
    # its kernel launchers at run time.
    assert re.search(r"^ARG BASE_IMAGE=pytorch/pytorch:\d+\.\d+\.\d+-cuda[\d.]+-cudnn\d+-devel$", DOCKERFILE, re.M)
    assert re.search(r"^FROM \$\{BASE_IMAGE\}$", DOCKERFILE, re.M)
    assert "shutil.which('gcc')" in DOCKERFILE, "the build checks that CUDA torch comes with a C compiler"
    assert json.loads(instruction("ENTRYPOINT")) == ["jetmoe-serve"]
    assert instruction("EXPOSE") == "8000"
    assert re.match(r"^\d+(:\d+)?$", instruction("USER")), "run as a numeric non-root user"
    assert instruction("USER").split(":")[0] != "0"
    assert "/health" in instruction("HEALTHCHECK")
    assert "JETMOE_HOST=0.0.0.0" in DOCKERFILE
    ignored = (ROOT / ".dockerignore").read_text().split()
    for path in (".git", ".venv", "**/__pycache__", ".pytest_cache", "tests"):
        assert path in ignored
    assert "wheelhouse" not in ignored, "offline builds install from wheelhouse/ in the build context"


@pytest.mark.parametrize("extra", [[], ["--model", "/model"], ["--model", "/model", "--max-num-seqs", "128"]])
def test_image_arguments_are_accepted(extra: list[str], tmp_path: Path) -> None:
    cmd = json.loads(instruction("CMD"))
    argv = extra or cmd  # `docker run IMAGE ARGS` replaces CMD; the image's env binds 0.0.0.0
    args, settings, engine = parse_args(argv, environ={"JETMOE_HOST": "0.0.0.0", "JETMOE_PORT": "8000"})
    assert args.host == "0.0.0.0" and args.port == 8000
    assert engine.model == ("/model" if extra else str(args.model))
    assert settings.served_model_name


def test_compose_file() -> None:
    (compose,) = load("docker/compose.yaml")
    service = compose["services"]["jetmoe"]
    assert service["build"]["dockerfile"] == "Dockerfile"
    assert "8000:8000" in service["ports"]
    assert any(v.endswith(":/model:ro") for v in service["volumes"])
    assert service["command"][:2] == ["--model", "/model"]
    device = service["deploy"]["resources"]["reservations"]["devices"][0]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
    assert "/health" in " ".join(service["healthcheck"]["test"])


def test_kubernetes_manifests() -> None:
    (deployment,) = load("docker/kubernetes/deployment.yaml")
    assert deployment["kind"] == "Deployment"
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"]["path"] == "/health"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert container["args"][:2] == ["--model", "/model"]
    parse_args(container["args"], environ={"JETMOE_HOST": "0.0.0.0"})
    (service,) = load("docker/kubernetes/service.yaml")
    assert service["kind"] == "Service"
    assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]
    (hpa,) = load("docker/kubernetes/hpa.yaml")
    assert hpa["kind"] == "HorizontalPodAutoscaler"
    assert hpa["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    assert "num_requests_waiting" in hpa["spec"]["metrics"][0]["pods"]["metric"]["name"]


def test_prometheus_scrape_config() -> None:
    (config,) = load("docker/prometheus.yml")
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert jobs["jetmoe-serve"]["metrics_path"] == "/metrics"
    assert jobs["jetmoe-serve"]["static_configs"][0]["targets"] == ["localhost:8000"]


@pytest.mark.parametrize("path", ["Dockerfile", "docker/compose.yaml", "docker/kubernetes/deployment.yaml",
                                  "docker/kubernetes/service.yaml", "docker/kubernetes/hpa.yaml",
                                  "docker/prometheus.yml"])
def test_every_file_says_how_to_use_it(path: str) -> None:
    head = (ROOT / path).read_text().splitlines()[:4]
    assert any(line.startswith("#") for line in head)


def test_llm_d_example_routes_to_the_deployment() -> None:
    pool, config, route = load("docker/kubernetes/llm-d/inferencepool.yaml")
    (deployment,) = load("docker/kubernetes/deployment.yaml")
    assert pool["kind"] == "InferencePool" and pool["apiVersion"] == "inference.networking.k8s.io/v1"
    assert pool["spec"]["selector"]["matchLabels"] == deployment["spec"]["selector"]["matchLabels"]
    ports = deployment["spec"]["template"]["spec"]["containers"][0]["ports"]
    assert pool["spec"]["targetPorts"][0]["number"] in {p["containerPort"] for p in ports}
    assert "prefix-cache-scorer" in config["data"]["epp-config.yaml"]
    assert route["spec"]["rules"][0]["backendRefs"][0]["name"] == pool["metadata"]["name"]
    # The flags the example asks for exist.
    _, settings, engine = parse_args(["--export-vllm-metrics", "--kv-events-endpoint", "tcp://0.0.0.0:5557"])
    assert settings.export_vllm_metrics and engine.kv_events_endpoint == "tcp://0.0.0.0:5557"
