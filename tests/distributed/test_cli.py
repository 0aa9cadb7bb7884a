"""Flags of ``python -m server.distributed``, the exit without Ray, the application builder's arguments and
the KubeRay manifest (none of these start Ray)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from server.distributed.cli import INSTALL_HINT, builder_argv, parse

ROOT = Path(__file__).resolve().parents[2]


def test_defaults_follow_the_engine_flags() -> None:
    parsed = parse(["--max-num-seqs", "8", "--served-model-name", "m"], environ={})
    scale = parsed.scale
    assert (scale.num_replicas, scale.autoscaling, scale.replica_range()) == (1, False, (1, 1, 1))
    assert scale.target_ongoing_requests == 8 and scale.max_ongoing_requests == 16
    assert scale.num_cpus_per_replica == 1 and scale.num_gpus_per_replica is None
    assert parsed.spec.cpu_threads == 1 and parsed.spec.engine.max_num_seqs == 8
    assert parsed.spec.settings.served_model_name == "m"


def test_every_single_server_flag_and_the_scaling_flags_parse() -> None:
    parsed = parse(["--num-replicas", "3", "--min-replicas", "0", "--max-replicas", "6", "--num-cpus-per-replica",
                    "4", "--num-gpus-per-replica", "1", "--cpu-threads", "2", "--api-key", "k",
                    "--export-vllm-metrics", "--max-queued-requests", "9", "--drain-timeout", "5"], environ={})
    assert parsed.scale.replica_range() == (0, 3, 6) and parsed.scale.autoscaling
    assert parsed.scale.num_gpus_per_replica == 1 and parsed.spec.cpu_threads == 2
    assert parsed.spec.settings.api_key == "k" and parsed.spec.settings.export_vllm_metrics
    assert parsed.spec.settings.max_queued_requests == 9 and parsed.scale.drain_timeout == 5
    assert parse(["--num-cpus-per-replica", "4"], environ={}).spec.cpu_threads == 4  # the engine core's
    in_process = parse(["--num-cpus-per-replica", "4", "--engine-in-process"], environ={}).spec
    assert in_process.engine_in_process and in_process.cpu_threads == 3  # one core left to the event loop
    assert parse(["--max-replicas", "4", "--num-replicas", "9"], environ={}).scale.replica_range() == (1, 4, 4)
    assert parse([], environ={"JETMOE_NUM_REPLICAS": "2"}).scale.num_replicas == 2


@pytest.mark.parametrize("argv,message", [
    (["--num-replicas", "0"], "expected a positive integer"),
    (["--min-replicas", "3", "--max-replicas", "2"], "--min-replicas must not be larger"),
    (["--num-gpus-per-replica", "-1"], "expected a number >= 0"),
    (["--target-ongoing-requests", "0"], "expected a positive number"),
    (["--num-kv-blocks", "4", "--kv-cache-memory", "1GiB"], "not both"),
])
def test_bad_flags_exit_2_with_one_line(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        parse(argv, environ={})
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_without_ray_the_command_says_how_to_install_it_and_exits_2() -> None:
    code = ("import sys; sys.modules['ray'] = None\n"  # as if Ray were not installed
            "from server.distributed.cli import main\n"
            "print('help exit', main(['--help']))\n"
            "sys.exit(main(['--num-replicas', '2']))")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2, result.stderr
    assert INSTALL_HINT in result.stderr and "pip install" in result.stderr
    assert "help exit 0" in result.stdout and "--num-replicas" in result.stdout and "--max-num-seqs" in result.stdout


def test_builder_arguments_become_the_same_flags() -> None:
    argv = builder_argv({"model": "/m", "num-replicas": 2, "max_replicas": 4, "export-vllm-metrics": True})
    assert argv == ["--model", "/m", "--num-replicas", "2", "--max-replicas", "4", "--export-vllm-metrics", "true"]
    parsed = parse(argv, environ={})
    assert parsed.scale.replica_range() == (1, 2, 4) and parsed.spec.settings.export_vllm_metrics


def test_rayservice_manifest_deploys_the_builder_with_valid_flags() -> None:
    (service,) = [d for d in yaml.safe_load_all((ROOT / "docker/kubernetes/ray/rayservice.yaml").read_text()) if d]
    assert service["apiVersion"] == "ray.io/v1" and service["kind"] == "RayService"
    serve_config = yaml.safe_load(service["spec"]["serveConfigV2"])
    (application,) = serve_config["applications"]
    assert application["import_path"] == "server.distributed.app:build" and application["route_prefix"] == "/"
    parsed = parse(builder_argv(application["args"]), environ={})
    assert parsed.spec.engine.model == "/model" and parsed.scale.autoscaling
    low, _, high = parsed.scale.replica_range()
    workers = service["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]
    assert workers["maxReplicas"] >= high and parsed.scale.num_gpus_per_replica == 1
    container = workers["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert service["spec"]["rayClusterConfig"]["rayVersion"].startswith("2.")
    assert serve_config["http_options"]["port"] == 8000
