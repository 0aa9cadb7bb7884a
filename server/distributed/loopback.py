"""A local Ray instance that lives on the loopback interface only.

By default Ray takes the machine's interface address as the node's IP, and its processes listen on every
interface. A local instance started by ``python -m server.distributed`` must not: ``local_ray_environment``
is set before Ray is imported, so that Ray uses 127.0.0.1 as the node IP (its single-machine mode, which
binds the GCS, the raylet, the agents, the workers and Serve's actors to the node IP) and reports no usage
statistics. The driver starts Ray without a dashboard.

One listener ignores the node IP: every Serve replica opens its inter-deployment gRPC server on ``[::]``.
``keep_replica_grpc_on_loopback`` (called first thing in each replica's constructor, which runs before that
server starts) binds it to 127.0.0.1 instead, when the replica's node IP is 127.0.0.1. On a cluster
(``RAY_ADDRESS``, ``serve run``, KubeRay) nothing here applies.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

LOOPBACK = "127.0.0.1"
_WILDCARD_HOSTS = ("[::]", "0.0.0.0", "::", "")


def local_ray_environment() -> dict[str, str]:
    """Environment for a loopback-only local Ray instance (set before ``import ray``)."""
    return {
        # Ray's single-machine mode: the node IP (and every address Ray binds or dials) is 127.0.0.1.
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        "RAY_USAGE_STATS_ENABLED": "0",
    }


def loopback_address(address: str) -> str:
    """``host:port`` with a wildcard host replaced by 127.0.0.1 (other hosts unchanged)."""
    host, _, port = address.rpartition(":")
    return f"{LOOPBACK}:{port}" if host in _WILDCARD_HOSTS else address


def keep_replica_grpc_on_loopback() -> bool:
    """On a loopback-only node, make this Serve replica bind its gRPC server to 127.0.0.1; whether it does."""
    import ray
    from ray.serve._private import replica as serve_replica

    if ray.util.get_node_ip_address() != LOOPBACK:
        return False
    original: Callable[[Any, str], int] = serve_replica.add_port_to_grpc_server
    if getattr(original, "binds_loopback", False):
        return True

    def add_port_on_loopback(server: Any, address: str) -> int:
        return original(server, loopback_address(address))

    add_port_on_loopback.binds_loopback = True  # type: ignore[attr-defined]
    serve_replica.add_port_to_grpc_server = add_port_on_loopback
    return True
