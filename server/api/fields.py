"""Request fields the server does not use: unknown ones are logged once per name (and accepted, as vLLM does);
OpenAI fields whose omission would change the answer are a 400 naming them."""

from __future__ import annotations

import logging
import threading

from pydantic import BaseModel

from server.api.errors import APIError

logger = logging.getLogger(__name__)

# Chat fields declared in the schema so that /openapi.json names them, refused unless null.
_REFUSED_CHAT = ("audio", "prediction", "web_search_options", "functions", "function_call")
_MAX_DEPTH = 4  # unknown names are looked for this deep (request -> messages -> message -> part)

_warned: set[str] = set()
_warned_lock = threading.Lock()


def check_fields(body: BaseModel) -> None:
    """400 for a refused field that is set; a warning (once per name) for each field nobody defines."""
    for name in _REFUSED_CHAT:
        if getattr(body, name, None) is not None:
            raise APIError(400, f"{name} is not supported by this server", param=name,
                           code="unsupported_parameter")
    modalities = getattr(body, "modalities", None)
    if modalities is not None and any(m != "text" for m in modalities):
        raise APIError(400, 'only the "text" modality is supported', param="modalities",
                       code="unsupported_parameter")
    for name in sorted(unknown_fields(body)):
        with _warned_lock:
            if name in _warned:
                continue
            _warned.add(name)
        logger.warning("the request field %r is not used by this server (accepted and ignored)", name)


def unknown_fields(model: BaseModel, prefix: str = "", depth: int = 0) -> set[str]:
    """Dotted names of the fields set in ``model`` (and the models inside it) that no schema defines."""
    names = {prefix + key for key in (model.model_extra or {})}
    if depth >= _MAX_DEPTH:
        return names
    for field in type(model).model_fields:
        value = getattr(model, field)
        items = value if isinstance(value, list) else [value]
        for item in items:
            if isinstance(item, BaseModel):
                names |= unknown_fields(item, f"{prefix}{field}.", depth + 1)
    return names
