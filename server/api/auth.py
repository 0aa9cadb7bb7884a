"""Bearer-key check as a plain ASGI middleware (it runs before the body is read or parsed)."""

from __future__ import annotations

import hmac
import logging
import re

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from server.api.errors import APIError

# NOTE: probes and scrapers must work without the key; the API docs describe no secrets. The key is read from the
# Authorization header only: never from the query string (which access logs and proxies record).
OPEN_PATHS = frozenset({"/health", "/ping", "/version", "/metrics", "/docs", "/docs/oauth2-redirect", "/redoc",
                        "/openapi.json"})


def key_matches(authorization: str | None, api_key: str) -> bool:
    """Whether an ``Authorization`` header carries ``Bearer <api_key>`` (compared in constant time)."""
    scheme, _, token = (authorization or "").partition(" ")
    if scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(token.strip().encode(), api_key.encode())


class ApiKeyMiddleware:
    """Answers 401 to any request outside ``OPEN_PATHS`` without the right bearer key."""

    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app = app
        self.api_key = api_key

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS or scope["method"] == "OPTIONS":
            await self.app(scope, receive, send)
            return
        if key_matches(Headers(scope=scope).get("authorization"), self.api_key):
            await self.app(scope, receive, send)
            return
        error = APIError(401, "Invalid or missing API key: send 'Authorization: Bearer <key>'.",
                         code="invalid_api_key")
        response = error.response()
        response.headers["WWW-Authenticate"] = "Bearer"
        await response(scope, receive, send)


_SECRET_QUERY = re.compile(r"(?i)([?&](?:api[_-]?key|key|token|access[_-]?token|auth|password|secret)=)[^&\s\"]*")


def redact_query_secrets(text: str) -> str:
    """``text`` with the values of credential-like query parameters replaced by ``***``."""
    return _SECRET_QUERY.sub(r"\1***", text)


class RedactQuerySecrets(logging.Filter):
    """For uvicorn's access log: a key put in the URL by mistake is not written to the log."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(redact_query_secrets(a) if isinstance(a, str) else a for a in record.args)
        record.msg = redact_query_secrets(str(record.msg))
        return True
