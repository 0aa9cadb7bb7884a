"""The API process's side of the multi-process engine: it owns tokenizer, detokenization and stop strings,
and talks to the engine-core process over two ZeroMQ sockets (``server.engine.multiproc.messages``).

A receiver thread reads each step's message, turns token ids into text deltas (``OutputProcessor``), tells the
core which samples ended here (stop strings), and routes the deltas to their streams. A watcher thread waits on
the core process: when it dies, every stream in flight gets ``EngineDeadError`` at once and ``is_alive`` turns
False (``/health`` answers 503).
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Sequence
from multiprocessing.connection import wait as wait_for
from pathlib import Path

import zmq

from model.tokenizer import Tokenizer
from server.engine.client import EngineClient
from server.engine.config import EngineConfig
from server.engine.core import EngineStats
from server.engine.multiproc.core_process import CoreProcessArgs, run_engine_core
from server.engine.multiproc.messages import (
    AbortRequests,
    AddRequest,
    CoreFailed,
    CoreInfo,
    CoreInput,
    FinishSamples,
    Shutdown,
    StepOutputs,
    decode_output,
    encode_input,
)
from server.engine.output_processor import OutputProcessor
from server.engine.sampling_params import SamplingParams
from server.engine.streams import EngineDeadError
from server.engine.structured.compiler import GrammarCompiler

logger = logging.getLogger(__name__)
_RECV_POLL_MS = 100
_IDLE_STATS = EngineStats(0, 0, 0.0, 0, 0, 0)


class CoreStartupError(RuntimeError):
    """The engine-core process could not load the model (its message says why)."""


class MultiprocEngine(EngineClient):
    """The engine core in a child process; ``start`` returns once the model is loaded there."""

    def __init__(self, config: EngineConfig, cpu_threads: int | None = None, log_level: str = "info",
                 startup_timeout: float = 600.0) -> None:
        super().__init__()
        self.config = config
        self.tokenizer = Tokenizer.from_dir(config.model)
        self.output_processor = OutputProcessor(self.tokenizer)
        self._cpu_threads = cpu_threads or os.cpu_count() or 1
        self._log_level = log_level
        self._startup_timeout = startup_timeout
        self._dir = Path(tempfile.mkdtemp(prefix="jetmoe-core-"))
        self._context = zmq.Context()
        self._commands = self._context.socket(zmq.PUSH)
        self._commands.setsockopt(zmq.SNDHWM, 0)  # never block the event loop on a busy core
        self._commands.bind(f"ipc://{self._dir / 'commands'}")
        self._results = self._context.socket(zmq.PULL)
        self._results.bind(f"ipc://{self._dir / 'results'}")
        self._send_lock = threading.Lock()
        self._process: multiprocessing.process.BaseProcess | None = None
        self._info: CoreInfo | None = None
        self._stats = _IDLE_STATS
        self._n: dict[str, int] = {}  # samples per request the output processor follows
        self._stopping = False
        self._dead: str | None = None
        self._threads: list[threading.Thread] = []

    @property
    def process(self) -> multiprocessing.process.BaseProcess:
        """The engine-core process (after ``start``)."""
        assert self._process is not None, "start() first"
        return self._process

    @property
    def info(self) -> CoreInfo:
        assert self._info is not None, "start() first"
        return self._info

    @property
    def max_model_len(self) -> int:
        return self.info.max_model_len

    @property
    def num_kv_blocks(self) -> int:
        return self.info.num_kv_blocks

    @property
    def vocab_size(self) -> int:
        return self.info.vocab_size

    def describe(self) -> str:
        return f"{self.info.device} ({self.info.dtype}; kernels {self.info.kernels}) in process {self.process.pid}"

    @property
    def is_alive(self) -> bool:
        return (self._process is not None and self._dead is None and not self._stopping
                and self._process.is_alive())

    def stats(self) -> EngineStats:
        return self._stats

    def start(self) -> None:
        """Spawn the core and wait for its model to load; ``CoreStartupError`` when it cannot."""
        args = CoreProcessArgs(self.config, f"ipc://{self._dir / 'commands'}", f"ipc://{self._dir / 'results'}",
                               self._cpu_threads, self._log_level, os.getpid(),
                               kernel_death_signal=threading.current_thread() is threading.main_thread())
        self._process = multiprocessing.get_context("spawn").Process(
            target=run_engine_core, args=(args,), name="jetmoe-engine-core", daemon=True)
        self._process.start()
        try:
            self._info = self._wait_ready()
        except BaseException:
            self._kill()
            self._cleanup()
            raise
        self.grammars = GrammarCompiler(self.tokenizer.hf, self._info.vocab_size)
        for target, name in ((self._receive, "engine-results"), (self._watch, "engine-watch")):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop the core (it finishes nothing more), then the threads; streams in flight get EngineDeadError."""
        if self._stopping:
            return
        self._stopping = True
        if self._process is not None and self._process.is_alive():
            self._send(Shutdown())
            self._process.join(timeout)
            self._kill()
        for thread in self._threads:
            thread.join(timeout)
        self.fail_all(EngineDeadError("the engine stopped"))
        self._cleanup()

    def _wait_ready(self) -> CoreInfo:
        deadline = time.monotonic() + self._startup_timeout
        while time.monotonic() < deadline:
            if self._results.poll(_RECV_POLL_MS):
                message = decode_output(self._results.recv())
                if isinstance(message, CoreFailed):
                    raise CoreStartupError(message.message)
                if isinstance(message, CoreInfo):
                    return message
            elif not self.process.is_alive():
                raise CoreStartupError(f"the engine-core process exited with status {self.process.exitcode}")
        raise CoreStartupError(f"the engine core did not load the model within {self._startup_timeout:.0f} s")

    def _check(self, prompt_ids: Sequence[int], params: SamplingParams) -> None:
        """Nothing: requests reach ``generate`` validated at the front door (``EngineClient.validate``)."""

    def _submit_add(self, request_id: str, prompt_ids: list[int], params: SamplingParams) -> None:
        with self._lock:  # the receiver thread reads the processor under the same lock
            self.output_processor.add_request(request_id, prompt_ids, params)
            self._n[request_id] = params.n
        self._send(AddRequest(request_id, prompt_ids, params, time.monotonic()))

    def _submit_abort(self, request_id: str) -> None:
        with self._lock:
            self.output_processor.abort(request_id, self._n.pop(request_id, 0))
        self._send(AbortRequests([request_id]))

    def _send(self, message: CoreInput) -> None:
        with self._send_lock:
            if self._commands.closed:
                return
            try:
                self._commands.send(encode_input(message), zmq.NOBLOCK)
            except zmq.Again:  # no core to take it (it died): the watcher fails every request
                logger.debug("engine core gone: %s dropped", type(message).__name__)

    def _receive(self) -> None:
        """Receiver thread: one message per core step -> text deltas -> streams."""
        while not self._stopping and self._dead is None:
            if not self._results.poll(_RECV_POLL_MS):
                continue
            message = decode_output(self._results.recv())
            if isinstance(message, StepOutputs):
                self._stats = message.stats
                self._handle(message)

    def _handle(self, message: StepOutputs) -> None:
        with self._lock:
            processed = self.output_processor.process(message.outputs)
            for output in processed.outputs:
                if output.finished and output.request_id in self._n:
                    self._n[output.request_id] -= 1
                    if self._n[output.request_id] <= 0:
                        del self._n[output.request_id]
        if processed.finished_here:
            self._send(FinishSamples([(rid, index, reason) for (rid, index), reason in processed.finished_here]))
        orphans = self.deliver(processed.outputs)
        if orphans:
            self._send(AbortRequests(sorted(orphans)))

    def _watch(self) -> None:
        """Watcher thread: wake when the core process ends; unless we stopped it, fail everything."""
        wait_for([self.process.sentinel])
        if self._stopping:
            return
        self._dead = f"the engine-core process died (exit status {self.process.exitcode})"
        logger.error("%s; the server answers 503 until it is restarted", self._dead)
        self.fail_all(EngineDeadError(self._dead))

    def _kill(self) -> None:
        if self._process is not None and self._process.is_alive():
            self._process.kill()
            self._process.join(5)

    def _cleanup(self) -> None:
        with self._send_lock:
            self._commands.close(linger=0)
        self._results.close(linger=0)
        self._context.term()
        shutil.rmtree(self._dir, ignore_errors=True)
