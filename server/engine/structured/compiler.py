"""Grammar compilation with xgrammar, off the engine's step loop, once per distinct spec.

xgrammar was chosen over llguidance by measurement on this project's tokenizer
(``benchmarks/compare_grammar_libraries.py``): llguidance compiles small schemas faster (0.5-0.7 ms against
1.3-2.3 ms), but compiling happens once per distinct schema and off the step loop, while the per-step cost is
paid on every token: xgrammar fills a row's bitmask in 3-4 us (llguidance 9-30 us) and applies a ``[64, V]``
bitmask in 0.015 ms (llguidance 0.06-0.12 ms); its wheel also ships the CUDA bitmask kernel.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import xgrammar as xgr

from server.engine.structured.spec import StructuredOutputError, StructuredSpec

logger = logging.getLogger(__name__)

DEFAULT_CACHE_SIZE = 512
_LOCATION = re.compile(r"^\[[^\]]*\]\s*\S+:\d+:\s*")


@dataclass(frozen=True)
class CompileRecord:
    """How long one spec took to compile (first use only: later uses hit the cache)."""

    kind: str
    seconds: float


def _escape_literal(text: str) -> str:
    """``text`` as an EBNF string literal (xgrammar takes JSON-style escapes)."""
    out = []
    for char in text:
        if char in '"\\':
            out.append("\\" + char)
        elif ord(char) < 0x20 or ord(char) == 0x7F:
            out.append(f"\\u{ord(char):04x}")
        else:
            out.append(char)
    return '"' + "".join(out) + '"'


class GrammarCompiler:
    """Compiles specs to xgrammar grammars on a worker thread; caches the futures (LRU, ``cache_size``).

    Two requests with the same spec share one compilation, even while it is still running. The tokenizer
    tables are built on the worker thread at first use, so a server that never sees a constrained request
    never pays for them.
    """

    def __init__(self, hf_tokenizer: Any, vocab_size: int, cache_size: int = DEFAULT_CACHE_SIZE,
                 max_threads: int = 1) -> None:
        self._hf = hf_tokenizer
        self.vocab_size = vocab_size
        self._cache_size = cache_size
        self._max_threads = max_threads
        self._cache: OrderedDict[tuple[str, str], Future[xgr.CompiledGrammar]] = OrderedDict()
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="grammar-compile")
        self._compiler: xgr.GrammarCompiler | None = None
        self._info: xgr.TokenizerInfo | None = None
        self.records: list[CompileRecord] = []

    def submit(self, spec: StructuredSpec) -> Future[xgr.CompiledGrammar]:
        """The compiled grammar of ``spec`` as a future (done at once on a cache hit)."""
        with self._lock:
            future = self._cache.get(spec.key)
            if future is not None:
                self._cache.move_to_end(spec.key)
                return future
            future = self._pool.submit(self._compile, spec)
            self._cache[spec.key] = future
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        future.add_done_callback(lambda f: self._forget_failure(spec, f))
        return future

    def compile(self, spec: StructuredSpec, timeout: float | None = None) -> xgr.CompiledGrammar:
        """Block until ``spec`` is compiled; raises ``StructuredOutputError`` for a spec that cannot be."""
        return self.submit(spec).result(timeout)

    @property
    def tokenizer_info(self) -> xgr.TokenizerInfo:
        """The vocabulary as the grammar library sees it (built at first use)."""
        self._get_compiler()
        assert self._info is not None
        return self._info

    def _forget_failure(self, spec: StructuredSpec, future: Future[xgr.CompiledGrammar]) -> None:
        if future.exception() is not None:  # a bad spec is cheap to reject again; keep the cache for good ones
            with self._lock:
                if self._cache.get(spec.key) is future:
                    del self._cache[spec.key]

    def _get_compiler(self) -> xgr.GrammarCompiler:
        with self._lock:
            if self._compiler is None:
                self._info = xgr.TokenizerInfo.from_huggingface(self._hf, vocab_size=self.vocab_size)
                self._compiler = xgr.GrammarCompiler(self._info, max_threads=self._max_threads,
                                                     cache_enabled=False)
            return self._compiler

    def _compile(self, spec: StructuredSpec) -> xgr.CompiledGrammar:
        compiler = self._get_compiler()
        started = time.perf_counter()
        try:
            grammar = _compile_spec(compiler, spec)
        except StructuredOutputError:
            raise
        except Exception as exc:  # xgrammar raises RuntimeError (and others) with the parser's message
            raise StructuredOutputError(f"invalid {_WHAT[spec.kind]}: {_clean(exc)}", spec.param) from exc
        seconds = time.perf_counter() - started
        self.records.append(CompileRecord(spec.kind, seconds))
        logger.debug("compiled a %s grammar in %.1f ms", spec.kind, seconds * 1e3)
        return grammar


_WHAT = {"json": "JSON schema", "json_object": "JSON object grammar", "regex": "regex", "choice": "choice",
         "grammar": "grammar", "structural_tag": "tool definitions"}


def _compile_spec(compiler: xgr.GrammarCompiler, spec: StructuredSpec) -> xgr.CompiledGrammar:
    # NOTE: no free whitespace in JSON (any_whitespace=False): a weak model would otherwise spend its whole
    # budget on spaces and newlines and never close the document.
    if spec.kind == "json":
        return compiler.compile_grammar(json_grammar(spec.value))
    if spec.kind == "json_object":
        return compiler.compile_grammar(json_grammar('{"type": "object"}'))
    if spec.kind == "regex":
        return compiler.compile_regex(spec.value)
    if spec.kind == "choice":
        return compiler.compile_grammar("root ::= " + " | ".join(_escape_literal(c) for c in spec.loads()))
    if spec.kind == "grammar":
        return compiler.compile_grammar(spec.value)
    return compiler.compile_structural_tag(json.dumps(_strict_json_contents(spec.loads())))


# xgrammar writes the characters of a length-bounded string as [^"\\\r\n], which lets control characters
# (invalid in JSON strings) through; they get the class of its unbounded strings.
_LOOSE_STRING_CHAR = r'[^\"\\\r\n]'
_JSON_STRING_CHAR = r'[^\0-\x1f\"\\]'


def json_grammar(schema: str) -> str:
    """EBNF of the whitespace-free JSON documents valid against ``schema`` (JSON text)."""
    grammar = str(xgr.Grammar.from_json_schema(schema, any_whitespace=False, strict_mode=True))
    return grammar.replace(_LOOSE_STRING_CHAR, _JSON_STRING_CHAR)


def _strict_json_contents(node: Any) -> Any:
    """A structural tag with each JSON-schema content replaced by its whitespace-free grammar (xgrammar's
    structural tags allow whitespace between JSON tokens; this server's JSON outputs allow none)."""
    if isinstance(node, list):
        return [_strict_json_contents(item) for item in node]
    if not isinstance(node, dict):
        return node
    if node.get("type") == "json_schema" and "json_schema" in node:
        return {"type": "grammar", "grammar": json_grammar(json.dumps(node["json_schema"]))}
    return {key: _strict_json_contents(value) for key, value in node.items()}


def _clean(exc: BaseException) -> str:
    """xgrammar's message without its timestamp and C++ source location."""
    text = _LOCATION.sub("", str(exc).strip())
    return text.splitlines()[0] if text else type(exc).__name__
