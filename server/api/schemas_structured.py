"""Request and response bodies of structured outputs and tool calling, and the fields OpenAI defines that the
server accepts only as information or refuses (a 400 naming them, ``server.api.fields``)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

JSONSchema = dict[str, Any]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True, allow_inf_nan=False)


class ResponseFormatText(_Strict):
    type: Literal["text"]


class ResponseFormatJSONObject(_Strict):
    type: Literal["json_object"]


class JSONSchemaFormat(_Strict):
    name: str = Field(..., description="The schema's name (informational).")
    description: str | None = None
    schema_: JSONSchema | None = Field(None, alias="schema", description="The JSON schema the output matches.")
    strict: bool | None = Field(None, description="Accepted; the output always matches the schema exactly.")


class ResponseFormatJSONSchema(_Strict):
    type: Literal["json_schema"]
    json_schema: JSONSchemaFormat


ResponseFormat = Annotated[
    ResponseFormatText | ResponseFormatJSONObject | ResponseFormatJSONSchema, Field(discriminator="type")
]


class StructuredOutputsParams(_Strict):
    """vLLM's ``structured_outputs``: exactly one of the constraints."""

    json_: JSONSchema | str | None = Field(None, alias="json", description="A JSON schema (object or its text).")
    regex: str | None = None
    choice: list[str] | None = Field(None, description="The output is exactly one of these strings.")
    grammar: str | None = Field(None, description="An EBNF grammar (GBNF-style, rule `root`).")
    json_object: bool | None = Field(None, description="true: any JSON object.")


class StructuredOutputFields(_Strict):
    """Output constraints, as OpenAI (``response_format``) and vLLM (the others) accept them."""

    response_format: ResponseFormat | None = Field(
        None, description="text, json_object or json_schema: the output is constrained to match it.")
    structured_outputs: StructuredOutputsParams | None = None
    guided_json: JSONSchema | str | None = Field(None, description="Older name of structured_outputs.json.")
    guided_regex: str | None = Field(None, description="Older name of structured_outputs.regex.")
    guided_choice: list[str] | None = Field(None, description="Older name of structured_outputs.choice.")
    guided_grammar: str | None = Field(None, description="Older name of structured_outputs.grammar.")


class InformationalFields(_Strict):
    """OpenAI fields that do not change the answer: accepted and not used."""

    metadata: dict[str, str] | None = None
    store: bool | None = None
    service_tier: str | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None


_REFUSED = "Not supported: any value other than null is a 400."


class UnsupportedChatFields(_Strict):
    """OpenAI chat fields whose omission would change the answer: a 400 naming them unless null."""

    audio: dict[str, Any] | None = Field(None, description=_REFUSED)
    modalities: list[str] | None = Field(None, description='Only ["text"]; audio output is a 400.')
    prediction: dict[str, Any] | None = Field(None, description=_REFUSED)
    web_search_options: dict[str, Any] | None = Field(None, description=_REFUSED)
    functions: list[dict[str, Any]] | None = Field(None, description=_REFUSED + " Use tools.")
    function_call: str | dict[str, Any] | None = Field(None, description=_REFUSED + " Use tool_choice.")


class FunctionDefinition(_Strict):
    name: str = Field(..., description="a-z, A-Z, 0-9, _ and -, at most 64 characters.")
    description: str | None = None
    parameters: JSONSchema | None = Field(None, description="JSON schema of the arguments (default: none).")
    strict: bool | None = None


class ChatTool(_Strict):
    type: Literal["function"]
    function: FunctionDefinition


class FunctionName(_Strict):
    name: str


class NamedToolChoice(_Strict):
    type: Literal["function"]
    function: FunctionName


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice


class CalledFunction(_Strict):
    name: str
    arguments: str = Field(..., description="The arguments as JSON text.")


class AssistantToolCall(_Strict):
    id: str
    type: Literal["function"]
    function: CalledFunction


# ---- responses ----


class ToolCallFunction(BaseModel):
    name: str
    arguments: str


class ToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: ToolCallFunction
