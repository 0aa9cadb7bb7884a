"""Command-line flags of ``jetmoe-serve``; every flag can also be set as ``JETMOE_<FLAG_NAME>``."""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NoReturn

from model.bundled import BUNDLED_MODEL_DIR
from server.api.chat_template import load_chat_template
from server.api.generation_defaults import OFF as GENERATION_CONFIG_OFF
from server.api.settings import ServerSettings
from server.engine.config import EngineConfig
from server.engine.spec import SpeculativeConfig

PROG = "jetmoe-serve"
ENV_PREFIX = "JETMOE_"
# Served when --model is not given: the small JetMoe trained on Python sources and shipped in the package.
DEFAULT_MODEL: str | None = str(BUNDLED_MODEL_DIR)
DTYPES = ("auto", "float32", "bfloat16", "float16", "fp32", "bf16", "fp16", "half")
LOG_LEVELS = ("critical", "error", "warning", "info", "debug")
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b?)\s*$", re.IGNORECASE)
_DEVICE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        """One line on stderr and exit status 2 (argparse's usage block is left to --help)."""
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def env_name(flag: str) -> str:
    return ENV_PREFIX + flag.lstrip("-").replace("-", "_").upper()


def build_parser(environ: Mapping[str, str] | None = None) -> argparse.ArgumentParser:
    """The parser; defaults come from ``environ`` (the process environment by default)."""
    env = os.environ if environ is None else environ
    parser = _Parser(prog=PROG, description="OpenAI-compatible inference server for JetMoe models.",
                     epilog="Every flag can also be given as an environment variable, shown in brackets; "
                            "a flag on the command line wins.")

    def add(flag: str, help: str, default: Any = None, type: Callable[[str], Any] = str, **kw: Any) -> None:
        name = env_name(flag)
        value = env.get(name, default)
        shown = "" if default is None or "api-key" in flag else f" (default: {default})"
        if type is _positive:
            kw.setdefault("metavar", "N")
        parser.add_argument(flag, default=value, type=type, help=f"{help}{shown} [{name}]", **kw)

    add("--model", "checkpoint directory (config.json, safetensors, tokenizer)", DEFAULT_MODEL, metavar="DIR")
    add("--host", "address to listen on", "127.0.0.1")
    add("--port", "port to listen on (0: any free port)", "8000", _port)
    add("--served-model-name", "model name clients send (default: the directory name)", metavar="NAME")
    add("--device", "auto, cpu, cuda or cuda:N (auto: cuda when available)", "auto", _device)
    add("--dtype", f"weight dtype: {', '.join(DTYPES[:4])} (auto: bfloat16 on cuda, float32 on cpu)",
        "auto", _dtype)
    add("--max-model-len", "longest prompt + completion in tokens (default: the model's limit)", type=_positive)
    add("--block-size", "tokens per KV cache block", "16", _positive)
    add("--num-kv-blocks", "KV cache blocks (default: sized from --kv-cache-memory or free GPU memory)",
        type=_positive)
    add("--kv-cache-memory", "KV cache size, e.g. 4GiB or 512MB (default: 1GiB on cpu; on cuda what "
        "--gpu-memory-utilization leaves after the weights and the profiled activation peak)", type=_size,
        metavar="SIZE")
    add("--gpu-memory-utilization", "fraction of the GPU's total memory this server may use (weights, "
        "activations and KV cache)", "0.9", _fraction, metavar="FRACTION")
    add("--enforce-eager", "run every step eagerly: no CUDA graphs for decode steps (true/false)", "false",
        _bool, metavar="BOOL", nargs="?", const=True)
    add("--attention-backend", "auto, torch or triton (auto: the Triton kernels on cuda, the PyTorch "
        "reference elsewhere)", "auto", _backend, metavar="NAME")
    add("--max-num-seqs", "sequences in one batch at most", "64", _positive)
    add("--max-num-batched-tokens", "tokens computed in one engine step at most (default: 2048 on CUDA, 256 on "
        "CPU, where smaller steps keep streams moving while long prompts arrive)", None, _positive)
    add("--max-queued-requests", "answer 429 when this many sequences (prompts x n) wait, 400 to a request with "
        "more (default: no limit)", type=_positive)
    add("--max-response-entries", "answer 400 to a request whose answer would hold more token entries (tokens x "
        "samples x (1 + logprobs))", "2000000", _positive)
    add("--api-key", "require 'Authorization: Bearer KEY' (except on /health and /metrics)", metavar="KEY")
    add("--max-request-bytes", "answer 413 to request bodies larger than this, e.g. 8MiB or 512KB", "8MiB",
        _size, metavar="SIZE")
    add("--export-vllm-metrics", "export /metrics under vLLM's vllm: names as well as jetmoe: (for llm-d, "
        "KServe and other routers that read vLLM's metrics)", "false", _bool, metavar="BOOL", nargs="?",
        const=True)
    add("--kv-events-endpoint", "publish KV-cache events (vLLM's format: BlockStored, BlockRemoved, "
        "AllBlocksCleared) on this ZeroMQ PUB endpoint, e.g. tcp://127.0.0.1:5557", metavar="ENDPOINT")
    add("--kv-events-topic", "topic of the published KV-cache events (llm-d expects kv@POD@MODEL)", "",
        metavar="TOPIC")
    add("--speculative-config", "speculative decoding as a JSON object with vLLM's keys, e.g. '{\"method\": "
        "\"ngram\", \"num_speculative_tokens\": 3, \"prompt_lookup_min\": 2, \"prompt_lookup_max\": 4}' "
        "(n-gram proposals from each sequence's own tokens; outputs do not change)", type=_speculative,
        metavar="JSON")
    add("--cpu-threads", "PyTorch threads of the engine-core process when running on CPU (default: all cores; "
        "the API process uses one)", type=_positive)
    add("--engine-in-process", "run the engine core on a thread of the API process instead of its own process "
        "(shares one GIL with HTTP: slower, for debugging)", "false", _bool, metavar="BOOL", nargs="?",
        const=True)
    add("--chat-template", "a Jinja chat template, or a file holding one, used instead of the checkpoint's",
        metavar="TEMPLATE")
    add("--trust-request-chat-template", "accept a chat_template in requests (a template runs with no time "
        "limit: only for trusted clients)", "false", _bool, metavar="BOOL", nargs="?", const=True)
    add("--special-tokens-in-messages", "let special-token text typed in a chat message (</s>, <s>) become those "
        "tokens (by default only the chat template's own markers are special tokens)", "false", _bool,
        metavar="BOOL", nargs="?", const=True)
    add("--generation-config", "request defaults: auto (the checkpoint's generation_config.json), none, or a "
        "directory with a generation_config.json", "auto", metavar="SOURCE")
    add("--drain-timeout", "on SIGTERM, seconds in-flight requests may take to finish", "30", _seconds, metavar="SECONDS")
    add("--header-timeout", "seconds a connection has to send a complete request head (then 408 and closed)",
        "10", _seconds, metavar="SECONDS")
    add("--body-timeout", "seconds a request body may take to arrive after its head (then 408 and closed)",
        "30", _seconds, metavar="SECONDS")
    add("--keep-alive-timeout", "seconds an idle keep-alive connection stays open", "5", _positive)
    add("--log-level", f"one of {', '.join(LOG_LEVELS)}", "info", _log_level)
    return parser


def parse_args(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None,
               parser: argparse.ArgumentParser | None = None,
               ) -> tuple[argparse.Namespace, ServerSettings, EngineConfig]:
    """Flags -> (args, server settings, engine config); any problem exits with one line and status 2.

    ``parser``: ``build_parser``'s parser with more flags (``server.distributed.cli`` adds its own)."""
    parser = parser or build_parser(environ)
    args = parser.parse_args(argv)
    if not args.model:
        parser.error(f"--model is required: the checkpoint directory to serve (or set {env_name('--model')})")
    if args.header_timeout <= 0:
        parser.error("--header-timeout must be positive")
    if args.num_kv_blocks is not None and args.kv_cache_memory is not None:
        parser.error("give --num-kv-blocks or --kv-cache-memory, not both")
    try:
        return args, settings_from_args(args), engine_config_from_args(args)
    except ValueError as exc:
        parser.error(str(exc))


def settings_from_args(args: argparse.Namespace) -> ServerSettings:
    name = args.served_model_name or Path(args.model).resolve().name or str(args.model)
    template = load_chat_template(args.chat_template) if args.chat_template else None
    source = args.generation_config
    if source.lower() not in ("auto", *GENERATION_CONFIG_OFF) and not Path(source).is_dir():
        raise ValueError(f"--generation-config {source!r} is not auto, none or a directory")
    return ServerSettings(served_model_name=name, api_key=args.api_key or None,
                          max_queued_requests=args.max_queued_requests, drain_timeout=args.drain_timeout,
                          max_request_bytes=args.max_request_bytes, export_vllm_metrics=args.export_vllm_metrics,
                          chat_template=template, generation_config=source,
                          trust_request_chat_template=args.trust_request_chat_template,
                          body_timeout=args.body_timeout, max_response_entries=args.max_response_entries,
                          special_tokens_in_messages=args.special_tokens_in_messages)


def engine_config_from_args(args: argparse.Namespace) -> EngineConfig:
    return EngineConfig(
        model=str(args.model), device=args.device, dtype=None if args.dtype == "auto" else args.dtype,
        block_size=args.block_size, num_kv_blocks=args.num_kv_blocks, kv_cache_memory=args.kv_cache_memory,
        max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
        max_model_len=args.max_model_len, gpu_memory_utilization=args.gpu_memory_utilization,
        enforce_eager=args.enforce_eager, attention_backend=args.attention_backend,
        kv_events_endpoint=args.kv_events_endpoint, kv_events_topic=args.kv_events_topic,
        speculative_config=args.speculative_config,
    )


def fail(message: str) -> int:
    """Print one error line and return exit status 2."""
    print(f"{PROG}: error: {' '.join(message.split())}", file=sys.stderr)
    return 2


def _int(value: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {value!r}") from None


def _positive(value: str) -> int:
    number = _int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value!r}")
    return number


def _port(value: str) -> int:
    number = _int(value)
    if not 0 <= number <= 65535:
        raise argparse.ArgumentTypeError(f"expected a port in 0..65535, got {value!r}")
    return number


def number_at_least(value: str, minimum: float, strict: bool, what: str) -> float:
    """``value`` as a float ``> minimum`` (``strict``) or ``>= minimum``, else an argparse error naming ``what``."""
    try:
        number = float(value)
    except ValueError:
        number = float("nan")
    if not (number > minimum if strict else number >= minimum):
        raise argparse.ArgumentTypeError(f"expected {what}, got {value!r}")
    return number


def _seconds(value: str) -> float:
    return number_at_least(value, 0, False, "a number of seconds >= 0")


def _choice(value: str, choices: Sequence[str], what: str) -> str:
    if value.lower() not in choices:
        raise argparse.ArgumentTypeError(f"unknown {what} {value!r}; choose one of {', '.join(choices)}")
    return value.lower()


def _fraction(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        number = -1.0
    if not 0.0 < number <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a fraction in (0, 1], got {value!r}")
    return number


def _bool(value: str | bool) -> bool:
    if isinstance(value, bool):
        return value
    text = value.strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off", ""):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {value!r}")


def _backend(value: str) -> str:
    return _choice(value, ("auto", "torch", "triton"), "attention backend")


def _dtype(value: str) -> str:
    return _choice(value, DTYPES, "dtype")


def _log_level(value: str) -> str:
    return _choice(value, LOG_LEVELS, "log level")


def _device(value: str) -> str:
    if not _DEVICE.match(value.lower()):
        raise argparse.ArgumentTypeError(f"unknown device {value!r}; use auto, cpu, cuda or cuda:N")
    return value.lower()


def _speculative(value: str) -> SpeculativeConfig:
    try:
        return SpeculativeConfig.from_json(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _size(value: str) -> int:
    """Bytes from '4GiB', '512MB', '2g' or a plain number of bytes (K/M/G/T are powers of 1024)."""
    match = _SIZE.match(value)
    if match is None:
        raise argparse.ArgumentTypeError(f"expected a size such as 4GiB or 512MB, got {value!r}")
    number, unit = float(match.group(1)), match.group(2).lower()
    size = int(number * 1024 ** ("kmgt".index(unit) + 1 if unit else 0))
    if size < 1:
        raise argparse.ArgumentTypeError(f"expected a positive size, got {value!r}")
    return size
