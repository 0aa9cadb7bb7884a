"""Typed FastAPI dependencies."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from server.api.state import AppState
from server.engine.client import EngineClient


def get_state(request: Request) -> AppState:
    return request.app.state.api


def get_engine(request: Request) -> EngineClient:
    return get_state(request).engine


def accepting(request: Request) -> AppState:
    """The state, after checking that new requests are admitted (else 503)."""
    state = get_state(request)
    state.check_accepting()
    return state


StateDep = Annotated[AppState, Depends(get_state)]
EngineDep = Annotated[EngineClient, Depends(get_engine)]
AcceptingDep = Annotated[AppState, Depends(accepting)]
