"""The FastAPI application: ``create_app(engine, settings)``; all state lives on ``app.state.api``."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from server.api import routes_chat, routes_completions, routes_misc
from server.api.auth import ApiKeyMiddleware
from server.api.body import BodySizeLimitMiddleware
from server.api.connections import HeadAsGetMiddleware, ProbeOnlyMiddleware, rate_limited_exception_handler
from server.api.errors import install_error_handlers
from server.api.settings import ServerSettings
from server.api.state import AppState
from server.engine.client import EngineClient
from server.engine.streams import ServerShuttingDownError

logger = logging.getLogger(__name__)


def create_app(engine: EngineClient, settings: ServerSettings) -> FastAPI:
    """An OpenAI-compatible app over a started ``engine``; the app shuts the engine down when it stops."""
    state = AppState(engine, settings)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        asyncio.get_running_loop().set_exception_handler(rate_limited_exception_handler())
        yield
        await drain_and_stop(state)

    app = FastAPI(title="jetmoe-serve", summary="OpenAI-compatible JetMoe inference server", lifespan=lifespan)
    app.state.api = state
    install_error_handlers(app)
    # NOTE: the last middleware added runs first: the key is checked before any body byte is read.
    app.add_middleware(BodySizeLimitMiddleware, max_bytes=settings.max_request_bytes,
                       body_timeout=settings.body_timeout)
    if settings.api_key:
        app.add_middleware(ApiKeyMiddleware, api_key=settings.api_key)
    app.add_middleware(HeadAsGetMiddleware)
    app.add_middleware(ProbeOnlyMiddleware)  # connections past the soft cap: probes only
    for module in (routes_completions, routes_chat, routes_misc):
        app.include_router(module.router)
    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]
    return app


def _openapi(app: FastAPI) -> dict[str, Any]:
    """FastAPI's schema without its 422 responses: validation errors are answered with 400 here."""
    if app.openapi_schema is None:
        schema = get_openapi(title=app.title, version=app.version, summary=app.summary, routes=app.routes)
        for operations in schema.get("paths", {}).values():
            for operation in operations.values():
                operation.get("responses", {}).pop("422", None)
        components = schema.get("components", {}).get("schemas", {})
        for name in ("HTTPValidationError", "ValidationError"):
            components.pop(name, None)
        app.openapi_schema = schema
    return app.openapi_schema


def begin_drain(app: FastAPI) -> None:
    """Stop admitting requests (503, and /health answers 503); in-flight ones keep running."""
    app.state.api.draining = True


async def drain(state: AppState) -> None:
    """What SIGTERM starts: no new requests (503; /health answers 503), in-flight ones run up to the drain
    timeout, then the rest end with a 503 (a stream with an error event and ``[DONE]``)."""
    state.draining = True
    timeout = state.settings.drain_timeout
    if await state.wait_idle(timeout):
        return
    logger.warning("%d request(s) still running after the %g s drain timeout; ending them", state.num_in_flight,
                   timeout)
    state.engine.fail_all(ServerShuttingDownError(f"the drain timeout of {timeout:g} s ran out"))
    await state.wait_idle(5.0)


async def drain_and_stop(state: AppState) -> None:
    """Wait for in-flight requests (up to the drain timeout), then stop the engine (aborting the rest)."""
    state.draining = True
    if not await state.wait_idle(state.settings.drain_timeout):
        logger.warning("%d request(s) still running after %.0f s; aborting them",
                       state.num_in_flight, state.settings.drain_timeout)
    await asyncio.to_thread(state.engine.shutdown)
