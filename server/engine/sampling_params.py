"""Per-request sampling parameters, validated once at construction.

`SamplingParams` is a frozen, hashable dataclass. Callers may pass lists or dicts (as decoded from JSON); they are
normalised into tuples in `__post_init__`, so `SamplingParams(stop=["a"], logit_bias={"5": 1.0})` works and the
instance can still be used as a dict key. Every invalid value raises `SamplingParamsError` naming the offending
OpenAI field in `param`, which the API layer turns into an HTTP 400 `invalid_request_error`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from server.engine.structured.spec import StructuredSpec

# NOTE: temperatures below this are treated as greedy (as vLLM does): dividing logits by ~0 only overflows.
GREEDY_TEMPERATURE_EPS = 1e-5
MAX_N = 128
MAX_LOGPROBS = 20
MAX_STOP_STRINGS = 16
MAX_LOGIT_BIAS = 100.0
# Bounds that keep one request from slowing every other one's steps (each id or word is work per step).
MAX_STOP_TOKEN_IDS = 256
MAX_ALLOWED_TOKEN_IDS = 65536
MAX_BAD_WORDS = 256
# Outside this range the penalty overflows logits (1e-308 divides them to infinity) or means nothing useful.
REPETITION_PENALTY_RANGE = (0.01, 100.0)
# Range accepted by torch.Generator.manual_seed.
_SEED_MIN = -(2**63)
_SEED_MAX = 2**64 - 1


class SamplingParamsError(ValueError):
    """An invalid sampling parameter; `param` names the OpenAI request field at fault (or None)."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_int(name: str, value: Any, lo: int | None = None, hi: int | None = None) -> int:
    """Return `value` if it is an int within [lo, hi] (bounds optional), else raise."""
    if not _is_int(value):
        raise SamplingParamsError(f"{name} must be an integer, got {value!r}", param=name)
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        lo_s = "-inf" if lo is None else lo
        hi_s = "inf" if hi is None else hi
        raise SamplingParamsError(f"{name} must be in [{lo_s}, {hi_s}], got {value}", param=name)
    return value


def _check_optional_int(name: str, value: Any, lo: int, hi: int) -> int | None:
    return None if value is None else _check_int(name, value, lo, hi)


def _to_float(name: str, value: Any) -> float:
    """Convert an int/float to a finite float; reject bools, strings, NaN and infinities."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise SamplingParamsError(f"{name} must be a number, got {value!r}", param=name)
    result = float(value)
    if not math.isfinite(result):
        raise SamplingParamsError(f"{name} must be finite, got {value!r}", param=name)
    return result


def _check_float(name: str, value: Any, lo: float, hi: float, lo_open: bool = False) -> float:
    """Return `value` as a finite float within [lo, hi] (or (lo, hi] when `lo_open`), else raise."""
    result = _to_float(name, value)
    too_low = result <= lo if lo_open else result < lo
    if too_low or result > hi:
        interval = f"{'(' if lo_open else '['}{lo}, {hi}]"
        raise SamplingParamsError(f"{name} must be in {interval}, got {result}", param=name)
    return result


def _as_items(name: str, value: Any) -> list[Any]:
    """A list from a list/tuple/other iterable; strings and mappings are not accepted here."""
    if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, Iterable):
        raise SamplingParamsError(f"{name} must be a list, got {type(value).__name__}", param=name)
    return list(value)


def _normalise_logit_bias(value: Any) -> tuple[tuple[int, float], ...]:
    """Accept {token: bias} (keys may be numeric strings, as in JSON) or (token, bias) pairs."""
    name = "logit_bias"
    pairs = list(value.items()) if isinstance(value, Mapping) else _as_items(name, value)
    merged: dict[int, float] = {}
    for pair in pairs:
        if not isinstance(pair, (tuple, list)) or len(pair) != 2:
            raise SamplingParamsError(
                f"{name} entries must be (token_id, bias) pairs, got {pair!r}", param=name
            )
        key, bias = pair
        try:
            token = int(key) if isinstance(key, str) else key
        except ValueError:
            raise SamplingParamsError(f"{name} keys must be token ids, got {key!r}", param=name) from None
        _check_int(name, token, lo=0)
        merged[token] = _check_float(name, bias, -MAX_LOGIT_BIAS, MAX_LOGIT_BIAS)
    return tuple(sorted(merged.items()))


def _normalise_stop(value: Any) -> tuple[str, ...]:
    """Accept one string or a list of non-empty strings (at most MAX_STOP_STRINGS)."""
    items = [value] if isinstance(value, str) else _as_items("stop", value)
    if len(items) > MAX_STOP_STRINGS:
        raise SamplingParamsError(
            f"stop accepts at most {MAX_STOP_STRINGS} strings, got {len(items)}", "stop"
        )
    for item in items:
        if not isinstance(item, str) or not item:
            raise SamplingParamsError(f"stop strings must be non-empty strings, got {item!r}", param="stop")
    return tuple(items)


def _check_length(name: str, items: list[Any], limit: int) -> list[Any]:
    if len(items) > limit:
        raise SamplingParamsError(f"{name} accepts at most {limit} entries, got {len(items)}", param=name)
    return items


def _normalise_stop_token_ids(value: Any) -> tuple[int, ...]:
    items = _check_length("stop_token_ids", _as_items("stop_token_ids", value), MAX_STOP_TOKEN_IDS)
    return tuple(_check_int("stop_token_ids", t, lo=0) for t in items)


def _normalise_allowed(value: Any) -> tuple[int, ...] | None:
    if value is None:
        return None
    items = _check_length("allowed_token_ids", _as_items("allowed_token_ids", value), MAX_ALLOWED_TOKEN_IDS)
    ids = tuple(_check_int("allowed_token_ids", t, lo=0) for t in items)
    if not ids:
        raise SamplingParamsError("allowed_token_ids must not be empty", param="allowed_token_ids")
    return tuple(sorted(set(ids)))


def _normalise_bad_words(value: Any) -> tuple[str, ...]:
    words = tuple(_check_length("bad_words", _as_items("bad_words", value), MAX_BAD_WORDS))
    for word in words:
        if not isinstance(word, str) or not word.strip():
            raise SamplingParamsError(f"bad_words must be non-blank strings, got {word!r}", param="bad_words")
    return words
def _check_structured(value: Any) -> StructuredSpec | None:
    if value is not None and not isinstance(value, StructuredSpec):
        raise SamplingParamsError(f"structured must be a StructuredSpec, got {type(value).__name__}",
                                  param="structured_outputs")
    return value


def _check_bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise SamplingParamsError(f"{name} must be a boolean, got {value!r}", param=name)
    return value


@dataclass(frozen=True)
class SamplingParams:
    """How to sample one request (OpenAI / vLLM semantics).

    temperature 0 means greedy; top_k 0 or -1 disables top-k; top_p 1 and min_p 0 disable those filters.
    `logprobs` asks for the chosen token's logprob plus that many top alternatives per generated token (0: only
    the chosen one); `prompt_logprobs` likewise for prompt tokens. Logprobs describe the model's raw
    distribution, before penalties, bias, temperature and filtering.

    As vLLM has them: `min_tokens` masks EOS (unless `ignore_eos`) and `stop_token_ids` until that many tokens
    were generated (and stop strings are not looked for before); `allowed_token_ids` restricts every step to
    those ids; `bad_words` are never generated as token sequences (each word tokenized with and without a
    leading space); `include_stop_str_in_output` keeps the stop string (or stop token's text) in the text;
    `spaces_between_special_tokens` sets kept special tokens off from the text by a space.
    """

    n: int = 1
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    min_tokens: int = 0
    allowed_token_ids: tuple[int, ...] | None = None
    bad_words: tuple[str, ...] = ()
    include_stop_str_in_output: bool = False
    spaces_between_special_tokens: bool = True
    structured: StructuredSpec | None = None  # the output must match this (grammar-constrained decoding)

    def __post_init__(self) -> None:
        """Validate every field and normalise containers into tuples and numbers into floats."""
        values = {
            "n": _check_int("n", self.n, 1, MAX_N),
            "max_tokens": _check_int("max_tokens", self.max_tokens, lo=1),
            "temperature": _check_float("temperature", self.temperature, 0.0, 2.0),
            "top_p": _check_float("top_p", self.top_p, 0.0, 1.0, lo_open=True),
            "top_k": self._checked_top_k(),
            "min_p": _check_float("min_p", self.min_p, 0.0, 1.0),
            "presence_penalty": _check_float("presence_penalty", self.presence_penalty, -2.0, 2.0),
            "frequency_penalty": _check_float("frequency_penalty", self.frequency_penalty, -2.0, 2.0),
            "repetition_penalty": _check_float("repetition_penalty", self.repetition_penalty,
                                               *REPETITION_PENALTY_RANGE),
            "logit_bias": _normalise_logit_bias(self.logit_bias),
            "seed": None if self.seed is None else _check_int("seed", self.seed, _SEED_MIN, _SEED_MAX),
            "stop": _normalise_stop(self.stop),
            "stop_token_ids": _normalise_stop_token_ids(self.stop_token_ids),
            "ignore_eos": _check_bool("ignore_eos", self.ignore_eos),
            "logprobs": _check_optional_int("logprobs", self.logprobs, 0, MAX_LOGPROBS),
            "prompt_logprobs": _check_optional_int("prompt_logprobs", self.prompt_logprobs, 0, MAX_LOGPROBS),
            "skip_special_tokens": _check_bool("skip_special_tokens", self.skip_special_tokens),
            "min_tokens": _check_int("min_tokens", self.min_tokens, lo=0),
            "allowed_token_ids": _normalise_allowed(self.allowed_token_ids),
            "bad_words": _normalise_bad_words(self.bad_words),
            "include_stop_str_in_output": _check_bool("include_stop_str_in_output",
                                                      self.include_stop_str_in_output),
            "spaces_between_special_tokens": _check_bool("spaces_between_special_tokens",
                                                         self.spaces_between_special_tokens),
            "structured": _check_structured(self.structured),
        }
        min_tokens, max_tokens = int(values["min_tokens"]), int(values["max_tokens"])  # type: ignore[call-overload]
        if min_tokens > max_tokens:
            raise SamplingParamsError(
                f"min_tokens must be at most max_tokens={max_tokens}, got {min_tokens}", param="min_tokens"
            )
        for name, value in values.items():
            object.__setattr__(self, name, value)

    def _checked_top_k(self) -> int:
        top_k = _check_int("top_k", self.top_k)
        if top_k < -1:
            raise SamplingParamsError(f"top_k must be -1 (disabled) or >= 0, got {top_k}", param="top_k")
        return top_k

    @property
    def greedy(self) -> bool:
        """True when sampling reduces to argmax: temperature ~0 or top_k == 1."""
        return self.temperature < GREEDY_TEMPERATURE_EPS or self.top_k == 1

    @property
    def uses_penalties(self) -> bool:
        """True when any of the repetition / frequency / presence penalties is active."""
        return self.repetition_penalty != 1.0 or self.frequency_penalty != 0.0 or self.presence_penalty != 0.0

    def with_overrides(self, **overrides: Any) -> SamplingParams:
        """A copy with some fields replaced; the copy is validated again."""
        return dataclasses.replace(self, **overrides)

    def validate_vocab(self, vocab_size: int) -> None:
        """Raise SamplingParamsError when a token id in logit_bias, stop_token_ids or allowed_token_ids is
        >= vocab_size."""
        for token in self.allowed_token_ids or ():
            if token >= vocab_size:
                raise SamplingParamsError(
                    f"allowed_token_ids token id {token} is out of range for a vocabulary of {vocab_size}",
                    "allowed_token_ids",
                )
        for token, _ in self.logit_bias:
            if token >= vocab_size:
                raise SamplingParamsError(
                    f"logit_bias token id {token} is out of range for a vocabulary of {vocab_size}",
                    "logit_bias",
                )
        for token in self.stop_token_ids:
            if token >= vocab_size:
                raise SamplingParamsError(
                    f"stop_token_ids token id {token} is out of range for a vocabulary of {vocab_size}",
                    "stop_token_ids",
                )
