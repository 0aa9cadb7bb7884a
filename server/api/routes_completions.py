"""POST /v1/completions."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response

from server.api.body import StrictJSONRoute
from server.api.completions import create_completion
from server.api.deps import AcceptingDep
from server.api.schemas import ERROR_RESPONSES, SSE_CONTENT, CompletionRequest, CompletionResponse

router = APIRouter(tags=["completions"], route_class=StrictJSONRoute)

_OK = {"model": CompletionResponse, "description": "The completion, or with stream=true an SSE stream of "
       "text_completion chunks ending with data: [DONE].", "content": SSE_CONTENT}


@router.post("/v1/completions", response_model=None, responses={200: _OK, **ERROR_RESPONSES})
async def completions(body: CompletionRequest, request: Request, state: AcceptingDep) -> Response:
    """Complete one or several prompts (OpenAI's legacy completions API)."""
    return await create_completion(state, body, request)
