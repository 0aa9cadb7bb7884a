"""Asyncio front of the engine: one background thread runs the step loop; callers await output deltas.

The engine thread owns the ``LLMEngine``. Callers hand it commands (add, abort) through a thread-safe queue and
receive ``RequestOutput`` deltas through per-request asyncio queues fed with ``loop.call_soon_threadsafe``.
When a consumer is slower than the engine, the deltas waiting in its queue are merged before it sees them.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import AsyncGenerator, Callable, Sequence
from dataclasses import dataclass, field

from server.engine.llm_engine import EngineStats, LLMEngine
from server.engine.output_processor import OutputProcessor
from server.engine.request import RequestOutput
from server.engine.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


class EngineDeadError(RuntimeError):
    """The engine loop has stopped (crashed or shut down); no request can be served."""


class RequestFailedError(RuntimeError):
    """The engine failed this request (the API answers 500 or sends an error event)."""


class ServerShuttingDownError(RuntimeError):
    """The server's drain timeout ran out while this request was still running (the API answers 503)."""


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[RequestOutput | BaseException] = field(default_factory=asyncio.Queue)
    pending: int = 1  # samples not finished yet

    def put(self, item: RequestOutput | BaseException) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, item)


class AsyncEngine:
    """Thread-backed engine with an async ``generate``."""

    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self._commands: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._streams: dict[str, _Stream] = {}
        self._lock = threading.Lock()
        self._stopping = False
        self._dead: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="engine-loop", daemon=True)
        self._stats = engine.stats()

    def start(self) -> None:
        self._thread.start()

    @property
    def output_processor(self) -> OutputProcessor:
        """Where token ids become text (in-process here, on the engine thread)."""
        return self.engine.outputs

    @property
    def is_alive(self) -> bool:
        """True while the loop thread runs and is not shutting down."""
        return self._thread.is_alive() and not self._stopping and self._dead is None

    def stats(self) -> EngineStats:
        """Counters as of the last step (read without locking the engine)."""
        return self._stats

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
        self.engine.validate(prompt_ids, params)
        stream = _Stream(asyncio.get_running_loop(), pending=params.n)
        with self._lock:
            if request_id in self._streams:
                raise ValueError(f"duplicate request id {request_id!r}")
            self._streams[request_id] = stream
        if not self.is_alive:  # the loop died between the check above and the registration
            with self._lock:
                self._streams.pop(request_id, None)
            raise EngineDeadError("the engine is not running")
        self._submit(lambda: self._add(request_id, list(prompt_ids), params))
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
        """Abort a request; its blocks are freed by the engine thread right away."""
        self._submit(lambda: self.engine.abort(request_id))

    def fail_all(self, exc: BaseException) -> None:
        """End every request in flight with ``exc`` (each caller's iterator raises it and aborts its request)."""
        self._fail_all(exc)

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop the loop; requests still running fail with ``EngineDeadError``."""
        self._stopping = True
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _submit(self, command: Callable[[], None]) -> None:
        self._commands.put(command)
        self._wake.set()

    def _add(self, request_id: str, prompt_ids: list[int], params: SamplingParams) -> None:
        try:
            self.engine.add_request(request_id, prompt_ids, params)
        except Exception as exc:  # validated already; anything left is reported to the caller
            self._deliver_error(request_id, exc)

    def _run(self) -> None:
        try:
            while not self._stopping:
                self._drain_commands()
                self._stats = self.engine.stats()
                if not self.engine.has_unfinished():
                    self._wake.wait(timeout=1.0)
                    self._wake.clear()
                    continue
                outputs = self.engine.step()
                self._stats = self.engine.stats()
                self._dispatch(outputs)
        except BaseException as exc:  # the loop itself crashed: fail everyone, report unhealthy
            logger.exception("engine loop died")
            self._dead = exc
        finally:
            self._fail_all(EngineDeadError("the engine stopped"))

    def _drain_commands(self) -> None:
        while True:
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return
            command()

    def _dispatch(self, outputs: list[RequestOutput]) -> None:
        orphans = set()
        with self._lock:
            for output in outputs:
                stream = self._streams.get(output.request_id)
                if stream is not None:
                    stream.put(output)
                elif not output.finished:  # nobody listens any more
                    orphans.add(output.request_id)
        for request_id in orphans:  # runs on the engine thread, which owns the engine
            self.engine.abort(request_id)

    def _deliver_error(self, request_id: str, exc: BaseException) -> None:
        with self._lock:
            stream = self._streams.get(request_id)
        if stream is not None:
            stream.put(exc)

    def _fail_all(self, exc: BaseException) -> None:
        with self._lock:
            streams = list(self._streams.values())
        for stream in streams:
            stream.put(exc)


async def _next_batch(q: asyncio.Queue[RequestOutput | BaseException]) -> list[RequestOutput]:
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
