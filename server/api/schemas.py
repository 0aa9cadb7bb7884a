"""Request and response bodies (OpenAI wire format). Unknown request fields are accepted and logged once per
name (``server.api.fields``); OpenAI fields the server cannot honour are a 400 naming them.

Request fields are strict JSON types (``"2"`` is not an integer, ``1`` is not a boolean), as OpenAI's API has
them, and carry their ranges, so that ``/openapi.json`` documents every value the server accepts. The engine
checks every sampling value again (``SamplingParams``); relations between fields (``prompt`` + ``max_tokens``
within the context, ``best_of`` >= ``n``, token ids within the vocabulary) are checked by the endpoints.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema

from server.api.schemas_structured import (
    AssistantToolCall,
    ChatTool,
    InformationalFields,
    StructuredOutputFields,
    ToolCall,
    ToolChoice,
    UnsupportedChatFields,
)
from server.engine.sampling_params import (
    MAX_ALLOWED_TOKEN_IDS,
    MAX_BAD_WORDS,
    MAX_LOGIT_BIAS,
    MAX_LOGPROBS,
    MAX_N,
    MAX_STOP_STRINGS,
    MAX_STOP_TOKEN_IDS,
    REPETITION_PENALTY_RANGE,
)

TokenIds = list[int]
TokenId = Annotated[int, Field(ge=0)]
SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1


def _nullable(schema: dict[str, Any]) -> dict[str, Any]:
    return {"anyOf": [schema, {"type": "null"}]}


_TOKEN_ID = {"type": "integer", "minimum": 0}
_TOKEN_IDS = {"type": "array", "items": _TOKEN_ID, "minItems": 1}
# NOTE: unions get hand-written schemas: the checks are in the endpoints (clearer messages than a union's).
PROMPT_SCHEMA = {"anyOf": [
    {"type": "string", "minLength": 1},
    {"type": "array", "items": {"type": "string", "minLength": 1}, "minItems": 1},
    _TOKEN_IDS,
    {"type": "array", "items": _TOKEN_IDS, "minItems": 1},
]}
STOP_SCHEMA = {"anyOf": [
    {"type": "string"},
    {"type": "array", "items": {"type": "string", "minLength": 1}, "maxItems": MAX_STOP_STRINGS},
    {"type": "null"},
]}
LOGIT_BIAS_SCHEMA = _nullable({
    "type": "object",
    "propertyNames": {"pattern": "^[0-9]+$"},
    "additionalProperties": {"type": "number", "minimum": -MAX_LOGIT_BIAS, "maximum": MAX_LOGIT_BIAS},
})


class _Request(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True, allow_inf_nan=False)


class StreamOptions(_Request):
    include_usage: bool = Field(False, description="Send one more chunk with the usage before [DONE].")
    continuous_usage_stats: bool = Field(
        False, description="With include_usage: every chunk carries the usage so far (as vLLM).")


class SamplingFields(StructuredOutputFields, InformationalFields):
    """Fields shared by completions and chat completions (OpenAI's, plus vLLM's usual extensions)."""

    model: str | None = Field(None, description="The served model name (optional: there is one model).")
    n: int = Field(1, ge=1, le=MAX_N, description="Completions to generate per prompt.")
    temperature: float | None = Field(None, ge=0.0, le=2.0, description="0 is greedy; default 1.")
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=-1, description="0 or -1 disables top-k.")
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    repetition_penalty: float | None = Field(None, ge=REPETITION_PENALTY_RANGE[0], le=REPETITION_PENALTY_RANGE[1],
                                             description="1 disables it.")
    logit_bias: Annotated[dict[str, float] | None, WithJsonSchema(LOGIT_BIAS_SCHEMA)] = Field(
        None, description=f"Token id (a decimal string) -> bias in [-{MAX_LOGIT_BIAS:g}, {MAX_LOGIT_BIAS:g}].")
    seed: int | None = Field(None, ge=SEED_MIN, le=SEED_MAX)
    stop: Annotated[str | list[str] | None, WithJsonSchema(STOP_SCHEMA)] = Field(
        None, description=f"Up to {MAX_STOP_STRINGS} stop strings; cut out of the returned text.")
    stop_token_ids: list[TokenId] | None = Field(None, max_length=MAX_STOP_TOKEN_IDS)
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = Field(
        True, description="With skip_special_tokens false: kept special tokens are set off by a space.")
    min_tokens: int = Field(0, ge=0, description="EOS and stop_token_ids are masked until this many tokens.")
    include_stop_str_in_output: bool = Field(False, description="Keep the stop string (or token) in the text.")
    allowed_token_ids: list[TokenId] | None = Field(
        None, min_length=1, max_length=MAX_ALLOWED_TOKEN_IDS, description="Generate only these token ids.")
    bad_words: list[str] | None = Field(
        None, max_length=MAX_BAD_WORDS, description="Words never generated (their token sequences, with and without a leading space).")
    truncate_prompt_tokens: int | None = Field(
        None, ge=-1, description="Keep only the last N prompt tokens (-1: max_model_len); not 0.")
    return_tokens_as_token_ids: bool = Field(
        False, description='Logprob tokens as "token_id:N" instead of their text.')
    user: str | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    @property
    def continuous_usage(self) -> bool:
        return self.include_usage and self.stream_options is not None and self.stream_options.continuous_usage_stats


class CompletionRequest(SamplingFields):
    prompt: Annotated[str | list[str] | TokenIds | list[TokenIds], WithJsonSchema(PROMPT_SCHEMA)] = Field(
        ..., description="A string, a list of strings, a list of token ids or a list of such lists (none empty)."
    )
    max_tokens: int | None = Field(
        None, ge=0, description="Tokens to generate at most (default 16, or the checkpoint's max_new_tokens); 0 "
        "only with echo (scores the prompt).")
    best_of: int | None = Field(None, ge=1, le=MAX_N,
                                description="Samples to draw per prompt (>= n); the n best are returned.")
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS,
                                 description="Log-probabilities of each token and of this many top ones.")
    echo: bool = Field(False, description="Return the prompt before the completion (with its logprobs).")
    prompt_logprobs: int | None = Field(
        None, ge=0, le=MAX_LOGPROBS, description="Per prompt position (None first): the prompt token's "
        "logprob, rank and text, and this many top alternatives (choices[].prompt_logprobs).")
    suffix: str | None = Field(None, description="Not supported (only null or empty).")


class TextPart(_Request):
    type: Literal["text"]
    text: str


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[AssistantToolCall] | None = Field(None, description="Calls an assistant turn made.")
    tool_call_id: str | None = Field(None, description="On a tool message: the call it answers.")

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class TemplateFields(_Request):
    """How chat messages are rendered (shared by chat completions and /tokenize)."""

    add_generation_prompt: bool = True
    continue_final_message: bool = Field(
        False, description="Continue the last message: nothing is appended after it (needs "
        "add_generation_prompt false).")
    chat_template: str | None = Field(None, description="A Jinja chat template for this request.")
    chat_template_kwargs: dict[str, Any] | None = Field(
        None, description="More variables for the template (each must be one the template reads).")


class ChatCompletionRequest(SamplingFields, TemplateFields, UnsupportedChatFields):
    messages: list[ChatMessage] = Field(..., min_length=1)
    max_tokens: int | None = Field(None, ge=1, description="Deprecated name of max_completion_tokens.")
    max_completion_tokens: int | None = Field(None, ge=1, description="Default: the rest of the context.")
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS,
                                     description=f"0..{MAX_LOGPROBS} alternatives per token; needs logprobs.")
    echo: bool = Field(False, description="Prepend the last message's content to the answer when that message "
                       "is the assistant's.")
    tools: list[ChatTool] | None = Field(None, description="Functions the model may call (JSON-schema parameters).")
    tool_choice: ToolChoice | None = Field(
        None, description='"none", "auto" (the default with tools), "required", or one named function.')
    parallel_tool_calls: bool | None = Field(None, description="Allow more than one call (default true).")


class TokenizeRequest(TemplateFields):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True


class DetokenizeRequest(_Request):
    model: str | None = None
    tokens: list[TokenId]


# ---- responses ----


class PromptTokensDetails(BaseModel):
    cached_tokens: int


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class PromptLogprob(BaseModel):
    logprob: float
    rank: int | None = None
    decoded_token: str


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    prompt_logprobs: list[dict[str, PromptLogprob] | None] | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None = None


class ChatResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    tool_calls: list[ToolCall] | None = None


class ChatChoice(BaseModel):
    index: int
    message: ChatResponseMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: str | int | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ModelPermission(BaseModel):
    id: str
    object: Literal["model_permission"] = "model_permission"
    created: int
    allow_create_engine: bool = False
    allow_sampling: bool = True
    allow_logprobs: bool = True
    allow_search_indices: bool = False
    allow_view: bool = True
    allow_fine_tuning: bool = False
    organization: str = "*"
    group: str | None = None
    is_blocking: bool = False


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str
    root: str
    parent: str | None = None
    max_model_len: int
    permission: list[ModelPermission]


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class TokenizeResponse(BaseModel):
    tokens: TokenIds
    count: int
    max_model_len: int


class DetokenizeResponse(BaseModel):
    prompt: str


class HealthStatus(BaseModel):
    status: Literal["ok"]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


_ERROR_DESCRIPTIONS = {
    400: "Invalid request: malformed JSON, a wrong type or value, or a prompt beyond the context.",
    401: "Missing or wrong API key (when the server requires one).",
    404: "Unknown model.",
    413: "Request body over the size limit.",
    429: "Too many requests waiting: retry later.",
    500: "The server or the engine failed this request.",
    503: "The engine is not running, or the server is shutting down.",
}
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse, "description": text} for status, text in _ERROR_DESCRIPTIONS.items()
}
# With stream=true the 200 answer is a stream of server-sent events; before OpenAPI 3.2 (``itemSchema``) the
# ``schema`` of an event stream describes one event, as parsed by a client.
SSE_EVENT_SCHEMA = {
    "type": "object",
    "required": ["data"],
    "properties": {
        "data": {"type": "string", "description": "A chunk object as JSON; then [DONE]. A failure after the "
                 "headers went out is sent as an error object ({\"error\": {...}}) and ends the stream."},
        "event": {"type": "string"},
        "id": {"type": "string"},
        "retry": {"type": "integer"},
    },
}
SSE_CONTENT = {"text/event-stream": {"schema": SSE_EVENT_SCHEMA}}
