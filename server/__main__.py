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

import torch

from server.cli import fail, parse_args

if TYPE_CHECKING:
    from fastapi import FastAPI

    from server.engine.async_engine import AsyncEngine
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
        _set_cpu_threads(args.cpu_threads)
        try:
            engine = _load_engine(engine_config)
        except Exception as exc:  # any loading problem is the user's checkpoint or flags: one line, no trace
            return fail(f"cannot load the model from {engine_config.model!r}: {exc}")
        from server.api import create_app

        app = create_app(engine, settings)
        host, port = sock.getsockname()[:2]
        llm = engine.engine
        weight = llm.model.output_weight()
        logger.info("serving %s as %r on %s (%s), %d KV blocks of %d tokens, max_model_len %d, at http://%s:%d",
                    engine_config.model, settings.served_model_name, weight.device, str(weight.dtype)[6:],
                    llm.num_kv_blocks, llm.config.block_size, llm.max_model_len, _url_host(host), port)
        _serve(app, sock, args)
    return 0


def _set_cpu_threads(requested: int | None) -> None:
    """Intra-op threads for CPU kernels. By default one core is left free: the event loop serialises and
    streams every token, and an OpenMP pool spinning on all cores starves it (measured: 1.6x the served
    throughput on 2 cores with 1 thread instead of 2). No effect on CUDA kernels."""
    torch.set_num_threads(requested or max(1, (os.cpu_count() or 1) - 1))


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


def _load_engine(config: EngineConfig) -> AsyncEngine:
    # NOTE: torch is imported here, not at module level, so that --help and flag errors stay fast.
    from server.engine.async_engine import AsyncEngine
    from server.engine.llm_engine import LLMEngine

    engine = AsyncEngine(LLMEngine.from_config(config))
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
