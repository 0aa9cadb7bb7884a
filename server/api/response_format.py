"""Output constraints of a request -> one ``StructuredSpec`` (or None), from ``response_format``,
``structured_outputs`` or the older ``guided_*`` fields; more than one constraint is a 400."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from server.api.errors import APIError
from server.api.schemas_structured import (
    ResponseFormatJSONObject,
    ResponseFormatJSONSchema,
    StructuredOutputFields,
    StructuredOutputsParams,
)
from server.engine.sampling_params import SamplingParams
from server.engine.structured import StructuredOutputError, StructuredSpec
from server.engine.structured.compiler import GrammarCompiler


def requested_spec(body: StructuredOutputFields) -> StructuredSpec | None:
    """The one output constraint the request asks for, or None."""
    found = [spec for spec in (_response_format(body), *_structured_outputs(body.structured_outputs),
                               *_guided(body)) if spec is not None]
    if len(found) > 1:
        names = ", ".join(sorted({s.param or "" for s in found}))
        raise APIError(400, f"give one output constraint, not several ({names})", param=found[1].param)
    return found[0] if found else None


async def compile_spec(compiler: GrammarCompiler, params: SamplingParams) -> None:
    """Compile the request's constraint (or find it cached) before it is queued: a bad one is a 400 naming its
    field."""
    spec = params.structured
    if spec is None:
        return
    if params.min_tokens:  # the grammar may require the end before min_tokens: no token would be allowed
        raise APIError(400, "min_tokens cannot be combined with an output constraint", param="min_tokens")
    try:
        await asyncio.wrap_future(compiler.submit(spec))
    except StructuredOutputError as exc:
        raise APIError(400, exc.message, param=exc.param or spec.param, code="invalid_structured_output") from exc


def _response_format(body: StructuredOutputFields) -> StructuredSpec | None:
    fmt = body.response_format
    if isinstance(fmt, ResponseFormatJSONObject):
        return StructuredSpec("json_object", "", "response_format")
    if isinstance(fmt, ResponseFormatJSONSchema):
        schema = fmt.json_schema.schema_
        return _json(schema if schema is not None else {}, "response_format.json_schema.schema")
    return None


def _structured_outputs(params: StructuredOutputsParams | None) -> list[StructuredSpec | None]:
    if params is None:
        return []
    name = "structured_outputs"
    specs = [
        _json(params.json_, f"{name}.json") if params.json_ is not None else None,
        StructuredSpec("regex", params.regex, f"{name}.regex") if params.regex is not None else None,
        StructuredSpec.choice(params.choice, f"{name}.choice") if params.choice is not None else None,
        StructuredSpec("grammar", params.grammar, f"{name}.grammar") if params.grammar is not None else None,
        StructuredSpec("json_object", "", f"{name}.json_object") if params.json_object else None,
    ]
    if sum(s is not None for s in specs) > 1:
        raise APIError(400, "structured_outputs takes exactly one of json, regex, choice, grammar and "
                       "json_object", param=name)
    return specs


def _guided(body: StructuredOutputFields) -> list[StructuredSpec | None]:
    return [
        _json(body.guided_json, "guided_json") if body.guided_json is not None else None,
        StructuredSpec("regex", body.guided_regex, "guided_regex") if body.guided_regex is not None else None,
        StructuredSpec.choice(body.guided_choice, "guided_choice") if body.guided_choice is not None else None,
        StructuredSpec("grammar", body.guided_grammar, "guided_grammar")
        if body.guided_grammar is not None else None,
    ]


def _json(schema: Any, param: str) -> StructuredSpec:
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except ValueError as exc:
            raise APIError(400, f"{param}: the schema is not valid JSON: {exc}", param=param) from exc
    return StructuredSpec.json_schema(schema, param)

