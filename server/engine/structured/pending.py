"""Requests whose output constraint is still compiling: they wait here, outside the scheduler, so the batch
keeps running while the grammar compiles on its worker thread."""

from __future__ import annotations

from concurrent.futures import FIRST_COMPLETED, Future, wait

import xgrammar as xgr

from server.engine.request import Request
from server.engine.structured.compiler import GrammarCompiler
from server.engine.structured.matcher import GrammarState


class CompilingRequests:
    """The samples of each constrained request, held until their grammar is ready."""

    def __init__(self, compiler: GrammarCompiler) -> None:
        self.compiler = compiler
        self._entries: list[tuple[Future[xgr.CompiledGrammar], list[Request]]] = []

    def __bool__(self) -> bool:
        return bool(self._entries)

    def __len__(self) -> int:
        return sum(len(children) for _, children in self._entries)

    def add(self, children: list[Request]) -> None:
        """Hold the samples of one request (same params) until ``params.structured`` is compiled."""
        spec = children[0].params.structured
        assert spec is not None
        self._entries.append((self.compiler.submit(spec), children))

    def pop_done(self) -> tuple[list[Request], list[tuple[Request, Exception]]]:
        """Samples whose grammar is ready (each with its own ``GrammarState``), and those whose compile failed."""
        ready: list[Request] = []
        failed: list[tuple[Request, Exception]] = []
        keep = []
        for future, children in self._entries:
            if not future.done():
                keep.append((future, children))
                continue
            error = future.exception()
            if error is not None and not isinstance(error, Exception):
                raise error  # KeyboardInterrupt and the like are not one request's failure
            for child in children:
                if error is None:
                    child.grammar = GrammarState(future.result())
                    ready.append(child)
                else:
                    failed.append((child, error))
        self._entries = keep
        return ready, failed

    def abort(self, request_id: str) -> list[Request]:
        """Drop a request's samples; returns them."""
        dropped = [c for _, children in self._entries for c in children if c.request_id == request_id]
        self._entries = [(f, c) for f, c in self._entries if c[0].request_id != request_id]
        return dropped

    def wait(self, timeout: float) -> None:
        """Block until one grammar is ready or ``timeout`` seconds passed (only when nothing else can run)."""
        if self._entries:
            wait([future for future, _ in self._entries], timeout=timeout, return_when=FIRST_COMPLETED)
