"""``SpeculativeConfig``: which tokens the engine proposes ahead of the model and how many (vLLM's keys)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

METHODS = ("ngram",)
KEYS = ("method", "num_speculative_tokens", "prompt_lookup_min", "prompt_lookup_max")
# vLLM's choice when neither bound is given.
DEFAULT_LOOKUP = 5
MAX_SPECULATIVE_TOKENS = 32


@dataclass(frozen=True)
class SpeculativeConfig:
    """N-gram (prompt lookup) speculation: up to ``num_speculative_tokens`` proposed tokens per sequence and
    step, copied from what followed the most recent earlier occurrence of the sequence's last n tokens, n from
    ``prompt_lookup_max`` down to ``prompt_lookup_min`` (``server.engine.spec.ngram``)."""

    num_speculative_tokens: int
    prompt_lookup_min: int = DEFAULT_LOOKUP
    prompt_lookup_max: int = DEFAULT_LOOKUP
    method: str = "ngram"

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"speculative method {self.method!r} is not supported; use one of {', '.join(METHODS)}")
        for name in ("num_speculative_tokens", "prompt_lookup_min", "prompt_lookup_max"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"speculative {name} must be a positive integer, got {value!r}")
        if self.num_speculative_tokens > MAX_SPECULATIVE_TOKENS:
            raise ValueError(f"speculative num_speculative_tokens must be at most {MAX_SPECULATIVE_TOKENS}, "
                             f"got {self.num_speculative_tokens}")
        if self.prompt_lookup_min > self.prompt_lookup_max:
            raise ValueError(f"speculative prompt_lookup_min ({self.prompt_lookup_min}) must not exceed "
                             f"prompt_lookup_max ({self.prompt_lookup_max})")

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> SpeculativeConfig:
        """vLLM's ``--speculative-config`` keys; a missing lookup bound takes the other's value (both 5 when
        neither is given). Unknown keys and methods raise ``ValueError``."""
        unknown = sorted(set(values) - set(KEYS))
        if unknown:
            raise ValueError(f"unknown speculative config key(s) {', '.join(map(repr, unknown))}; "
                             f"known keys: {', '.join(KEYS)}")
        if "method" not in values:
            raise ValueError(f"speculative config needs a method (one of {', '.join(METHODS)})")
        if "num_speculative_tokens" not in values:
            raise ValueError("speculative config needs num_speculative_tokens")
        low = values.get("prompt_lookup_min")
        high = values.get("prompt_lookup_max")
        if low is None:
            low = DEFAULT_LOOKUP if high is None else high
        if high is None:
            high = low
        return cls(method=values["method"], num_speculative_tokens=values["num_speculative_tokens"],
                   prompt_lookup_min=low, prompt_lookup_max=high)

    @classmethod
    def from_json(cls, text: str) -> SpeculativeConfig:
        """Parse a JSON object (the command-line form); raises ``ValueError`` with the reason."""
        try:
            values = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"speculative config is not valid JSON: {exc}") from None
        if not isinstance(values, dict):
            raise ValueError("speculative config must be a JSON object")
        return cls.from_dict(values)
