"""Models, health, tokenizer endpoints and Prometheus metrics."""

from __future__ import annotations

import importlib.metadata
import uuid
from typing import Any

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST

from server.api.body import StrictJSONRoute
from server.api.chat_template import render_messages
from server.api.deps import StateDep
from server.api.errors import APIError, model_not_found
from server.api.schemas import (
    ERROR_RESPONSES,
    DetokenizeRequest,
    DetokenizeResponse,
    HealthStatus,
    ModelCard,
    ModelList,
    ModelPermission,
    TokenizeRequest,
    TokenizeResponse,
)
from server.api.state import AppState
from server.api.tokenization import encode_texts, off_loop
from server.api.tokenizer_info import tokenizer_info

router = APIRouter(route_class=StrictJSONRoute)


def _card(state: AppState) -> ModelCard:
    permission = ModelPermission(id=f"modelperm-{uuid.uuid5(uuid.NAMESPACE_URL, state.settings.served_model_name).hex}",
                                 created=state.created)
    return ModelCard(id=state.settings.served_model_name, created=state.created,
                     owned_by=state.settings.owned_by, root=state.engine.config.model,
                     max_model_len=state.max_model_len, permission=[permission])


@router.get("/v1/models", tags=["models"], responses=ERROR_RESPONSES)
async def list_models(state: StateDep) -> ModelList:
    return ModelList(data=[_card(state)])


@router.get("/v1/models/{model}", tags=["models"], responses=ERROR_RESPONSES)
async def retrieve_model(model: str, state: StateDep) -> ModelCard:
    if model != state.settings.served_model_name:
        raise model_not_found(model)
    return _card(state)


@router.get("/health", tags=["ops"], responses={200: {"model": HealthStatus}, 503: ERROR_RESPONSES[503]})
async def health(state: StateDep) -> JSONResponse:
    """200 while the engine loop runs; 503 when it is dead or the server is shutting down."""
    try:
        state.check_accepting()
    except APIError as error:
        return error.response()
    return JSONResponse({"status": "ok"})


_PING: dict[int | str, dict[str, Any]] = {200: {"model": HealthStatus}, 503: ERROR_RESPONSES[503]}


@router.get("/ping", tags=["ops"], responses=_PING)
async def ping(state: StateDep) -> JSONResponse:
    """The same answer as /health (for load balancers that probe /ping, as vLLM has it)."""
    return await health(state)


@router.post("/ping", tags=["ops"], responses=_PING)
async def ping_post(state: StateDep) -> JSONResponse:
    """The same answer as /health."""
    return await health(state)


@router.get("/version", tags=["ops"])
async def version() -> dict[str, str]:
    """The server's version."""
    return {"version": importlib.metadata.version("jetmoe-serve")}


@router.get("/tokenizer_info", tags=["tokenizer"], responses=ERROR_RESPONSES)
async def get_tokenizer_info(state: StateDep) -> dict[str, Any]:
    """The tokenizer's configuration: special tokens, class and the chat template in force (as vLLM's)."""
    return tokenizer_info(state.engine.tokenizer, state.chat_template)


@router.get("/metrics", tags=["ops"], response_class=Response,
            responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}})
async def metrics(state: StateDep) -> Response:
    """Prometheus text format."""
    return Response(state.metrics.render(), media_type=CONTENT_TYPE_LATEST)


@router.post("/tokenize", tags=["tokenizer"], responses=ERROR_RESPONSES)
async def tokenize(body: TokenizeRequest, state: StateDep) -> TokenizeResponse:
    """Token ids of a prompt, or of chat ``messages`` rendered with the chat template."""
    state.check_model(body.model)
    if (body.prompt is None) == (body.messages is None):
        raise APIError(400, "give exactly one of prompt and messages", param="prompt")
    if body.messages is not None:
        tokens = await off_loop(render_messages, state, body.messages, body)
    else:
        (tokens,) = await encode_texts(state, [body.prompt or ""], check_length=False,
                                       add_special_tokens=body.add_special_tokens)
    return TokenizeResponse(tokens=tokens, count=len(tokens), max_model_len=state.max_model_len)


@router.post("/detokenize", tags=["tokenizer"], responses=ERROR_RESPONSES)
async def detokenize(body: DetokenizeRequest, state: StateDep) -> DetokenizeResponse:
    state.check_model(body.model)
    vocab = state.engine.vocab_size
    if any(not 0 <= t < vocab for t in body.tokens):
        raise APIError(400, f"token ids must be in [0, {vocab})", param="tokens")
    return DetokenizeResponse(prompt=state.engine.tokenizer.decode(body.tokens))
