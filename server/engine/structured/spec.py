"""What a request's output must match: a JSON schema, a regex, a choice of strings, an EBNF grammar, or a
structural tag (free text with constrained tool calls). Plain, hashable data: the grammar library is not
imported here, so ``SamplingParams`` can carry a spec without loading it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal

SpecKind = Literal["json", "json_object", "regex", "choice", "grammar", "structural_tag"]
KINDS: tuple[str, ...] = ("json", "json_object", "regex", "choice", "grammar", "structural_tag")
# Larger specs are refused (a 400) before compiling: compile time and memory grow with them.
MAX_SPEC_CHARS = 64 * 1024
MAX_CHOICES = 256


class StructuredOutputError(ValueError):
    """A spec that cannot be compiled or is unsupported; ``param`` names the request field at fault."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


@dataclass(frozen=True)
class StructuredSpec:
    """One output constraint. ``value`` is canonical text: a JSON document for json/choice/structural_tag,
    the pattern for regex, the EBNF source for grammar, empty for json_object.

    ``param`` is the request field it came from, named by errors (it does not change the grammar, so it is
    left out of equality and of the compile cache key).
    """

    kind: SpecKind
    value: str = ""
    param: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise StructuredOutputError(f"unknown structured output kind {self.kind!r}", self.param)
        if not isinstance(self.value, str):
            raise StructuredOutputError("a structured output spec must be text", self.param)
        if len(self.value) > MAX_SPEC_CHARS:
            raise StructuredOutputError(
                f"the {self.kind} constraint is {len(self.value)} characters, more than the limit of "
                f"{MAX_SPEC_CHARS}", self.param)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, StructuredSpec) and (self.kind, self.value) == (other.kind, other.value)

    def __hash__(self) -> int:
        return hash((self.kind, self.value))

    @property
    def key(self) -> tuple[str, str]:
        """The compile cache key."""
        return (self.kind, self.value)

    @classmethod
    def json_schema(cls, schema: Any, param: str | None = None) -> StructuredSpec:
        """From a JSON schema (a dict, or True for any JSON value). Key order is kept: it is the output's order."""
        if schema is True:
            schema = {}
        if not isinstance(schema, dict):
            raise StructuredOutputError("a JSON schema must be an object", param)
        return cls("json", _canonical(schema, param), param)

    @classmethod
    def choice(cls, options: Any, param: str | None = None) -> StructuredSpec:
        """Exactly one of ``options`` (non-empty strings)."""
        if not isinstance(options, list) or not options or len(options) > MAX_CHOICES:
            raise StructuredOutputError(f"choice must be a list of 1 to {MAX_CHOICES} strings", param)
        if any(not isinstance(o, str) or not o for o in options):
            raise StructuredOutputError("choice entries must be non-empty strings", param)
        return cls("choice", json.dumps(options, ensure_ascii=False), param)

    def loads(self) -> Any:
        """The JSON document of a json/choice/structural_tag spec."""
        return json.loads(self.value)


def _canonical(document: Any, param: str | None) -> str:
    try:
        return json.dumps(document, ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise StructuredOutputError(f"the schema is not JSON: {exc}", param) from exc
