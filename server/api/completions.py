"""``/v1/completions``: prompts -> engine requests -> legacy completion objects (whole or streamed)."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass
from typing import Any

from fastapi.responses import Response
from starlette.requests import Request

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
from server.api.logprobs import completion_logprobs, prompt_logprobs_field
from server.api.params import sampling_params, truncate_prompt
from server.api.response_format import compile_spec, requested_spec
from server.api.schemas import (
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    PromptLogprob,
)
from server.api.state import AppState
from server.api.streaming import sse_response
from server.api.tokenization import encode_texts, json_response
from server.engine.request import RequestOutput, TokenLogprob
from server.engine.sampling_params import MAX_N, SamplingParams


@dataclass
class Prompt:
    ids: list[int]
    text: str


@dataclass
class _Job:
    """One completion request, resolved: id, prompts, engine parameters and the shape of the answer."""

    id: str
    created: int
    body: CompletionRequest
    prompts: list[Prompt]
    params: SamplingParams
    calls: list[EngineCall]

    @property
    def n(self) -> int:
        return self.body.n

    @property
    def echo_only(self) -> bool:
        """echo with max_tokens 0: the prompt is scored, the one token the engine draws is dropped (as vLLM)."""
        return self.body.echo and self.body.max_tokens == 0

    def usage_counter(self) -> UsageCounter:
        return UsageCounter(self.calls, count_output=not self.echo_only)


async def create_completion(state: AppState, body: CompletionRequest, request: Request) -> Response:
    state.check_model(body.model)
    check_fields(body)
    prompts = [_truncated(state, p, body) for p in await parse_prompts(state, body)]
    params = completion_params(body, state.generation_defaults).with_overrides(structured=requested_spec(body))
    await compile_spec(state.engine.grammars, params)
    request_id = f"cmpl-{uuid.uuid4().hex}"
    calls = prepare_calls(state, request_id, [p.ids for p in prompts], params)
    job = _Job(request_id, int(time.time()), body, prompts, params, calls)
    if body.stream:
        return sse_response(_stream(state, job), state.settings.drain_timeout, lambda: release_slots(calls))
    try:
        results = await run_unless_disconnected(request, collect(stream_outputs(state, calls)))
    finally:
        release_slots(calls)
    return await json_response(lambda: _response(state, job, results))


async def parse_prompts(state: AppState, body: CompletionRequest) -> list[Prompt]:
    """A string, a list of strings, a list of token ids, or a list of token id lists (text tokenized off the
    event loop, after a length check unless ``truncate_prompt_tokens`` keeps only the end of it)."""
    prompt = body.prompt
    tokenizer = state.engine.tokenizer
    texts = [prompt] if isinstance(prompt, str) else prompt
    if not texts or any(isinstance(p, str) and not p for p in texts):
        raise APIError(400, "prompt must not be empty", param="prompt")
    if isinstance(texts[0], str):
        strings = [str(p) for p in texts]
        ids = await encode_texts(state, strings, check_length=body.truncate_prompt_tokens is None)
        return [Prompt(i, p) for i, p in zip(ids, strings)]
    lists: list[list[int]] = [prompt] if isinstance(prompt[0], int) else prompt  # type: ignore[list-item,assignment]
    if any(not ids for ids in lists):
        raise APIError(400, "a token id prompt must not be empty", param="prompt")
    vocab = state.engine.vocab_size
    if any(not 0 <= t < vocab for ids in lists for t in ids):
        raise APIError(400, f"prompt token ids must be in [0, {vocab})", param="prompt")
    return [Prompt(list(ids), tokenizer.decode(ids)) for ids in lists]


def _truncated(state: AppState, prompt: Prompt, body: CompletionRequest) -> Prompt:
    ids = truncate_prompt(prompt.ids, body, state.max_model_len)
    return prompt if len(ids) == len(prompt.ids) else Prompt(ids, state.engine.tokenizer.decode(ids))


def _max_tokens(body: CompletionRequest, defaults: dict[str, Any]) -> int:
    if body.max_tokens is None:
        return int(defaults.get("max_tokens", 16))
    if body.max_tokens == 0 and not body.echo:
        raise APIError(400, "max_tokens must be at least 1 (0 only with echo, to score the prompt)",
                       param="max_tokens")
    if body.min_tokens > body.max_tokens:
        raise APIError(400, f"min_tokens must be at most max_tokens={body.max_tokens}, got {body.min_tokens}",
                       param="min_tokens")
    return max(body.max_tokens, 1)


def completion_params(body: CompletionRequest, defaults: dict[str, Any]) -> SamplingParams:
    """Engine parameters; with ``best_of`` > n the engine draws best_of samples with logprobs."""
    if body.suffix:
        raise APIError(400, "suffix is not supported", param="suffix")
    best_of = body.n if body.best_of is None else body.best_of
    if not isinstance(best_of, int) or best_of < body.n or best_of > MAX_N:
        raise APIError(400, f"best_of must be in [n, {MAX_N}], got {best_of}", param="best_of")
    if body.stream and best_of > body.n:
        raise APIError(400, "best_of > n is not supported when streaming", param="best_of")
    if body.stream and body.prompt_logprobs is not None:
        raise APIError(400, "prompt_logprobs are not available when streaming", param="prompt_logprobs")
    logprobs = body.logprobs
    if logprobs is None and best_of > body.n:
        logprobs = 0  # needed to rank the samples
    wanted = [n for n in (body.logprobs if body.echo else None, body.prompt_logprobs) if n is not None]
    return sampling_params(
        body,
        defaults,
        n=best_of,
        max_tokens=_max_tokens(body, defaults),
        logprobs=logprobs,
        prompt_logprobs=max(wanted) if wanted else None,
    )


def _response(state: AppState, job: _Job, results: dict[tuple[int, int], SampleResult]) -> CompletionResponse:
    choices = []
    for p, prompt in enumerate(job.prompts):
        samples = [results[(p, i)] for i in range(job.params.n) if (p, i) in results]
        if job.params.n > job.n:
            samples = sorted(samples, key=lambda s: s.cumulative_logprob, reverse=True)[: job.n]
        for rank, sample in enumerate(samples):
            choices.append(_choice(state, job, p * job.n + rank, prompt, sample))
    usage = job.usage_counter()
    for (p, i), sample in results.items():
        usage.set(p, i, sample.num_output_tokens, sample.num_cached_tokens)
    return CompletionResponse(id=job.id, created=job.created, model=state.settings.served_model_name,
                              choices=choices, usage=usage.usage())


def _choice(state: AppState, job: _Job, index: int, prompt: Prompt, sample: SampleResult) -> CompletionChoice:
    body, echo = job.body, job.body.echo
    generated = ([], [], "") if job.echo_only else (sample.token_ids, sample.logprobs, sample.text)
    text = (prompt.text if echo else "") + generated[2]
    logprobs = None
    if body.logprobs is not None:
        ids, entries = _logprob_entries(prompt if echo else None, sample.prompt_logprobs, generated[0], generated[1])
        hidden = _hidden(state, job, ids, len(prompt.ids) if echo else 0)
        lead = _lead(state, prompt, ids, hidden) if echo else 0
        logprobs, _ = completion_logprobs(state.texts, ids, entries, 0, body.return_tokens_as_token_ids, hidden,
                                          lead)
    prompt_logprobs = None
    if body.prompt_logprobs is not None and sample.prompt_logprobs is not None:
        field = prompt_logprobs_field(state.texts, sample.prompt_logprobs, body.prompt_logprobs)
        prompt_logprobs = [None if p is None else {k: PromptLogprob(**v) for k, v in p.items()} for p in field]
    reason = "length" if job.echo_only else sample.finish_reason
    return CompletionChoice(index=index, text=text, finish_reason=reason,
                            logprobs=None if logprobs is None else CompletionLogprobs.model_validate(logprobs),
                            stop_reason=None if job.echo_only else sample.stop_reason,
                            prompt_logprobs=prompt_logprobs)


def _logprob_entries(
    prompt: Prompt | None, prompt_logprobs: Sequence[TokenLogprob | None] | None,
    token_ids: Sequence[int], logprobs: Sequence[TokenLogprob],
) -> tuple[list[int], list[TokenLogprob | None]]:
    """Token ids and logprob entries: the (echoed) prompt's first, then the generated ones."""
    ids: list[int] = []
    entries: list[TokenLogprob | None] = []
    if prompt is not None:
        ids += prompt.ids
        entries += list(prompt_logprobs) if prompt_logprobs else [None] * len(prompt.ids)
    ids += token_ids
    entries += logprobs
    return ids, entries


async def _stream(state: AppState, job: _Job) -> AsyncGenerator[dict[str, Any], None]:
    usage = job.usage_counter()
    offsets: dict[int, int] = {}  # choice index -> text offset of its next token
    async for p, output in stream_outputs(state, job.calls):
        usage.add(p, output)
        choice = _delta_choice(state, job, p, output, offsets)
        if choice is not None:
            running = usage.usage().model_dump() if job.body.continuous_usage else None
            yield _chunk(state, job, [choice], running)
    if job.body.include_usage:
        yield _chunk(state, job, [], usage.usage().model_dump())


def _hidden(state: AppState, job: _Job, ids: Sequence[int], num_prompt: int) -> list[bool]:
    """Which tokens have no text in the choice: special tokens of the echoed prompt (its text is the request's
    own), and generated ones when ``skip_special_tokens`` drops them."""
    special = state.texts.special_ids
    skip = job.params.skip_special_tokens
    return [t in special and (i < num_prompt or skip) for i, t in enumerate(ids)]


def _lead(state: AppState, prompt: Prompt, ids: Sequence[int], hidden: Sequence[bool]) -> int:
    """Leading spaces of the echoed prompt's first visible token that its text does not start with."""
    first = next((state.texts.text(t) for t, h in zip(ids, hidden) if not h), "")
    stripped = first.lstrip(" ")
    return len(first) - len(stripped) if not prompt.text.startswith(first) else 0


def _delta_choice(state: AppState, job: _Job, p: int, output: RequestOutput,
                  offsets: dict[int, int]) -> dict[str, Any] | None:
    index = p * job.n + output.index
    first = index not in offsets
    echo = job.body.echo and first
    new_ids, new_logprobs, new_text = ([], [], "") if job.echo_only else (
        output.new_token_ids, output.logprobs or [], output.new_text)
    text = (job.prompts[p].text if echo else "") + new_text
    logprobs = None
    if job.body.logprobs is not None:
        ids, entries = _logprob_entries(job.prompts[p] if echo else None, output.prompt_logprobs,
                                        new_ids, new_logprobs)
        hidden = _hidden(state, job, ids, len(job.prompts[p].ids) if echo else 0)
        lead = _lead(state, job.prompts[p], ids, hidden) if echo else 0
        logprobs, offsets[index] = completion_logprobs(state.texts, ids, entries, offsets.get(index, 0),
                                                       job.body.return_tokens_as_token_ids, hidden, lead)
    else:
        offsets[index] = offsets.get(index, 0) + len(text)
    if not text and not output.finished and not (logprobs and logprobs["tokens"]):
        return None
    reason = ("length" if job.echo_only else output.finish_reason) if output.finished else None
    stop_reason = None if job.echo_only or not output.finished else output.stop_reason
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": reason,
            "stop_reason": stop_reason}


def _chunk(state: AppState, job: _Job, choices: list[dict[str, Any]],
           usage: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"id": job.id, "object": "text_completion", "created": job.created,
            "model": state.settings.served_model_name, "choices": choices, "usage": usage}
