"""One engine replica: an engine and the single server's OpenAI app over it, driven in-process.

``build_engine`` is the one place a replica makes its engine; the replica needs only the ``EngineClient``
interface of ``server.engine.client`` (``create_app`` takes it; ``is_alive`` for the health check). ``ReplicaCore`` holds the engine and ``server.api.create_app``'s app; the Serve deployment
(``server.distributed.deployments.EngineReplica``) is a thin shell around it, so that this part runs and is
tested without Ray.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from server.api.settings import ServerSettings
from server.distributed.asgi import ForwardedRequest, ResponseStart, run_asgi
from server.engine.config import EngineConfig

if TYPE_CHECKING:
    from server.engine.client import EngineClient

logger = logging.getLogger(__name__)

REPLICA_HEADER = b"x-jetmoe-replica"


@dataclass(frozen=True)
class ReplicaSpec:
    """What every engine replica is built from: the engine's config, the API's settings, the PyTorch threads
    of its engine core on CPU, whether the core runs on a thread of the replica instead of its own process,
    and the core's log level."""

    engine: EngineConfig
    settings: ServerSettings
    cpu_threads: int = 1
    engine_in_process: bool = False
    log_level: str = "info"


def build_engine(spec: ReplicaSpec) -> EngineClient:
    """A started engine for ``spec``: the one place a replica makes its engine (as ``jetmoe-serve`` does: the
    core in a child process of the replica, or with ``engine_in_process`` on a thread of it)."""
    # NOTE: torch is imported here, not at module level, so that the CLI and the ingress never load it.
    import torch

    engine: EngineClient
    if spec.engine_in_process:
        from server.engine.async_engine import AsyncEngine
        from server.engine.llm_engine import LLMEngine

        torch.set_num_threads(spec.cpu_threads)
        engine = AsyncEngine(LLMEngine.from_config(spec.engine))
    else:
        from server.engine.multiproc.client import MultiprocEngine

        torch.set_num_threads(1)  # the replica's own process: tokenization, detokenization, HTTP
        engine = MultiprocEngine(spec.engine, cpu_threads=spec.cpu_threads, log_level=spec.log_level)
    engine.start()
    return engine


class ReplicaDeadError(RuntimeError):
    """The replica's engine is not running (Serve's health check fails and the replica is replaced)."""


class ReplicaCore:
    """An engine, the OpenAI app over it, and what the ingress asks of a replica."""

    def __init__(self, engine: EngineClient, settings: ServerSettings, name: str) -> None:
        from server.api import create_app

        self.engine = engine
        self.settings = settings
        self.name = name
        self.app = create_app(engine, settings)
        self._headers = ((REPLICA_HEADER, name.encode()),)

    def forward(self, request: ForwardedRequest) -> AsyncIterator[ResponseStart | bytes]:
        """The app's response to ``request``: a ``ResponseStart`` naming this replica, then body parts."""
        return run_asgi(self.app, request, self.name, self._headers)

    async def get(self, path: str) -> tuple[int, bytes]:
        """``GET path`` through the app: the status and the whole body."""
        status, parts = 0, []
        async for part in self.forward(ForwardedRequest("GET", path)):
            if isinstance(part, ResponseStart):
                status = part.status
            else:
                parts.append(part)
        return status, b"".join(parts)

    async def metrics(self) -> tuple[str, str]:
        """(this replica's name, its ``/metrics`` text with a ``jetmoe:replica_info`` line naming it)."""
        status, body = await self.get("/metrics")
        if status != 200:
            raise ReplicaDeadError(f"/metrics answered {status}")
        return self.name, body.decode() + self._info()

    async def healthy(self) -> tuple[str, bool]:
        """(this replica's name, whether its ``/health`` answers 200: engine running, not draining)."""
        status, _ = await self.get("/health")
        return self.name, status == 200

    def check_health(self) -> None:
        """Raise while the engine loop is dead."""
        if not self.engine.is_alive:
            raise ReplicaDeadError(f"the engine of replica {self.name} is not running")

    async def drain(self) -> None:
        """What SIGTERM does to a single server: admit nothing new (503), let in-flight requests run up to the
        drain timeout, then end the rest with 503 (a stream with an error event and ``[DONE]``)."""
        from server.api.app import drain

        await drain(self.app.state.api)

    async def shutdown(self) -> None:
        """Drain (Serve has waited for in-flight requests already), then stop the engine."""
        from server.api.app import drain_and_stop

        await drain_and_stop(self.app.state.api)

    def _info(self) -> str:
        registry = CollectorRegistry()
        family = GaugeMetricFamily("jetmoe:replica_info", "The engine replica behind these series (value 1).",
                                   labels=["model_name", "replica", "node", "pid"])
        family.add_metric([self.settings.served_model_name, self.name, socket.gethostname(), str(os.getpid())],
                          1.0)
        registry.register(_Fixed(family))
        return generate_latest(registry).decode()


class _Fixed(Collector):
    """A collector of one ready metric family."""

    def __init__(self, family: Metric) -> None:
        self.family = family

    def collect(self) -> Iterator[Metric]:
        yield self.family
