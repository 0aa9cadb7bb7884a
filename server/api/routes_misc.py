"""Models, health, tokenizer endpoints and Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST

from server.api.body import StrictJSONRoute
from server.api.chat import render_messages
from server.api.deps import StateDep
from server.api.errors import APIError, model_not_found
from server.api.schemas import (
    ERROR_RESPONSES,
    DetokenizeRequest,
    DetokenizeResponse,
    HealthStatus,
    ModelCard,
    ModelList,
    TokenizeRequest,
    TokenizeResponse,
)
from server.api.state import AppState

router = APIRouter(route_class=StrictJSONRoute)


def _card(state: AppState) -> ModelCard:
    return ModelCard(id=state.settings.served_model_name, created=state.created,
                     owned_by=state.settings.owned_by, max_model_len=state.max_model_len)


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
        tokens = render_messages(state, body.messages, body.add_generation_prompt)
    else:
        tokens = state.llm.tokenizer.encode(body.prompt or "", add_special_tokens=body.add_special_tokens)
    return TokenizeResponse(tokens=tokens, count=len(tokens), max_model_len=state.max_model_len)


@router.post("/detokenize", tags=["tokenizer"], responses=ERROR_RESPONSES)
async def detokenize(body: DetokenizeRequest, state: StateDep) -> DetokenizeResponse:
    state.check_model(body.model)
    vocab = state.llm.model.config.vocab_size
    if any(not 0 <= t < vocab for t in body.tokens):
        raise APIError(400, f"token ids must be in [0, {vocab})", param="tokens")
    return DetokenizeResponse(prompt=state.llm.tokenizer.decode(body.tokens))
