"""Running API requests on the engine: one engine request per prompt, merged into one output stream.

Every engine iterator is closed deterministically (``aclosing``), so a client that goes away, a cancelled
task or an error aborts the engine requests at once and their KV blocks are freed.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Awaitable, Sequence
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import TypeVar

from starlette.requests import Request

from server.api.errors import APIError, ClientDisconnected
from server.api.schemas import PromptTokensDetails, Usage
from server.api.state import AppState, QueueSlots
from server.engine.request import RequestOutput, TokenLogprob
from server.engine.sampling_params import SamplingParams

T = TypeVar("T")
MAX_PROMPTS = 2048  # prompts in one completion request
Item = tuple[int, RequestOutput]  # (prompt index, delta)


@dataclass(frozen=True)
class EngineCall:
    """One engine request: a prompt and its sampling parameters."""

    prompt_index: int
    prompt_ids: list[int]
    params: SamplingParams
    request_id: str
    slots: QueueSlots  # shared by the calls of one request


def prepare_calls(state: AppState, request_id: str, prompts: Sequence[list[int]],
                  params: SamplingParams) -> list[EngineCall]:
    """Validate every prompt (400 before anything starts), then take queue places (or 429).

    The caller must ``release_all`` the calls' slots once its response is done (``release_slots``).
    """
    check_request_size(state, prompts, params)
    for ids in prompts:
        state.engine.validate(ids, params)
    slots = state.admit(len(prompts) * params.n, "n" if params.n > 1 else "prompt")
    return [
        EngineCall(i, list(ids), params, request_id if len(prompts) == 1 else f"{request_id}-{i}", slots)
        for i, ids in enumerate(prompts)
    ]


def check_request_size(state: AppState, prompts: Sequence[list[int]], params: SamplingParams) -> None:
    """400 for a request the server will not take whatever its load: too many prompts, more samples per prompt
    than one batch holds, or an answer with more than ``max_response_entries`` token entries (tokens x
    samples x (1 + logprob alternatives))."""
    if len(prompts) > MAX_PROMPTS:
        raise APIError(400, f"prompt may hold at most {MAX_PROMPTS} prompts, got {len(prompts)}", param="prompt")
    if params.n > state.engine.config.max_num_seqs:
        raise APIError(400, f"n/best_of is {params.n}; this server runs at most {state.engine.config.max_num_seqs} "
                       "sequences at once", param="n")
    echoed = params.prompt_logprobs is not None
    tokens = sum((len(ids) if echoed else 0) + params.max_tokens for ids in prompts)
    width = 1 + max(params.logprobs or 0, params.prompt_logprobs or 0)
    entries = tokens * params.n * width
    if entries > state.settings.max_response_entries:
        raise APIError(400, f"the answer would hold {entries} token entries (tokens x samples x logprobs), more "
                       f"than the server's limit of {state.settings.max_response_entries}: lower n, max_tokens or "
                       "logprobs, or split the prompts", param="max_tokens", code="response_too_large")


def release_slots(calls: Sequence[EngineCall]) -> None:
    """Give back the queue places of calls that never started (idempotent)."""
    if calls:
        calls[0].slots.release_all()


async def stream_outputs(state: AppState, calls: Sequence[EngineCall]) -> AsyncGenerator[Item, None]:
    """Deltas of all calls as they come, tagged with their prompt index."""
    state.num_in_flight += 1
    try:
        source = _tracked(state, calls[0]) if len(calls) == 1 else _fan_in(state, calls)
        async with aclosing(source) as outputs:
            async for item in outputs:
                yield item
    finally:
        state.num_in_flight -= 1


async def _tracked(state: AppState, call: EngineCall) -> AsyncGenerator[Item, None]:
    tracker = state.metrics.tracker(call.params.n)
    started, reason = False, "abort"
    try:
        generator = state.engine.generate(call.prompt_ids, call.params, call.request_id)
        async with aclosing(generator) as outputs:
            async for output in outputs:
                if not started:
                    started = True
                    call.slots.release(call.params.n)
                tracker.observe(output)
                yield call.prompt_index, output
    except Exception:
        reason = "error"
        raise
    finally:
        if not started:
            call.slots.release(call.params.n)
        tracker.close(reason)


async def _fan_in(state: AppState, calls: Sequence[EngineCall]) -> AsyncGenerator[Item, None]:
    """Run the calls concurrently; the first failure ends the stream (and cancels the others)."""
    queue: asyncio.Queue[Item | BaseException | None] = asyncio.Queue()

    async def pump(call: EngineCall) -> None:
        try:
            async with aclosing(_tracked(state, call)) as outputs:
                async for item in outputs:
                    queue.put_nowait(item)
        except Exception as exc:
            queue.put_nowait(exc)
        else:
            queue.put_nowait(None)

    tasks = [asyncio.create_task(pump(call)) for call in calls]
    try:
        remaining = len(tasks)
        while remaining:
            item = await queue.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield item
    finally:
        for task in tasks:
            task.cancel()


@dataclass
class SampleResult:
    """Everything one sample (choice) produced, accumulated from its deltas."""

    prompt_index: int
    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprob | None] | None = None
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    num_output_tokens: int = 0
    num_cached_tokens: int = 0

    def add(self, output: RequestOutput) -> None:
        self.text += output.new_text
        self.token_ids += output.new_token_ids
        self.logprobs += output.logprobs or []
        if output.prompt_logprobs is not None:
            self.prompt_logprobs = output.prompt_logprobs
        if output.finished:
            self.finish_reason = output.finish_reason
            self.stop_reason = output.stop_reason
        self.num_output_tokens = output.num_output_tokens
        self.num_cached_tokens = output.num_cached_tokens

    @property
    def cumulative_logprob(self) -> float:
        return sum(e.logprob for e in self.logprobs)


async def collect(outputs: AsyncGenerator[Item, None]) -> dict[tuple[int, int], SampleResult]:
    """Run to the end; results keyed by (prompt index, sample index)."""
    results: dict[tuple[int, int], SampleResult] = {}
    async with aclosing(outputs) as stream:
        async for prompt_index, output in stream:
            key = (prompt_index, output.index)
            if key not in results:
                results[key] = SampleResult(prompt_index, output.index)
            results[key].add(output)
    return results


async def run_unless_disconnected(request: Request, awaitable: Awaitable[T]) -> T:
    """Await ``awaitable``; when the client disconnects first, cancel it and raise ``ClientDisconnected``."""
    task = asyncio.ensure_future(awaitable)
    watcher = asyncio.ensure_future(_wait_disconnect(request))
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
    if task in done:
        return task.result()
    raise ClientDisconnected()


async def _wait_disconnect(request: Request) -> None:
    # NOTE: the body has been read already, so the next ASGI message can only be the disconnect.
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


class UsageCounter:
    """Token usage of a request: prompts once each, every generated token of every sample, and the prompt
    tokens served from the prefix cache (each prompt's first sample; the others share its blocks).

    ``count_output`` False: the generated tokens are not returned (echo with ``max_tokens: 0``), so none count.
    """

    def __init__(self, calls: Sequence[EngineCall], count_output: bool = True) -> None:
        self.prompt_tokens = sum(len(call.prompt_ids) for call in calls)
        self._outputs: dict[tuple[int, int], int] = {}
        self._cached: dict[int, int] = {}
        self._count_output = count_output

    def add(self, prompt_index: int, output: RequestOutput) -> None:
        self.set(prompt_index, output.index, output.num_output_tokens, output.num_cached_tokens)

    def set(self, prompt_index: int, index: int, num_output_tokens: int, num_cached_tokens: int = 0) -> None:
        self._outputs[(prompt_index, index)] = num_output_tokens if self._count_output else 0
        if index == 0:
            self._cached[prompt_index] = num_cached_tokens

    def usage(self) -> Usage:
        completion = sum(self._outputs.values())
        return Usage(prompt_tokens=self.prompt_tokens, completion_tokens=completion,
                     total_tokens=self.prompt_tokens + completion,
                     prompt_tokens_details=PromptTokensDetails(cached_tokens=sum(self._cached.values())))
