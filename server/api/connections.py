"""Connection hygiene for the HTTP server: deadlines for request heads, a cap on open connections, OpenAI-shaped
errors from the HTTP parser, and rate-limited accept errors.

uvicorn's h11 protocol holds a connection that never sends a request forever and only times out idle
keep-alive connections after a response, so a flood of silent connections (or of headers sent a byte at a
time) exhausts the process's file descriptors. ``GuardedH11Protocol`` (built for one server by
``guarded_protocol``) adds:

- a deadline for every request head, from the connection's start and again after each response: a client that
  has not sent a complete head by then gets a 408 and is closed;
- a cap on open connections below the file limit (``ConnectionLimits.for_process``): past the soft cap a
  connection may only ask for ``/health`` or ``/metrics`` (other paths answer 503, so probes keep working under a
  flood), past the hard cap it gets a 503 at once and is closed;
- the HTTP parser's own 400s (a bad Content-Length, an oversized header block) as OpenAI JSON.

``rate_limited_exception_handler`` keeps a loop that cannot accept (out of file descriptors) from writing a
traceback per attempt: one line per second at most, with a count of what it suppressed.
"""

from __future__ import annotations

import asyncio
import json
import logging
import resource
import time
from dataclasses import dataclass
from typing import Any

from starlette.types import ASGIApp, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

from server.api.errors import APIError

logger = logging.getLogger(__name__)

PROBE_PATHS = frozenset({"/health", "/metrics"})
PROBE_ONLY = "jetmoe_probe_only"  # scope["state"] key set on connections past the soft cap


@dataclass(frozen=True)
class ConnectionLimits:
    """``header_timeout``: seconds a connection has to send a complete request head (from its start, and
    again after each response). ``soft_cap``/``hard_cap``: open connections past which only probes are served
    / new connections are refused."""

    header_timeout: float = 10.0
    soft_cap: int = 4096
    hard_cap: int = 4160

    @classmethod
    def for_process(cls, header_timeout: float = 10.0) -> ConnectionLimits:
        """Caps below this process's file limit: room is kept for the model's files, logs and the probes."""
        soft_limit, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft_limit == resource.RLIM_INFINITY:
            soft_limit = 1 << 20
        hard_cap = max(8, soft_limit - max(64, soft_limit // 10))
        return cls(header_timeout, max(4, hard_cap - max(16, hard_cap // 32)), hard_cap)


def _raw_response(status: int, reason: str, error: APIError) -> bytes:
    body = json.dumps(error.body()).encode()
    head = (f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\nconnection: close\r\n"
            f"content-length: {len(body)}\r\n\r\n")
    return head.encode() + body


_TOO_MANY = _raw_response(503, "Service Unavailable", APIError(
    503, "The server has too many open connections; retry later.", code="too_many_connections"))
_HEAD_TIMEOUT = _raw_response(408, "Request Timeout", APIError(
    408, "The request head did not arrive in time.", code="request_timeout"))


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with head deadlines, connection caps and JSON parser errors (module docstring)."""

    limits = ConnectionLimits()

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._head_timer: asyncio.TimerHandle | None = None
        open_connections = len(self.connections)
        if open_connections > self.limits.hard_cap:
            self.transport.write(_TOO_MANY)
            self.transport.close()
            return
        if open_connections > self.limits.soft_cap:
            self.app_state = {**self.app_state, PROBE_ONLY: True}
        self._arm_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.cycle is not None and not self.cycle.response_complete:
            self._cancel_head_timer()  # a head arrived; the app's own limits govern its body

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing() and (self.cycle is None or self.cycle.response_complete):
            self._arm_head_timer()  # the next head gets the same deadline (even if sent a byte at a time)

    def send_400_response(self, msg: str) -> None:
        error = APIError(400, f"Invalid HTTP request: {msg}", code="invalid_http_request")
        self.transport.write(_raw_response(400, "Bad Request", error))
        self.transport.close()

    def _arm_head_timer(self) -> None:
        self._cancel_head_timer()
        self._head_timer = self.loop.call_later(self.limits.header_timeout, self._head_timed_out)

    def _cancel_head_timer(self) -> None:
        timer = getattr(self, "_head_timer", None)
        if timer is not None:
            timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if not self.transport.is_closing():
            self.transport.write(_HEAD_TIMEOUT)
            self.transport.close()


def guarded_protocol(limits: ConnectionLimits) -> type[GuardedH11Protocol]:
    """The protocol class for one server (uvicorn's ``http=``), with ``limits``."""
    return type("GuardedH11Protocol", (GuardedH11Protocol,), {"limits": limits})


class ProbeOnlyMiddleware:
    """503 for anything but a probe on a connection accepted past the soft cap."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        state = scope.get("state") or {}
        if scope["type"] == "http" and state.get(PROBE_ONLY) and scope["path"] not in PROBE_PATHS:
            error = APIError(503, "The server has too many open connections; retry later.",
                             code="too_many_connections")
            await error.response()(scope, receive, send)
            return
        await self.app(scope, receive, send)


class rate_limited_exception_handler:  # noqa: N801 - used as a function by the event loop
    """A loop exception handler that logs accept failures once per second at most; the rest as asyncio does."""

    def __init__(self, interval: float = 1.0) -> None:
        self.interval = interval
        self._last = 0.0
        self._suppressed = 0

    def __call__(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        message = str(context.get("message", ""))
        if "accept" not in message:
            loop.default_exception_handler(context)
            return
        now = time.monotonic()
        if now - self._last < self.interval:
            self._suppressed += 1
            return
        logger.error("%s: %s (%d more suppressed)", message, context.get("exception"), self._suppressed)
        self._last, self._suppressed = now, 0


class HeadAsGetMiddleware:
    """``HEAD`` wherever ``GET`` exists: the app answers the ``GET``; the server sends its head only (uvicorn
    drops the body of a response to a HEAD request)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "HEAD":
            scope = {**scope, "method": "GET"}
        await self.app(scope, receive, send)
