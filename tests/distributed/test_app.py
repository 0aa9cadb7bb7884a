"""The Serve application's options, built without starting Ray."""

from __future__ import annotations

import pytest

from tests.distributed.serve_process import requires_ray

pytestmark = requires_ray


def test_engine_deployment_options_follow_the_flags() -> None:
    from ray.serve.request_router import RequestRouter

    from server.distributed.app import ROUTER, gpus_per_replica, replica_options
    from server.distributed.cli import parse
    from server.distributed.router import PrefixAffinityRouter

    scale = parse(["--num-replicas", "2", "--min-replicas", "1", "--max-replicas", "5", "--max-num-seqs", "16",
                   "--num-cpus-per-replica", "3", "--drain-timeout", "7"], environ={}).scale
    options = replica_options(scale, num_gpus=1.0)
    assert options["autoscaling_config"] == {"min_replicas": 1, "initial_replicas": 2, "max_replicas": 5,
                                             "target_ongoing_requests": 16.0}
    assert "num_replicas" not in options and options["max_ongoing_requests"] == 32
    assert options["ray_actor_options"] == {"num_cpus": 3.0, "num_gpus": 1.0}
    assert options["graceful_shutdown_timeout_s"] > 7
    module, _, name = ROUTER.partition(":")
    assert module == PrefixAffinityRouter.__module__ and name == PrefixAffinityRouter.__name__
    assert issubclass(PrefixAffinityRouter, RequestRouter)
    fixed = replica_options(parse(["--num-replicas", "3"], environ={}).scale, num_gpus=0.0)
    assert fixed["num_replicas"] == 3 and "autoscaling_config" not in fixed
    assert gpus_per_replica(scale, "cuda:1", 0) == 1 and gpus_per_replica(scale, "cpu", 8) == 0
    assert gpus_per_replica(scale, "auto", 8) == 1 and gpus_per_replica(scale, "auto", 0) == 0


def test_builder_rejects_bad_arguments_with_the_flag_error() -> None:
    from server.distributed.app import build

    with pytest.raises(ValueError, match="--num-replicas"):
        build({"num-replicas": "zero"})
