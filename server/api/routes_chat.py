"""POST /v1/chat/completions."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response

from server.api.body import StrictJSONRoute
from server.api.chat import create_chat_completion
from server.api.deps import AcceptingDep
from server.api.schemas import ERROR_RESPONSES, SSE_CONTENT, ChatCompletionRequest, ChatCompletionResponse

router = APIRouter(tags=["chat"], route_class=StrictJSONRoute)

_OK = {"model": ChatCompletionResponse, "description": "The chat completion, or with stream=true an SSE stream "
       "of chat.completion.chunk objects ending with data: [DONE].", "content": SSE_CONTENT}


@router.post("/v1/chat/completions", response_model=None, responses={200: _OK, **ERROR_RESPONSES})
async def chat_completions(body: ChatCompletionRequest, request: Request, state: AcceptingDep) -> Response:
    """Answer a conversation, rendered with the checkpoint's chat template."""
    return await create_chat_completion(state, body, request)
