"""``/v1/chat/completions``: messages -> the checkpoint's chat template -> engine request -> chat objects."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import Any

from fastapi.responses import Response
from starlette.requests import Request

from server.api.chat_template import render_messages
from server.api.errors import APIError
from server.api.fields import check_fields
from server.api.generation import (
    EngineCall,
    SampleResult,
    UsageCounter,
    collect,
    prepare_calls,
    release_slots,
    run_unless_disconnected,
    stream_outputs,
)
from server.api.logprobs import chat_logprobs
from server.api.params import sampling_params, truncate_prompt
from server.api.response_format import compile_spec, requested_spec
from server.api.schemas import (
    ChatChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatLogprobs,
    ChatResponseMessage,
)
from server.api.state import AppState
from server.api.streaming import sse_response
from server.api.tokenization import check_text_length, json_response, off_loop
from server.api.tool_parser import ToolCallParser
from server.api.tools import ToolPlan, tool_plan, tool_spec
from server.engine.request import RequestOutput
from server.engine.sampling_params import MAX_LOGPROBS, SamplingParams
from server.engine.structured import StructuredSpec


@dataclass
class _Job:
    id: str
    created: int
    body: ChatCompletionRequest
    calls: list[EngineCall]
    tools: ToolPlan | None = None

    @property
    def parses_calls(self) -> bool:
        return self.tools is not None and self.tools.calls_allowed

    @property
    def top_n(self) -> int | None:
        """Alternatives per token, or None when logprobs were not asked for."""
        return (self.body.top_logprobs or 0) if self.body.logprobs else None

    @property
    def echoed(self) -> str:
        """With echo: the last message's content when it is the assistant's (it is continued), else ""."""
        last = self.body.messages[-1]
        return last.text() if self.body.echo and last.role == "assistant" else ""


async def create_chat_completion(state: AppState, body: ChatCompletionRequest, request: Request) -> Response:
    state.check_model(body.model)
    check_fields(body)
    plan = tool_plan(body)
    if body.truncate_prompt_tokens is None:
        check_text_length(state, sum(len(m.text()) for m in body.messages), "messages")
    rendered = await off_loop(render_messages, state, body.messages, body, plan)
    prompt_ids = truncate_prompt(rendered, body, state.max_model_len)
    params = chat_params(body, state.max_model_len - len(prompt_ids), state.generation_defaults).with_overrides(
        structured=_output_spec(body, plan))
    await compile_spec(state.engine.grammars, params)
    request_id = f"chatcmpl-{uuid.uuid4().hex}"
    job = _Job(request_id, int(time.time()), body, prepare_calls(state, request_id, [prompt_ids], params), plan)
    if body.stream:
        return sse_response(_stream(state, job), state.settings.drain_timeout, lambda: release_slots(job.calls))
    try:
        results = await run_unless_disconnected(request, collect(stream_outputs(state, job.calls)))
    finally:
        release_slots(job.calls)
    return await json_response(lambda: _response(state, job, results))


def chat_params(body: ChatCompletionRequest, room: int, defaults: dict[str, Any]) -> SamplingParams:
    """Engine parameters; without a limit the answer may fill the rest of the context (or the checkpoint's
    max_new_tokens, when it has one and it is smaller)."""
    if body.top_logprobs is not None:
        if not body.logprobs:
            raise APIError(400, "top_logprobs needs logprobs to be true", param="top_logprobs")
        if not 0 <= body.top_logprobs <= MAX_LOGPROBS:
            raise APIError(400, f"top_logprobs must be in [0, {MAX_LOGPROBS}]", param="top_logprobs")
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    if max_tokens is None:
        max_tokens = max(min(room, int(defaults.get("max_tokens", room))), 1)
    return sampling_params(body, defaults, n=body.n, max_tokens=max_tokens,
                           logprobs=(body.top_logprobs or 0) if body.logprobs else None)


def _output_spec(body: ChatCompletionRequest, plan: ToolPlan | None) -> StructuredSpec | None:
    """The output constraint: tool calls, or response_format / structured_outputs (not both)."""
    calls, requested = tool_spec(plan), requested_spec(body)
    if calls is not None and requested is not None:
        raise APIError(400, f"{requested.param} cannot be combined with tool calls (tool_choice \"none\" "
                       "allows it)", param=requested.param)
    return calls or requested


def _finish_reason(reason: str | None, has_calls: bool) -> str | None:
    return "tool_calls" if has_calls and reason == "stop" else reason


def _response(state: AppState, job: _Job, results: dict[tuple[int, int], SampleResult]) -> ChatCompletionResponse:
    usage = UsageCounter(job.calls)
    choices = []
    as_ids = job.body.return_tokens_as_token_ids
    for (_, index), sample in sorted(results.items()):
        usage.set(0, index, sample.num_output_tokens, sample.num_cached_tokens)
        logprobs = None
        if job.top_n is not None:
            logprobs = {"content": chat_logprobs(state.texts, sample.logprobs, job.top_n, as_ids)}
        message, reason = ChatResponseMessage(content=job.echoed + sample.text), sample.finish_reason
        if job.parses_calls:
            parser = ToolCallParser()
            parser.feed(sample.text, final=True)
            content, calls = parser.message_fields()
            message = ChatResponseMessage.model_validate({"content": content, "tool_calls": calls})
            reason = _finish_reason(reason, bool(calls))
        choices.append(ChatChoice(index=index, message=message, finish_reason=reason,
                                  logprobs=None if logprobs is None else ChatLogprobs.model_validate(logprobs),
                                  stop_reason=sample.stop_reason))
    return ChatCompletionResponse(id=job.id, created=job.created, model=state.settings.served_model_name,
                                  choices=choices, usage=usage.usage())


async def _stream(state: AppState, job: _Job) -> AsyncGenerator[dict[str, Any], None]:
    usage = UsageCounter(job.calls)
    running = job.body.continuous_usage
    for index in range(job.body.n):
        # NOTE: with tools, content stays null until text comes (an answer of calls only has none).
        first = {"role": "assistant", "content": None if job.parses_calls else ""}
        yield _chunk(state, job, [_choice(index, first, None, None)],
                     usage.usage().model_dump() if running else None)
        if job.echoed:
            yield _chunk(state, job, [_choice(index, {"content": job.echoed}, None, None)],
                         usage.usage().model_dump() if running else None)
    parsers: dict[int, ToolCallParser] = {}
    async for p, output in stream_outputs(state, job.calls):
        usage.add(p, output)
        choice = (_tool_delta_choice(parsers.setdefault(output.index, ToolCallParser()), output)
                  if job.parses_calls else _delta_choice(state, job, output))
        if choice is not None:
            yield _chunk(state, job, [choice], usage.usage().model_dump() if running else None)
    if job.body.include_usage:
        yield _chunk(state, job, [], usage.usage().model_dump())


def _delta_choice(state: AppState, job: _Job, output: RequestOutput) -> dict[str, Any] | None:
    logprobs = None
    if job.top_n is not None and output.logprobs:
        content = chat_logprobs(state.texts, output.logprobs, job.top_n, job.body.return_tokens_as_token_ids)
        logprobs = {"content": content}
    if not output.new_text and not output.finished and logprobs is None:
        return None
    delta = {"content": output.new_text} if output.new_text or logprobs else {}
    reason = output.finish_reason if output.finished else None
    return _choice(output.index, delta, logprobs, reason, output.stop_reason if output.finished else None)


def _tool_delta_choice(parser: ToolCallParser, output: RequestOutput) -> dict[str, Any] | None:
    """Deltas of a request that may call tools: content, then each call's name and its argument fragments."""
    delta = parser.feed(output.new_text, final=output.finished)
    if not delta and not output.finished:
        return None
    reason = _finish_reason(output.finish_reason, bool(parser.calls)) if output.finished else None
    return _choice(output.index, delta, None, reason)


def _choice(index: int, delta: dict[str, Any], logprobs: dict[str, Any] | None,
            reason: str | None, stop_reason: str | int | None = None) -> dict[str, Any]:
    return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": reason,
            "stop_reason": stop_reason}


def _chunk(state: AppState, job: _Job, choices: list[dict[str, Any]],
           usage: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"id": job.id, "object": "chat.completion.chunk", "created": job.created,
            "model": state.settings.served_model_name, "choices": choices, "usage": usage}
