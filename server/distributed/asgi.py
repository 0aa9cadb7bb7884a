"""An HTTP request carried from the ingress to a replica, run through the replica's ASGI app in-process.

The ingress sends a ``ForwardedRequest`` (method, path, query, headers, body, client); the replica runs it
through the same FastAPI app a single server runs and yields what the app sends: one ``ResponseStart``
(status and headers), then the body as ``bytes`` parts, each part holding every message the app had sent
since the last one (so a fast stream costs fewer transfers). Closing the iterator early (the client left)
tells the app the client disconnected, as uvicorn would, and cancels it if it does not end by itself.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from starlette.types import ASGIApp, Message

_DISCONNECT_GRACE_S = 5.0


@dataclass(frozen=True)
class ForwardedRequest:
    """One HTTP request as the ingress received it (headers lower-cased, as ASGI has them)."""

    method: str
    path: str
    query_string: bytes = b""
    headers: tuple[tuple[bytes, bytes], ...] = ()
    body: bytes = b""
    client: tuple[str, int] | None = None


@dataclass(frozen=True)
class ResponseStart:
    """The status and headers of the response, with the replica that produced it."""

    status: int
    headers: tuple[tuple[bytes, bytes], ...]
    replica: str

    def header(self, name: bytes) -> bytes | None:
        for key, value in self.headers:
            if key.lower() == name:
                return value
        return None


def _scope(request: ForwardedRequest) -> dict[str, Any]:
    return {
        "type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
        "method": request.method, "scheme": "http", "path": request.path, "raw_path": request.path.encode(),
        "query_string": request.query_string, "root_path": "", "headers": list(request.headers),
        "client": request.client, "server": ("127.0.0.1", 0), "state": {},
    }


async def run_asgi(app: ASGIApp, request: ForwardedRequest, replica: str,
                   extra_headers: tuple[tuple[bytes, bytes], ...] = ()) -> AsyncIterator[ResponseStart | bytes]:
    """The response of ``app`` to ``request``: a ``ResponseStart``, then body parts (see the module docstring)."""
    sent: asyncio.Queue[Message | None] = asyncio.Queue()
    disconnected = asyncio.Event()
    body_given = False

    async def receive() -> Message:
        nonlocal body_given
        if not body_given:
            body_given = True
            return {"type": "http.request", "body": request.body, "more_body": False}
        await disconnected.wait()
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        await sent.put(message)

    async def call() -> None:
        try:
            await app(_scope(request), receive, send)
        finally:
            await sent.put(None)

    task = asyncio.create_task(call())
    try:
        async for part in _parts(sent, replica, extra_headers):
            yield part
        await task  # re-raises what the app raised after its response (none does: the app answers errors)
    finally:
        if not task.done():
            disconnected.set()
            with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError, Exception):
                await asyncio.wait_for(asyncio.shield(task), _DISCONNECT_GRACE_S)
            task.cancel()


async def _parts(sent: asyncio.Queue[Message | None], replica: str,
                 extra_headers: tuple[tuple[bytes, bytes], ...]) -> AsyncIterator[ResponseStart | bytes]:
    """Turn the app's messages into a start and merged body parts; ends when the response is complete."""
    while True:
        message = await sent.get()
        if message is None:
            return
        if message["type"] == "http.response.start":
            headers = tuple((bytes(k), bytes(v)) for k, v in message.get("headers", ())) + extra_headers
            yield ResponseStart(int(message["status"]), headers, replica)
            continue
        if message["type"] != "http.response.body":
            continue
        chunks, more = [message.get("body", b"")], message.get("more_body", False)
        while more and not sent.empty():
            following = sent.get_nowait()
            if following is None or following["type"] != "http.response.body":
                more = False
                if following is None:
                    sent.put_nowait(None)
                break
            chunks.append(following.get("body", b""))
            more = following.get("more_body", False)
        body = b"".join(chunks)
        if body:
            yield body
        if not more:
            return
