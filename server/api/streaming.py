"""Server-sent events: one ``data:`` event per chunk, then ``data: [DONE]``; a failure becomes an error event."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from contextlib import aclosing
from typing import Any

from sse_starlette import EventSourceResponse
from starlette.types import Receive, Scope, Send

from server.api.errors import to_api_error

logger = logging.getLogger(__name__)

DONE = "[DONE]"


def dumps(payload: dict[str, Any]) -> str:
    return json.dumps(payload, ensure_ascii=False, separators=(",", ":"))


async def sse_events(chunks: AsyncGenerator[dict[str, Any], None]) -> AsyncIterator[str]:
    """JSON chunks as event data, ``[DONE]`` at the end; an error ends the stream with an error event (and,
    when the server's drain timeout ended it, ``[DONE]`` after it: the stream is complete, only cut short)."""
    try:
        async with aclosing(chunks) as stream:
            async for chunk in stream:
                yield dumps(chunk)
    except Exception as exc:  # headers are sent already: report in-band, as OpenAI does
        error = to_api_error(exc)
        if error.status >= 500:
            logger.warning("stream failed: %s", exc)
        yield dumps(error.body())
        if error.code == "shutting_down":
            yield DONE
        return
    yield DONE


class _SSEResponse(EventSourceResponse):
    """An event stream that calls ``on_close`` when it ends, however it ends (even never started)."""

    def __init__(self, *args: Any, on_close: Callable[[], None], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()


def sse_response(chunks: AsyncGenerator[dict[str, Any], None], drain_timeout: float,
                 on_close: Callable[[], None] = lambda: None) -> EventSourceResponse:
    """An SSE response that, on server shutdown, lets the stream run ``drain_timeout`` more seconds.

    ``on_close`` runs once the response is over, even when the client left before the stream started.
    """
    return _SSEResponse(
        sse_events(chunks),
        sep="\n",
        shutdown_grace_period=drain_timeout,
        on_close=on_close,
    )
