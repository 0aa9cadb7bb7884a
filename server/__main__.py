"""Entry point: ``python -m server`` / ``jetmoe-serve`` (see ``server.cli`` for the flags)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

from server.cli import fail, parse_args

if TYPE_CHECKING:
    from fastapi import FastAPI

    from server.engine.client import EngineClient
    from server.engine.config import EngineConfig

logger = logging.getLogger("server")


def main(argv: Sequence[str] | None = None) -> int:
    """Parse flags, bind the port, load the model, serve until SIGTERM/SIGINT; the exit status."""
    try:
        args, settings, engine_config = parse_args(argv)
    except SystemExit as exc:  # --help (0) or a bad flag (2, reported already)
        return exc.code if isinstance(exc.code, int) else 2
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from server.api.auth import RedactQuerySecrets

    logging.getLogger("uvicorn.access").addFilter(RedactQuerySecrets())
    try:
        sock = bind_socket(args.host, args.port)
    except OSError as exc:
        return fail(f"cannot listen on {args.host}:{args.port}: {exc.strerror or exc}")
    with contextlib.closing(sock):
        if not Path(engine_config.model).is_dir():
            return fail(f"model directory {engine_config.model!r} does not exist")
        try:
            engine = _load_engine(engine_config, args)
        except Exception as exc:  # any loading problem is the user's checkpoint or flags: one line, no trace
            return fail(f"cannot load the model from {engine_config.model!r}: {exc}")
        from server.api import create_app

        app = create_app(engine, settings)
        host, port = sock.getsockname()[:2]
        logger.info("serving %s as %r on %s, %d KV blocks of %d tokens, max_model_len %d, at http://%s:%d",
                    engine_config.model, settings.served_model_name, engine.describe(), engine.num_kv_blocks,
                    engine_config.block_size, engine.max_model_len, _url_host(host), port)
        try:
            _serve(app, sock, args)
        finally:
            engine.shutdown()  # idempotent: the app's lifespan normally stopped it already
    return 0


def _cpu_threads(requested: int | None, in_process: bool) -> int:
    """Intra-op threads for CPU kernels (no effect on CUDA kernels). The engine-core process gets every core by
    default. In-process, one core is left to the event loop, which serialises and streams every token."""
    cores = os.cpu_count() or 1
    return requested or (max(1, cores - 1) if in_process else cores)


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening socket on (host, port): a busy port fails here, before the model is loaded."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(2048)
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


def _load_engine(config: EngineConfig, args: argparse.Namespace) -> EngineClient:
    """The engine core in its own process (default) or on a thread here (``--engine-in-process``)."""
    # NOTE: torch is imported here, not at module level, so that --help and flag errors stay fast.
    import torch

    threads = _cpu_threads(args.cpu_threads, args.engine_in_process)
    engine: EngineClient
    if args.engine_in_process:
        from server.engine.async_engine import AsyncEngine
        from server.engine.llm_engine import LLMEngine

        torch.set_num_threads(threads)
        engine = AsyncEngine(LLMEngine.from_config(config))
    else:
        from server.engine.multiproc.client import MultiprocEngine

        torch.set_num_threads(1)  # the API process: tokenization, detokenization, HTTP
        engine = MultiprocEngine(config, cpu_threads=threads, log_level=args.log_level)
    engine.start()
    return engine


def _serve(app: FastAPI, sock: socket.socket, args: argparse.Namespace) -> None:
    """uvicorn on ``sock`` with the connection guard; SIGTERM drains (``server.api.app.drain``) while the socket
    keeps answering (503), then the server stops; a second signal stops it at once."""
    import uvicorn

    from server.api.app import drain
    from server.api.connections import ConnectionLimits, guarded_protocol

    class DrainingServer(uvicorn.Server):
        drain_requested = False
        drain_task: asyncio.Task[None] | None = None

        def handle_exit(self, sig: int, frame: FrameType | None) -> None:
            if self.drain_requested:
                super().handle_exit(sig, frame)
            self.drain_requested = True

        async def on_tick(self, counter: int) -> bool:
            if self.drain_requested and self.drain_task is None:
                self.drain_task = asyncio.create_task(drain(app.state.api))
            if self.drain_task is not None and self.drain_task.done():
                return True
            return await super().on_tick(counter)

    limits = ConnectionLimits.for_process(args.header_timeout)
    logger.info("connections: %d served fully, %d for probes; %g s to send a request head, %d s keep-alive",
                limits.soft_cap, limits.hard_cap, limits.header_timeout, args.keep_alive_timeout)
    config = uvicorn.Config(app, log_config=None, log_level=args.log_level, lifespan="on",
                            http=guarded_protocol(limits), timeout_keep_alive=args.keep_alive_timeout,
                            timeout_graceful_shutdown=10)
    with _absorb_reraised_signals():
        DrainingServer(config).run(sockets=[sock])


@contextlib.contextmanager
def _absorb_reraised_signals() -> Iterator[None]:
    """uvicorn re-raises SIGTERM/SIGINT after its graceful shutdown; absorb them so that we exit 0."""
    def ignore(sig: int, frame: FrameType | None) -> None:
        logger.debug("signal %d after shutdown ignored", sig)

    if threading.current_thread() is not threading.main_thread():  # uvicorn handles no signals there
        yield
        return
    previous = {sig: signal.signal(sig, ignore) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


if __name__ == "__main__":
    sys.exit(main())
