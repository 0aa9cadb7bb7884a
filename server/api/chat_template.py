"""Chat messages -> prompt token ids: the template in force, its controls, and their validation (400s).

The template is the request's ``chat_template`` (only with ``--trust-request-chat-template``), else the server's
``--chat-template``, else the checkpoint's.
The ``developer`` role is rendered as ``system``; content parts are joined. ``chat_template_kwargs`` may only
name variables the template reads (a misspelt one would be ignored silently otherwise).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path

import jinja2
import jinja2.meta
import jinja2.sandbox

from server.api.errors import APIError
from server.api.schemas import ChatMessage, TemplateFields
from server.api.state import AppState
from server.api.tools import ToolPlan, template_inputs

_RESERVED = frozenset({"messages", "add_generation_prompt", "continue_final_message", "chat_template"})


def load_chat_template(value: str) -> str:
    """``--chat-template``: a file's contents, or the value itself when it looks like a Jinja template."""
    path = Path(value)
    try:
        if path.is_file():
            return path.read_text(encoding="utf-8")
    except OSError as exc:  # a too-long name, or an unreadable file
        if any(c in value for c in "{}\n"):
            return value
        raise ValueError(f"cannot read the chat template file {value!r}: {exc}") from exc
    if any(c in value for c in "{}\n"):
        return value
    raise ValueError(f"--chat-template {value!r} is neither a file nor a Jinja template")


@functools.lru_cache(maxsize=32)
def template_variables(template: str) -> frozenset[str]:
    """Variables a template reads; raises ``jinja2.TemplateSyntaxError`` for a template that does not parse."""
    environment = jinja2.sandbox.ImmutableSandboxedEnvironment(extensions=["jinja2.ext.loopcontrols"])
    return frozenset(jinja2.meta.find_undeclared_variables(environment.parse(template)))


def _template(state: AppState, fields: TemplateFields) -> str:
    if fields.chat_template and not state.settings.trust_request_chat_template:
        raise APIError(400, "chat_template in a request needs a server started with "
                       "--trust-request-chat-template", param="chat_template", code="chat_template_not_trusted")
    template = fields.chat_template or state.chat_template
    try:
        variables = template_variables(template)
    except jinja2.TemplateSyntaxError as exc:
        raise APIError(400, f"the chat template does not parse: {exc}", param="chat_template") from exc
    unknown = sorted(set(fields.chat_template_kwargs or {}) - (variables - _RESERVED))
    if unknown:
        raise APIError(400, f"chat_template_kwargs names variables the chat template does not use: "
                       f"{', '.join(unknown)}", param="chat_template_kwargs")
    return template


def render_messages(state: AppState, messages: Sequence[ChatMessage], fields: TemplateFields,
                    tools: ToolPlan | None = None) -> list[int]:
    """Token ids of the chat prompt rendered with the template in force and the request's options (tools and
    past tool calls as ``server.api.tools`` renders them)."""
    if fields.continue_final_message and fields.add_generation_prompt:
        raise APIError(400, "continue_final_message and add_generation_prompt cannot both be true",
                       param="continue_final_message")
    template = _template(state, fields)
    plain, extra = template_inputs(messages, tools, "tools" in template_variables(template))
    try:
        return state.engine.tokenizer.apply_chat_template(
            plain, fields.add_generation_prompt, state.settings.special_tokens_in_messages, chat_template=template,
            continue_final_message=fields.continue_final_message,
            template_kwargs={**(fields.chat_template_kwargs or {}), **extra},
        )
    except Exception as exc:  # a template may raise on conversations it does not support
        raise APIError(400, f"cannot apply the chat template: {exc}", param="messages") from exc
