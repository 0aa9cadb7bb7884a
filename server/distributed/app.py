"""The Ray Serve application: an ingress deployment in front of N engine-replica deployments.

Design. Each engine replica runs the single server's whole OpenAI app (``server.api.create_app``) over its
own engine, and the ingress forwards each HTTP request to one replica, untouched, through a
``DeploymentHandle`` whose router (``server.distributed.router``) picks the replica by prompt prefix; the
replica's answer is relayed back as it is produced. So every route, validation message, error body, the API
key check, SSE framing and the usage fields are the single server's by construction (it is the same code),
and streams stream (the handle streams the replica's response parts). The alternative, an ingress that
validates and tokenizes, then calls replicas' ``generate``, would need a second, parallel copy of the
request handling and of the engine's tokenizer in the ingress; routing on the prompt's text prefix instead
of its token blocks needs neither. The ingress handles two paths itself: ``/metrics`` (every replica's
series, labelled by ``replica``) and ``/health`` while draining.

``build`` is an application builder for ``serve run server.distributed.app:build model=/path ...`` and a
KubeRay ``RayService`` (``import_path: server.distributed.app:build`` with the same flags as ``args``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
from typing import Any, cast

from ray.serve import Application, Deployment

from server.distributed.cli import ScaleOptions, builder_argv, parse
from server.distributed.deployments import EngineReplica, Ingress
from server.distributed.replica import ReplicaSpec

APP_NAME = "jetmoe"
INGRESS_MAX_ONGOING_REQUESTS = 100_000  # the ingress only relays: requests wait for replicas, not for it
HEALTH_CHECK_PERIOD_S = 5.0
ROUTER = "server.distributed.router:PrefixAffinityRouter"


def gpus_per_replica(scale: ScaleOptions, device: str, cluster_gpus: float) -> float:
    """``--num-gpus-per-replica``, or by default one GPU on CUDA (``auto``: when the cluster has GPUs)."""
    if scale.num_gpus_per_replica is not None:
        return scale.num_gpus_per_replica
    if device.startswith("cuda"):
        return 1.0
    return 1.0 if device == "auto" and cluster_gpus > 0 else 0.0


def replica_options(scale: ScaleOptions, num_gpus: float) -> dict[str, Any]:
    """The engine deployment's Serve options: resources, queue limit, health checks, drain, scaling."""
    low, initial, high = scale.replica_range()
    scaling: dict[str, Any] = {"num_replicas": initial}
    if scale.autoscaling:
        scaling = {"autoscaling_config": {"min_replicas": low, "initial_replicas": initial, "max_replicas": high,
                                          "target_ongoing_requests": scale.target_ongoing_requests}}
    return {
        "ray_actor_options": {"num_cpus": scale.num_cpus_per_replica, "num_gpus": num_gpus},
        "max_ongoing_requests": scale.max_ongoing_requests,
        "health_check_period_s": HEALTH_CHECK_PERIOD_S,
        "graceful_shutdown_wait_loop_s": 0.5,
        "graceful_shutdown_timeout_s": scale.drain_timeout + 10.0,
        "request_router_config": {"request_router_class": ROUTER},
        **scaling,
    }


def build_application(spec: ReplicaSpec, scale: ScaleOptions, cluster_gpus: float = 0.0) -> Application:
    """The ingress bound to the engine deployment, for ``serve.run``."""
    num_gpus = gpus_per_replica(scale, spec.engine.device, cluster_gpus)
    engine = spec.engine
    if num_gpus >= 1 and engine.device.startswith("cuda:"):  # Ray hands each replica its own GPU(s)
        engine = dataclasses.replace(engine, device="cuda")
    replicas = cast(Deployment, EngineReplica).options(**replica_options(scale, num_gpus)).bind(
        dataclasses.replace(spec, engine=engine))
    return cast(Deployment, Ingress).options(ray_actor_options={"num_cpus": 0},
                           max_ongoing_requests=INGRESS_MAX_ONGOING_REQUESTS).bind(replicas, spec.settings)


def build(args: dict[str, Any]) -> Application:
    """Serve application builder: ``args`` are the command's flags (names with or without dashes)."""
    import ray

    errors = io.StringIO()
    try:
        with contextlib.redirect_stderr(errors):
            parsed = parse(builder_argv(args))
    except SystemExit:
        raise ValueError(f"invalid arguments for {APP_NAME}: {errors.getvalue().strip()}") from None
    gpus = float(ray.cluster_resources().get("GPU", 0.0)) if ray.is_initialized() else 0.0
    return build_application(parsed.spec, parsed.scale, gpus)
