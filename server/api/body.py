"""Request bodies: a size limit on the bytes as they stream in (413), and strict JSON parsing.

Python's ``json`` accepts more than JSON: ``NaN``/``Infinity`` constants, lone UTF-16 surrogates (``"\\ud800"``),
UTF-8-encoded surrogates (it decodes bytes with ``surrogatepass``) and numbers that overflow to infinity. Such
values break the tokenizer (a 500 before) or the JSON encoder far from where they came in, so they are rejected
here as a 400 ``invalid_json`` (an overflowed float is caught by the request models, which refuse inf/NaN).
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import HTTPException, Request, Response
from fastapi.routing import APIRoute
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.api.errors import APIError

_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]", re.ASCII)


# NOTE: a server that answers before reading the whole body and closes makes the client's kernel see a reset,
# and the client often loses the 413 with it. So the rest of the body is read and dropped first (no memory
# held), up to a budget; past it the connection is closed after the answer.
_DRAIN_MIN_BYTES = 16 * 1024 * 1024
_DRAIN_SECONDS = 5.0


def too_large(limit: int) -> APIError:
    return APIError(413, f"The request body is larger than the limit of {limit} bytes.",
                    code="request_too_large")


class BodyTooLarge(HTTPException):
    """Raised from ``receive`` once a body passes the limit (FastAPI re-raises HTTPExceptions as they are)."""

    def __init__(self, limit: int, close: bool) -> None:
        self.api_error = too_large(limit)
        super().__init__(413, self.api_error.message, headers={"Connection": "close"} if close else None)


class BodyTimeout(HTTPException):
    """Raised from ``receive`` when a body has not arrived within the time allowed (408, connection closed)."""

    def __init__(self, seconds: float) -> None:
        self.api_error = APIError(408, f"The request body did not arrive within {seconds:g} s.",
                                  code="request_timeout")
        super().__init__(408, self.api_error.message, headers={"Connection": "close"})


class BodySizeLimitMiddleware:
    """413 for a body over ``max_bytes``: from ``Content-Length`` before reading it, else once the bytes that
    stream in pass the limit (chunked bodies). The excess is dropped, never buffered. A body that has not
    arrived ``body_timeout`` seconds after the request head (sent slowly, or chunked without an end) is a 408."""

    def __init__(self, app: ASGIApp, max_bytes: int, body_timeout: float = 30.0) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.drain_bytes = max(max_bytes, _DRAIN_MIN_BYTES)
        self.body_timeout = body_timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = Headers(scope=scope).get("content-length")
        if length is not None and length.strip().isdigit() and int(length) > self.max_bytes:
            drained = int(length) <= self.drain_bytes and await self._discard(receive, 0)
            response = too_large(self.max_bytes).response()
            if not drained:
                response.headers["Connection"] = "close"
            await response(scope, receive, send)
            return
        received = 0
        started = body_done = False
        deadline = time.monotonic() + self.body_timeout

        async def limited_receive() -> Message:
            nonlocal received, body_done
            if body_done:  # after the body only the disconnect can come: no deadline
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                raise BodyTimeout(self.body_timeout) from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    drained = not message.get("more_body", False) or await self._discard(receive, received)
                    raise BodyTooLarge(self.max_bytes, close=not drained)
                body_done = not message.get("more_body", False)
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except (BodyTooLarge, BodyTimeout) as exc:  # raised outside a route (where no exception handler saw it)
            if started:
                raise
            await exc.api_error.response()(scope, receive, send)

    async def _discard(self, receive: Receive, received: int) -> bool:
        """Read and drop the rest of the body; whether it ended within the byte and time budgets."""
        deadline = time.monotonic() + _DRAIN_SECONDS
        while received <= self.drain_bytes:
            try:
                message = await asyncio.wait_for(receive(), deadline - time.monotonic())
            except asyncio.TimeoutError:
                return False
            if message["type"] != "http.request":
                return False  # the client left
            received += len(message.get("body", b""))
            if not message.get("more_body", False):
                return True
        return False


def loads_strict(body: bytes) -> Any:
    """``json.loads`` for real JSON only: UTF-8, no NaN/Infinity, no lone surrogates.

    Every rejection is a ``json.JSONDecodeError``, which FastAPI turns into a validation error (400).
    """
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise json.JSONDecodeError("the body is not valid UTF-8", body.decode("utf-8", "replace"),
                                   exc.start) from None
    if text.startswith("\ufeff"):
        raise json.JSONDecodeError("Unexpected UTF-8 BOM", text, 0)

    def constant(name: str) -> Any:
        raise json.JSONDecodeError(f"{name} is not valid JSON", text, text.find(name))

    try:
        value = json.loads(text, parse_constant=constant)
    except RecursionError:
        raise json.JSONDecodeError("the JSON value is nested too deeply", text, 0) from None
    except json.JSONDecodeError:
        raise
    except ValueError:  # an integer with more digits than Python converts (4300)
        raise json.JSONDecodeError("a number has too many digits", text, 0) from None
    if _SURROGATE_ESCAPE.search(body) and _has_lone_surrogate(value):
        raise json.JSONDecodeError("a string holds a lone UTF-16 surrogate (\\ud800-\\udfff)", text, 0)
    return value


def _has_lone_surrogate(value: Any) -> bool:
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                return True
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False


class StrictJSONRequest(Request):
    """A request whose ``json()`` is ``loads_strict`` (what FastAPI calls to parse a JSON body)."""

    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            self._json = loads_strict(await self.body())
        return self._json


class StrictJSONRoute(APIRoute):
    """Routes that parse JSON bodies with ``loads_strict``."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def strict_handler(request: Request) -> Response:
            return await handler(StrictJSONRequest(request.scope, request.receive))

        return strict_handler
