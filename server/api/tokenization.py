"""Tokenizing request text off the event loop, after a length check that needs no tokenizer.

A token covers at most ``Tokenizer.longest_piece_chars`` characters, so a text longer than ``max_model_len``
times that can never fit the context: it is a 400 at once, before megabytes of it are tokenized (with
``truncate_prompt_tokens`` the text may be longer, since only its last tokens are kept). What is tokenized runs
in a worker thread, as does rendering chat messages and serializing a large answer: the event loop keeps
answering ``/health`` and streaming tokens meanwhile.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from fastapi.responses import JSONResponse

from server.api.errors import APIError
from server.api.state import AppState

T = TypeVar("T")


def max_text_chars(state: AppState) -> int:
    """The most characters a text that fits the context can have."""
    return state.max_model_len * state.engine.tokenizer.longest_piece_chars


def check_text_length(state: AppState, chars: int, param: str) -> None:
    """400 (``context_length_exceeded``) for ``chars`` characters that cannot fit ``max_model_len`` tokens."""
    limit = max_text_chars(state)
    if chars > limit:
        raise APIError(400, f"This model's maximum context length is {state.max_model_len} tokens; a text of "
                       f"{chars} characters is longer than any that fits ({limit} at most).",
                       param=param, code="context_length_exceeded")


async def off_loop(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """``fn(*args, **kwargs)`` in a worker thread."""
    return await asyncio.to_thread(fn, *args, **kwargs)


async def encode_texts(state: AppState, texts: Sequence[str], check_length: bool = True,
                       add_special_tokens: bool = True) -> list[list[int]]:
    """Token ids of each text, tokenized off the loop (after the length check, unless ``check_length`` is off)."""
    if check_length:
        for text in texts:
            check_text_length(state, len(text), "prompt")
    tokenizer = state.engine.tokenizer
    return await off_loop(lambda: [tokenizer.encode(t, add_special_tokens=add_special_tokens) for t in texts])


async def json_response(build: Callable[[], Any]) -> JSONResponse:
    """A JSON response whose body (``build()``, a pydantic model) is built and serialized off the loop."""
    return await off_loop(lambda: JSONResponse(build().model_dump()))
