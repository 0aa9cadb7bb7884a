"""OpenAI-shaped errors: ``{"error": {"message", "type", "param", "code"}}`` with the matching HTTP status."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from server.engine.sampling_params import SamplingParamsError
from server.engine.streams import EngineDeadError, RequestFailedError, ServerShuttingDownError
from server.engine.structured import StructuredOutputError
from server.engine.validation import RequestRejected

logger = logging.getLogger(__name__)

_TYPES = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "server_error",
}


class ClientDisconnected(Exception):
    """The client closed the connection before the answer was ready (nobody reads the response)."""


class APIError(Exception):
    """An error the API answers with ``status`` and an OpenAI-shaped body."""

    def __init__(
        self, status: int, message: str, *, param: str | None = None, code: str | None = None,
        type: str | None = None, headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type or _TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def to_api_error(exc: BaseException) -> APIError:
    """Map engine and validation exceptions onto API errors (500 for anything unexpected)."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, RequestRejected):
        return APIError(400, str(exc), param=exc.param, code=exc.code)
    if isinstance(exc, SamplingParamsError):
        return APIError(400, exc.message, param=exc.param)
    if isinstance(exc, ServerShuttingDownError):
        return APIError(503, f"The server is shutting down: {exc}", code="shutting_down")
    if isinstance(exc, StructuredOutputError):
        return APIError(400, exc.message, param=exc.param, code="invalid_structured_output")
    if isinstance(exc, EngineDeadError):
        return APIError(503, f"The engine is not running: {exc}", code="engine_dead")
    if isinstance(exc, RequestFailedError):
        return APIError(500, f"The engine failed the request: {exc}", code="request_failed")
    return APIError(500, "Internal server error", code="internal_error")


def model_not_found(name: str) -> APIError:
    return APIError(404, f"The model '{name}' does not exist.", param="model", code="model_not_found")


def _validation_error(exc: RequestValidationError) -> APIError:
    errors = list(exc.errors())
    if not errors:
        return APIError(400, "Invalid request")
    first = errors[0]
    kind = first.get("type")
    if kind == "json_invalid":
        reason = (first.get("ctx") or {}).get("error") or first.get("msg")
        return APIError(400, f"Invalid JSON body: {reason}", code="invalid_json")
    param, union = _param(first.get("loc", ()))
    if param is None and kind in ("model_attributes_type", "model_type", "missing"):
        return APIError(400, "The request body must be a JSON object (Content-Type: application/json).",
                        code="invalid_json")
    if union:  # one error per accepted form, each under its own path: name the field, not the forms
        message = f"{param}: the value matches none of the accepted forms (see /openapi.json)"
    else:
        message = f"{param}: {first.get('msg')}" if param else str(first.get("msg"))
    others = {p for p, _ in map(_param, (e.get("loc", ()) for e in errors[1:]))} - {param}
    if others and not union:
        message += f" (and {len(others)} more field{'s' if len(others) > 1 else ''} with errors)"
    return APIError(400, message, param=param)


_TYPE_TAGS = frozenset({"str", "int", "float", "bool", "none", "list", "dict"})


def _param(loc: Any) -> tuple[str | None, bool]:
    """``messages.0.role`` from pydantic's location, cut before a union tag (``str``, ``list[int]``, ...).

    Also whether the location went through a union (the second value).
    """
    parts = []
    for index, part in enumerate(loc):
        if isinstance(part, int):
            parts.append(str(part))
        elif _is_tag(part):
            return ".".join(parts) or None, True
        elif not (index == 0 and part in ("body", "query", "path")):
            parts.append(part)
    return ".".join(parts) or None, False


def _is_tag(part: str) -> bool:
    return part in _TYPE_TAGS or "[" in part or "-" in part or part[:1].isupper()


def install_error_handlers(app: FastAPI) -> None:
    """Every error the app can produce leaves it in OpenAI's shape; FastAPI's 422 becomes 400."""

    async def on_api_error(_: Request, exc: Exception) -> JSONResponse:
        return to_api_error(exc).response()

    async def on_validation(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        return _validation_error(exc).response()

    async def on_http(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        error = getattr(exc, "api_error", None) or APIError(exc.status_code, str(exc.detail))
        return JSONResponse(error.body(), status_code=exc.status_code, headers=exc.headers)

    async def on_disconnect(_: Request, exc: Exception) -> Response:
        return Response(status_code=499)  # nginx's "client closed request"; the engine request is aborted

    async def on_unexpected(_: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error", exc_info=exc)
        return to_api_error(exc).response()

    for cls in (APIError, RequestRejected, SamplingParamsError, StructuredOutputError, EngineDeadError,
                RequestFailedError, ServerShuttingDownError):
        app.add_exception_handler(cls, on_api_error)
    app.add_exception_handler(ClientDisconnected, on_disconnect)
    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(StarletteHTTPException, on_http)
    app.add_exception_handler(Exception, on_unexpected)
