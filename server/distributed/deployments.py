"""The two Serve deployments: ``Ingress`` (the HTTP entry, ``server.distributed.ingress``) and
``EngineReplica`` (one engine each, ``server.distributed.replica``)."""

from __future__ import annotations

from collections.abc import AsyncIterator

from fastapi import FastAPI
from ray import serve
from ray.serve.handle import DeploymentHandle

from server.api.settings import ServerSettings
from server.distributed.asgi import ForwardedRequest, ResponseStart
from server.distributed.ingress import IngressState, build_ingress_app
from server.distributed.loopback import keep_replica_grpc_on_loopback
from server.distributed.replica import ReplicaCore, ReplicaSpec, build_engine


@serve.deployment
class EngineReplica:
    """One engine and the single server's app over it. Serve's health check fails once the engine is dead (and
    Serve replaces the replica); stopping the replica drains it."""

    def __init__(self, spec: ReplicaSpec) -> None:
        keep_replica_grpc_on_loopback()
        self.name = serve.get_replica_context().replica_id.unique_id
        self.core = ReplicaCore(build_engine(spec), spec.settings, self.name)

    async def forward(self, request: ForwardedRequest,
                      prefix: tuple[int, ...] = ()) -> AsyncIterator[ResponseStart | bytes]:
        """The app's answer to one HTTP request (``prefix``, its prompt's prefix hashes, is for the router)."""
        async for part in self.core.forward(request):
            yield part

    async def metrics(self) -> tuple[str, str]:
        """(replica name, /metrics text)."""
        return await self.core.metrics()

    async def healthy(self) -> tuple[str, bool]:
        """(replica name, whether /health answers 200)."""
        return await self.core.healthy()

    async def drain(self) -> None:
        await self.core.drain()

    def check_health(self) -> None:
        """Serve's health check: raises while the engine is dead."""
        self.core.check_health()

    async def __del__(self) -> None:
        core = getattr(self, "core", None)
        if core is not None:
            await core.shutdown()


@serve.deployment
@serve.ingress()
class Ingress:
    """The HTTP entry: forwards every request to the engine replica the prefix-affinity router picks."""

    def __init__(self, engines: DeploymentHandle, settings: ServerSettings) -> None:
        keep_replica_grpc_on_loopback()
        self.state = IngressState(engines, settings)

    def __serve_build_asgi_app__(self) -> FastAPI:
        return build_ingress_app(self.state)

    async def drain(self) -> None:
        """Drain every engine replica (what SIGTERM does); /health answers 503 from now on."""
        await self.state.drain()
