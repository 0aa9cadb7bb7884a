"""Tool calling on ``/v1/chat/completions``: checking ``tools``/``tool_choice``, rendering tools and past calls
into the prompt, and the grammar that forces valid calls.

JetMoe has no tool-call format of its own, so the server defines one and forces it by grammar. A call is the
text ``<tool_call>{"name": "NAME", "arguments": {...}}</tool_call>``, the arguments valid against the tool's
``parameters``. ``tool_choice``: ``"required"`` allows nothing but calls (one, or several separated by newlines when
``parallel_tool_calls``), a named function exactly one call of it; ``"auto"`` lets the model write text and start a call at
any point, the call itself then forced valid; ``"none"`` does not constrain the output.

Prompt: a checkpoint template that uses ``tools`` gets them (and past calls) as transformers'
``apply_chat_template(tools=...)`` passes them. Otherwise (JetMoe's template ignores tools) the system turn
gets this text, a new system turn when there is none::

    You can call these tools. To call one, answer with <tool_call>{"name": ..., "arguments": ...}</tool_call>.
    {"name": "get_weather", "description": "...", "parameters": {...}}   (one line per tool)

and past assistant calls are rendered in the call format above, tool results as ``tool`` turns.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from server.api.errors import APIError
from server.api.schemas import ChatCompletionRequest, ChatMessage
from server.api.schemas_structured import ChatTool, NamedToolChoice
from server.engine.structured import StructuredSpec

CALL_BEGIN, CALL_END = "<tool_call>", "</tool_call>"
_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
_EMPTY_PARAMETERS: dict[str, Any] = {"type": "object", "properties": {}}
SYSTEM_PREAMBLE = (f"You can call these tools. To call one, answer with "
                   f'{CALL_BEGIN}{{"name": ..., "arguments": ...}}{CALL_END}.')


@dataclass(frozen=True)
class ToolPlan:
    """The tools of a request and how they may be called."""

    tools: tuple[ChatTool, ...]
    choice: str  # "none", "auto", "required" or the forced function's name
    parallel: bool

    @property
    def calls_allowed(self) -> bool:
        return self.choice != "none"


def tool_plan(body: ChatCompletionRequest) -> ToolPlan | None:
    """Check ``tools`` and ``tool_choice`` (400s naming them); None without tools."""
    if not body.tools:
        if body.tool_choice not in (None, "none"):
            raise APIError(400, "tool_choice needs tools", param="tool_choice")
        return None
    names = [tool.function.name for tool in body.tools]
    for i, name in enumerate(names):
        if not _NAME.fullmatch(name):
            raise APIError(400, f"tools.{i}.function.name must be 1 to 64 of a-z, A-Z, 0-9, _ and -",
                           param=f"tools.{i}.function.name")
    if len(set(names)) != len(names):
        raise APIError(400, "tool names must be unique", param="tools")
    requested = body.tool_choice or "auto"
    choice: str
    if isinstance(requested, NamedToolChoice):
        if requested.function.name not in names:
            raise APIError(400, f"tool_choice names {requested.function.name!r}, which is not in tools",
                           param="tool_choice")
        choice = requested.function.name
    else:
        choice = requested
    return ToolPlan(tuple(body.tools), choice, body.parallel_tool_calls is not False)


def tool_spec(plan: ToolPlan | None) -> StructuredSpec | None:
    """The grammar (an xgrammar structural tag) that forces valid calls, or None when calls are not allowed."""
    if plan is None or not plan.calls_allowed:
        return None
    tools = [t for t in plan.tools if plan.choice in ("auto", "required") or t.function.name == plan.choice]
    tags = [_call_tag(tool) for tool in tools]
    fmt: dict[str, Any]
    if plan.choice == "auto":
        fmt = {"type": "triggered_tags", "triggers": [CALL_BEGIN], "tags": tags, "at_least_one": False,
               "stop_after_first": not plan.parallel}
    else:
        fmt = {"type": "tags_with_separator", "tags": tags, "separator": "\n", "at_least_one": True,
               "stop_after_first": plan.choice != "required" or not plan.parallel}
    return StructuredSpec("structural_tag", json.dumps({"type": "structural_tag", "format": fmt}), "tools")


def call_prefix(name: str) -> str:
    """The text of a call up to its arguments."""
    return f'{CALL_BEGIN}{{"name": {json.dumps(name)}, "arguments": '


def _call_tag(tool: ChatTool) -> dict[str, Any]:
    parameters = tool.function.parameters if tool.function.parameters is not None else _EMPTY_PARAMETERS
    content = {"type": "json_schema", "json_schema": parameters}
    return {"type": "tag", "begin": call_prefix(tool.function.name), "content": content, "end": "}" + CALL_END}


def template_inputs(messages: Sequence[ChatMessage], plan: ToolPlan | None,
                    native: bool) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The messages and extra template variables for rendering, as the module docstring describes.

    ``native``: the template reads ``tools`` (and so renders tools and past calls itself).
    """
    if native:
        extra = {"tools": [t.model_dump(exclude_none=True) for t in plan.tools]} if plan is not None else {}
        return [_native_message(m) for m in messages], extra
    plain = [{"role": _role(m), "content": _plain_content(m)} for m in messages]
    if plan is not None:
        block = "\n".join([SYSTEM_PREAMBLE, *(_tool_line(t) for t in plan.tools)])
        if plain and plain[0]["role"] == "system":
            plain[0] = {"role": "system", "content": f"{plain[0]['content']}\n\n{block}"}
        else:
            plain.insert(0, {"role": "system", "content": block})
    return plain, {}


def _role(message: ChatMessage) -> str:
    return "system" if message.role == "developer" else message.role


def _plain_content(message: ChatMessage) -> str:
    calls = "".join(f"{call_prefix(c.function.name)}{c.function.arguments}}}{CALL_END}"
                    for c in message.tool_calls or [])
    return message.text() + calls


def _tool_line(tool: ChatTool) -> str:
    fn = tool.function
    entry: dict[str, Any] = {"name": fn.name}
    if fn.description:
        entry["description"] = fn.description
    entry["parameters"] = fn.parameters if fn.parameters is not None else _EMPTY_PARAMETERS
    return json.dumps(entry, ensure_ascii=False)


def _native_message(message: ChatMessage) -> dict[str, Any]:
    out: dict[str, Any] = {"role": _role(message), "content": message.text()}
    if message.tool_calls:
        out["tool_calls"] = [{"id": c.id, "type": "function",
                              "function": {"name": c.function.name, "arguments": _loads(c.function.arguments)}}
                             for c in message.tool_calls]
    if message.tool_call_id is not None:
        out["tool_call_id"] = message.tool_call_id
    return out


def _loads(arguments: str) -> Any:
    try:
        return json.loads(arguments)
    except ValueError:
        return arguments
