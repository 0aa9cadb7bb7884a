"""Async request streams over an engine that runs elsewhere (a thread or another process).

``StreamingEngine.generate`` registers a per-request asyncio queue, hands the request to the engine and yields
its deltas; the engine side calls ``deliver`` with each step's outputs (from any thread): one callback per
event loop and step, however many requests the step served. When a consumer is slower than the engine, the
deltas waiting in its queue are merged before it sees them.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from abc import ABC, abstractmethod
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass, field

from server.engine.request import RequestOutput
from server.engine.sampling_params import SamplingParams


class EngineDeadError(RuntimeError):
    """The engine loop has stopped (crashed or shut down); no request can be served."""


class RequestFailedError(RuntimeError):
    """The engine failed this request (the API answers 500 or sends an error event)."""


class ServerShuttingDownError(RuntimeError):
    """The server's drain timeout ran out while this request was still running (the API answers 503)."""


Item = RequestOutput | BaseException


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[Item] = field(default_factory=asyncio.Queue)
    pending: int = 1  # samples not finished yet


class StreamingEngine(ABC):
    """``generate`` / ``abort`` / ``fail_all`` for engines driven from another thread or process."""

    def __init__(self) -> None:
        self._streams: dict[str, _Stream] = {}
        self._lock = threading.Lock()

    @property
    @abstractmethod
    def is_alive(self) -> bool:
        """True while the engine runs and is not shutting down."""

    @abstractmethod
    def _submit_add(self, request_id: str, prompt_ids: list[int], params: SamplingParams) -> None:
        """Hand a registered request to the engine."""

    @abstractmethod
    def _submit_abort(self, request_id: str) -> None:
        """Tell the engine to drop a request and free its blocks."""

    @abstractmethod
    def _check(self, prompt_ids: Sequence[int], params: SamplingParams) -> None:
        """Reject a request before anything starts (raises)."""

    @property
    def num_unfinished(self) -> int:
        with self._lock:
            return len(self._streams)

    async def generate(
        self, prompt_ids: Sequence[int], params: SamplingParams, request_id: str
    ) -> AsyncGenerator[RequestOutput, None]:
        """Deltas of one request (all ``params.n`` samples) until every sample finished.

        Invalid requests raise before the first delta. Leaving the iterator early aborts the request.
        """
        if not self.is_alive:
            raise EngineDeadError("the engine is not running")
        self._check(prompt_ids, params)
        stream = _Stream(asyncio.get_running_loop(), pending=params.n)
        with self._lock:
            if request_id in self._streams:
                raise ValueError(f"duplicate request id {request_id!r}")
            self._streams[request_id] = stream
        if not self.is_alive:  # the engine died between the check above and the registration
            with self._lock:
                self._streams.pop(request_id, None)
            raise EngineDeadError("the engine is not running")
        self._submit_add(request_id, list(prompt_ids), params)
        finished = False
        try:
            while not finished:
                for output in await _next_batch(stream.queue):
                    if output.error is not None:
                        raise RequestFailedError(output.error)
                    if output.finished:
                        stream.pending -= 1
                        finished = stream.pending == 0
                    yield output
        finally:
            with self._lock:
                self._streams.pop(request_id, None)
            if not finished:
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        """Abort a request; the engine frees its blocks right away."""
        self._submit_abort(request_id)

    def fail_all(self, exc: BaseException) -> None:
        """End every request in flight with ``exc`` (each caller's iterator raises it and aborts its request)."""
        with self._lock:
            streams = list(self._streams.values())
        _put_all([(s, exc) for s in streams])

    def deliver(self, outputs: Sequence[RequestOutput]) -> set[str]:
        """Route one step's deltas to their streams; the ids of unfinished requests nobody listens to."""
        orphans: set[str] = set()
        routed: list[tuple[_Stream, Item]] = []
        with self._lock:
            for output in outputs:
                stream = self._streams.get(output.request_id)
                if stream is not None:
                    routed.append((stream, output))
                elif not output.finished:
                    orphans.add(output.request_id)
        _put_all(routed)
        return orphans

    def deliver_error(self, request_id: str, exc: BaseException) -> None:
        with self._lock:
            stream = self._streams.get(request_id)
        if stream is not None:
            _put_all([(stream, exc)])


def _put_all(routed: list[tuple[_Stream, Item]]) -> None:
    """Queue the items with one thread-safe callback per event loop."""
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[_Stream, Item]]] = {}
    for stream, item in routed:
        by_loop.setdefault(stream.loop, []).append((stream, item))
    for loop, items in by_loop.items():
        with contextlib.suppress(RuntimeError):  # a closed loop: nobody is left to read these
            loop.call_soon_threadsafe(_put_now, items)


def _put_now(items: list[tuple[_Stream, Item]]) -> None:
    for stream, item in items:
        stream.queue.put_nowait(item)


async def _next_batch(q: asyncio.Queue[Item]) -> list[RequestOutput]:
    """Wait for one delta, then take whatever else is queued and merge deltas of the same sample."""
    items = [await q.get()]
    while not q.empty():
        items.append(q.get_nowait())
    for item in items:
        if isinstance(item, BaseException):
            raise item
    return merge_outputs([i for i in items if isinstance(i, RequestOutput)])


def merge_outputs(outputs: list[RequestOutput]) -> list[RequestOutput]:
    """Fold consecutive deltas per sample index into one (tokens, text and logprobs concatenated).

    Errors come after every merged delta: the text a sample produced before it failed still reaches the
    client (a stream shows it, then the error event).
    """
    merged: dict[int, RequestOutput] = {}
    errors: list[RequestOutput] = []
    for out in outputs:
        if out.error is not None:
            errors.append(out)
            continue
        prev = merged.get(out.index)
        if prev is None:
            merged[out.index] = out
            continue
        prev.new_token_ids = prev.new_token_ids + out.new_token_ids
        prev.new_text += out.new_text
        if prev.logprobs is not None and out.logprobs is not None:
            prev.logprobs = prev.logprobs + out.logprobs
        prev.finished, prev.finish_reason, prev.stop_reason = out.finished, out.finish_reason, out.stop_reason
        prev.num_output_tokens = out.num_output_tokens
    return [*merged.values(), *errors]
