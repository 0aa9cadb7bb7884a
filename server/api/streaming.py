"""Server-sent events: one ``data:`` event per chunk, then ``data: [DONE]``; a failure becomes an error event."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any

from sse_starlette import EventSourceResponse

from server.api.errors import to_api_error

logger = logging.getLogger(__name__)

DONE = "[DONE]"


def dumps(payload: dict[str, Any]) -> str:
    return json.dumps(payload, ensure_ascii=False, separators=(",", ":"))


async def sse_events(chunks: AsyncIterator[dict[str, Any]]) -> AsyncIterator[str]:
    """JSON chunks as event data, ``[DONE]`` at the end; an error ends the stream with an error event."""
    try:
        async with aclosing(chunks) as stream:
            async for chunk in stream:
                yield dumps(chunk)
    except Exception as exc:  # headers are sent already: report in-band, as OpenAI does
        error = to_api_error(exc)
        if error.status >= 500:
            logger.warning("stream failed: %s", exc)
        yield dumps(error.body())
        return
    yield DONE


def sse_response(chunks: AsyncIterator[dict[str, Any]], drain_timeout: float) -> EventSourceResponse:
    """An SSE response that, on server shutdown, lets the stream run ``drain_timeout`` more seconds."""
    return EventSourceResponse(
        sse_events(chunks),
        sep="\n",
        shutdown_grace_period=drain_timeout,
    )
