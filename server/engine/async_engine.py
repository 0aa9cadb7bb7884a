"""The engine core on a background thread of this process; callers await output deltas.

The engine thread owns the ``LLMEngine``. Callers hand it commands (add, abort) through a thread-safe queue and
receive ``RequestOutput`` deltas through per-request asyncio queues (``server.engine.streams``). The server runs
the core in its own process instead (``server.engine.multiproc``); this one serves tests and library users.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Sequence

from server.engine.client import EngineClient
from server.engine.core import EngineStats
from server.engine.llm_engine import LLMEngine
from server.engine.sampling_params import SamplingParams
from server.engine.streams import (
    EngineDeadError,
    RequestFailedError,
    ServerShuttingDownError,
    merge_outputs,
)

__all__ = ["AsyncEngine", "EngineDeadError", "RequestFailedError", "ServerShuttingDownError", "merge_outputs"]
logger = logging.getLogger(__name__)


class AsyncEngine(EngineClient):
    """Thread-backed engine with an async ``generate``."""

    def __init__(self, engine: LLMEngine) -> None:
        super().__init__()
        self.engine = engine
        self.config = engine.config
        self.tokenizer = engine.tokenizer
        self.grammars = engine.grammars
        self.output_processor = engine.outputs
        self._commands: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._stopping = False
        self._dead: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="engine-loop", daemon=True)
        self._stats = engine.stats()

    def start(self) -> None:
        self._thread.start()

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    @property
    def num_kv_blocks(self) -> int:
        return self.engine.num_kv_blocks

    @property
    def vocab_size(self) -> int:
        return self.engine.vocab_size

    def describe(self) -> str:
        weight = self.engine.model.output_weight()
        return f"{weight.device} ({str(weight.dtype).removeprefix('torch.')})"

    @property
    def is_alive(self) -> bool:
        """True while the loop thread runs and is not shutting down."""
        return self._thread.is_alive() and not self._stopping and self._dead is None

    def stats(self) -> EngineStats:
        """Counters as of the last step (read without locking the engine)."""
        return self._stats

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop the loop; requests still running fail with ``EngineDeadError``."""
        self._stopping = True
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _check(self, prompt_ids: Sequence[int], params: SamplingParams) -> None:
        self.engine.validate(prompt_ids, params)

    def _submit_add(self, request_id: str, prompt_ids: list[int], params: SamplingParams) -> None:
        self._submit(lambda: self._add(request_id, prompt_ids, params))

    def _submit_abort(self, request_id: str) -> None:
        self._submit(lambda: self.engine.abort(request_id))

    def _submit(self, command: Callable[[], None]) -> None:
        self._commands.put(command)
        self._wake.set()

    def _add(self, request_id: str, prompt_ids: list[int], params: SamplingParams) -> None:
        try:
            self.engine.add_request(request_id, prompt_ids, params)
        except Exception as exc:  # validated already; anything left is reported to the caller
            self.deliver_error(request_id, exc)

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
                for request_id in self.deliver(outputs):  # nobody listens any more
                    self.engine.abort(request_id)
        except BaseException as exc:  # the loop itself crashed: fail everyone, report unhealthy
            logger.exception("engine loop died")
            self._dead = exc
        finally:
            self.fail_all(EngineDeadError("the engine stopped"))

    def _drain_commands(self) -> None:
        while True:
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return
            command()
