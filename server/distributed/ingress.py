"""The ingress app: a thin FastAPI app in front of the engine replicas.

It applies the single server's body limits (413/408, the same middleware), reads the body, computes the
prompt's prefix hashes (``server.distributed.prefix``) and forwards the whole request to one engine replica
through the engine deployment's handle, whose router picks the replica (``server.distributed.router``). The
replica answers it with the single server's own app, and the ingress relays that answer as it comes: status,
headers (``x-jetmoe-replica`` among them), then the body, so SSE streams stream. Two paths are the ingress's
own, answered from every replica at once (Serve's broadcast, which no queue limit holds up): ``/metrics``
merges every replica's series (``server.distributed.metrics``), and ``/health`` answers 200 while one replica
or more is healthy (naming them in ``x-jetmoe-replica``), 503 while the application drains or none is.

A replica that fails before its answer starts gives that request a 503 (``engine_dead``, OpenAI's shape);
one that fails mid-stream ends that stream with an error event, as the single server does when its engine
dies. Other requests, on other replicas, go on.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any, cast

from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.types import Receive

from server.api.body import BodySizeLimitMiddleware
from server.api.errors import APIError, install_error_handlers
from server.api.settings import ServerSettings
from server.distributed.asgi import ForwardedRequest, ResponseStart
from server.distributed.metrics import merge_metrics
from server.distributed.prefix import request_prefix
from server.distributed.replica import REPLICA_HEADER
from server.distributed.router import PREFIX_KWARG

if TYPE_CHECKING:
    from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator

logger = logging.getLogger(__name__)

PROBE_TIMEOUT_S = 10.0
_METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]


class IngressState:
    """The engine deployment's handle, the API settings, and whether the application drains."""

    def __init__(self, engines: DeploymentHandle, settings: ServerSettings) -> None:
        self.engines = engines
        self.settings = settings
        self.draining = False
        # NOTE: made once: each handle made by .options() has its own router, and the router's state (which
        # prefix went where, what is in flight) must outlive a request.
        self._forward = engines.options(method_name="forward", stream=True)

    def stream(self, request: ForwardedRequest) -> DeploymentResponseGenerator:
        """Send ``request`` to the replica the router picks for its prompt prefix."""
        prefix = request_prefix(request.path, request.body)
        return cast("DeploymentResponseGenerator", self._forward.remote(request, **{PREFIX_KWARG: prefix}))

    async def ask_every_replica(self, method: str) -> list[Any]:
        """What every replica's ``method`` returned (Serve's broadcast: no queue limit, so a probe never waits
        behind generation requests); replicas that failed or are gone are left out."""
        try:
            results = await self.engines.broadcast(method).results_async(timeout_s=PROBE_TIMEOUT_S,
                                                                           return_exceptions=True)
        except (TimeoutError, asyncio.TimeoutError):
            return []
        failed = [r for r in results if isinstance(r, BaseException)]
        if failed:
            logger.warning("%d replica(s) did not answer %s: %s", len(failed), method, failed[0])
        return [r for r in results if not isinstance(r, BaseException)]

    async def drain(self) -> None:
        """Drain every replica at once (the single server's SIGTERM drain in each); /health answers 503."""
        self.draining = True
        results = await self.engines.broadcast("drain").results_async(
            timeout_s=self.settings.drain_timeout + 30.0, return_exceptions=True)
        failed = [r for r in results if isinstance(r, BaseException)]
        if failed:
            logger.warning("%d replica(s) failed to drain: %s", len(failed), failed[0])


def build_ingress_app(state: IngressState) -> FastAPI:
    """The ingress ASGI app over ``state``."""
    app = FastAPI(title="jetmoe-serve ingress", docs_url=None, redoc_url=None, openapi_url=None)
    install_error_handlers(app)
    app.add_middleware(BodySizeLimitMiddleware, max_bytes=state.settings.max_request_bytes,
                       body_timeout=state.settings.body_timeout)

    @app.api_route("/health", methods=["GET", "HEAD"], include_in_schema=False)
    async def health() -> Response:
        """200 while one replica or more is healthy (naming them); 503 while draining or when none is."""
        if state.draining:
            return APIError(503, "The server is shutting down.", code="shutting_down").response()
        healthy = sorted(name for name, ok in await state.ask_every_replica("healthy") if ok)
        if not healthy:
            return APIError(503, "No engine replica is running.", code="engine_dead").response()
        return JSONResponse({"status": "ok"}, headers={REPLICA_HEADER.decode(): ",".join(healthy)})

    @app.api_route("/metrics", methods=["GET", "HEAD"], include_in_schema=False)
    async def metrics() -> Response:
        """Every replica's series, labelled by ``replica``."""
        replicas = await state.ask_every_replica("metrics")
        if not replicas:
            return APIError(503, "No engine replica answered.", code="engine_dead").response()
        names = ",".join(sorted(name for name, _ in replicas))
        return Response(merge_metrics(replicas), media_type=CONTENT_TYPE_LATEST,
                        headers={REPLICA_HEADER.decode(): names})

    @app.api_route("/{path:path}", methods=_METHODS, include_in_schema=False)
    async def forward(request: Request) -> Response:
        return await relay(state, request)

    return app


async def relay(state: IngressState, request: Request) -> Response:
    """Forward ``request`` to a replica and relay its answer (503 when the replica fails before answering)."""
    body = await request.body()
    client = (request.client.host, request.client.port) if request.client else None
    forwarded = ForwardedRequest(request.method, request.scope["path"], request.scope.get("query_string", b""),
                                 tuple((bytes(k), bytes(v)) for k, v in request.scope["headers"]), body, client)
    stream = state.stream(forwarded)
    try:
        start = await stream.__anext__()
    except Exception as exc:  # the replica died or could not be reached: this request fails, no other
        stream.cancel()
        logger.warning("engine replica failed before answering %s %s: %s", request.method, forwarded.path, exc)
        return replica_failed(exc).response()
    if not isinstance(start, ResponseStart):
        stream.cancel()
        return APIError(500, "The engine replica answered out of order.", code="internal_error").response()
    return RelayedResponse(start, stream)


def replica_failed(exc: BaseException) -> APIError:
    return APIError(503, f"The engine replica serving this request failed: {type(exc).__name__}",
                    code="engine_dead")


class RelayedResponse(StreamingResponse):
    """A replica's answer relayed as it arrives, with the replica's status and headers unchanged."""

    def __init__(self, start: ResponseStart, stream: DeploymentResponseGenerator) -> None:
        sse = (start.header(b"content-type") or b"").startswith(b"text/event-stream")
        super().__init__(_relay_body(stream, sse), status_code=start.status)
        self.raw_headers = list(start.headers)

    async def listen_for_disconnect(self, receive: Receive) -> None:
        """As Starlette's, but a receive that fails (Serve's proxy ended the request) is a disconnect too."""
        try:
            await super().listen_for_disconnect(receive)
        except Exception:
            return


async def _relay_body(stream: DeploymentResponseGenerator, sse: bool) -> AsyncIterator[bytes]:
    finished = False
    try:
        async for part in stream:
            yield part
        finished = True
    except Exception as exc:  # the replica died mid-answer: end this stream as a dead engine would
        logger.warning("engine replica failed mid-response: %s", exc)
        if sse:
            yield _sse_event(replica_failed(exc).body())
    finally:
        if not finished:
            stream.cancel()


def _sse_event(payload: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"
