"""HTTP layer: an OpenAI-compatible FastAPI app over an engine client (``server.engine.client``) (see ``create_app``)."""

from __future__ import annotations

from typing import Any

__all__ = ["ServerSettings", "create_app"]


def __getattr__(name: str) -> Any:
    # NOTE: lazy, so that ``server.cli`` (and ``--help``) does not import torch through the app.
    if name == "create_app":
        from server.api.app import create_app

        return create_app
    if name == "ServerSettings":
        from server.api.settings import ServerSettings

        return ServerSettings
    raise AttributeError(name)
