"""The engine-core process: loads the model, then runs a busy loop of commands and steps.

It takes commands from the API process (PULL) and sends one message per step back (PUSH). It ignores SIGINT and
SIGTERM (the API process drains, then tells it to stop) and exits when the API process is gone: the kernel
kills it when its parent dies (``PR_SET_PDEATHSIG`` on Linux), and the loop also checks its parent between
steps.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys
from dataclasses import dataclass

import zmq

from server.engine.config import EngineConfig
from server.engine.core import EngineCore
from server.engine.multiproc.messages import (
    AbortRequests,
    AddRequest,
    CoreFailed,
    CoreInfo,
    FinishSamples,
    Shutdown,
    StepOutputs,
    decode_input,
    encode_output,
)
from server.engine.request import CoreOutput

logger = logging.getLogger(__name__)
_IDLE_POLL_MS = 200  # how often an idle core looks at its parent


@dataclass(frozen=True)
class CoreProcessArgs:
    """Everything the core process needs; pickled into it at spawn."""

    config: EngineConfig
    input_address: str
    output_address: str
    cpu_threads: int
    log_level: str
    parent_pid: int
    # PR_SET_PDEATHSIG follows the spawning *thread*: only a main-thread spawn may use it (else the parent check)
    kernel_death_signal: bool = True


def run_engine_core(args: CoreProcessArgs) -> None:
    """Process entry point (``multiprocessing`` spawn target)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if args.kernel_death_signal:
        _die_with_parent()
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s core %(name)s: %(message)s")
    import torch

    torch.set_num_threads(args.cpu_threads)
    context = zmq.Context()
    commands = context.socket(zmq.PULL)
    commands.connect(args.input_address)
    results = context.socket(zmq.PUSH)
    results.connect(args.output_address)
    try:
        core = _load(args.config)
    except Exception as exc:  # reported to the API process, which prints it and exits
        results.send(encode_output(CoreFailed(f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__)))
        results.close(linger=2000)
        return
    results.send(encode_output(_info(core)))
    try:
        _CoreLoop(core, commands, results, args.parent_pid).run()
    finally:
        commands.close(linger=0)
        results.close(linger=1000)
        context.term()


def _load(config: EngineConfig) -> EngineCore:
    from server.engine.llm_engine import load_engine_core

    return load_engine_core(config)


def _info(core: EngineCore) -> CoreInfo:
    weight = core.model.output_weight()
    return CoreInfo(core.max_model_len, core.num_kv_blocks, core.model.config.vocab_size, str(weight.device),
                    str(weight.dtype).removeprefix("torch."), core.model.kernels.describe())


class _CoreLoop:
    def __init__(self, core: EngineCore, commands: zmq.Socket, results: zmq.Socket, parent_pid: int) -> None:
        self.core = core
        self.commands = commands
        self.results = results
        self.parent_pid = parent_pid

    def run(self) -> None:
        while os.getppid() == self.parent_pid:
            busy = self.core.has_unfinished()
            handled = 0
            if self.commands.poll(0 if busy else _IDLE_POLL_MS):
                handled = self._drain()
                if handled < 0:
                    return
            if self.core.has_unfinished():
                outputs = self.core.step()
                self.results.send(encode_output(StepOutputs(outputs, self.core.stats())), copy=False)
            elif handled:  # aborts change the counters: report them even when no step runs
                self.results.send(encode_output(StepOutputs([], self.core.stats())))
        logger.warning("the API process is gone: the engine core exits")

    def _drain(self) -> int:
        """Apply every queued command; how many, or -1 on shutdown."""
        handled = 0
        while True:
            try:
                data = self.commands.recv(zmq.NOBLOCK)
            except zmq.Again:
                return handled
            message = decode_input(data)
            handled += 1
            if isinstance(message, Shutdown):
                return -1
            try:
                self._apply(message)
            except Exception as exc:  # one bad command fails its request, never the loop
                logger.exception("engine command failed")
                if isinstance(message, AddRequest):
                    self._fail_request(message, exc)

    def _apply(self, message: AddRequest | AbortRequests | FinishSamples) -> None:
        if isinstance(message, AddRequest):
            self.core.add_request(message.request_id, message.prompt_ids, message.params, message.arrival_time)
        elif isinstance(message, AbortRequests):
            for request_id in message.request_ids:
                self.core.abort(request_id)
        else:
            for request_id, index, reason in message.samples:
                self.core.finish_sample(request_id, index, reason)


    def _fail_request(self, message: AddRequest, exc: Exception) -> None:
        error = f"{type(exc).__name__}: {exc}"
        failed = [CoreOutput(message.request_id, i, [], "error", error=error) for i in range(message.params.n)]
        self.results.send(encode_output(StepOutputs(failed, self.core.stats())))


def _die_with_parent() -> None:
    """Ask the kernel to kill this process when its parent dies (Linux only; elsewhere the loop's check)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        logger.debug("prctl is not available; the core watches its parent instead")
