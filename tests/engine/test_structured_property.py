"""Property: for random small JSON schemas, every output the engine finishes validates against its schema."""

from __future__ import annotations

import json

import jsonschema_rs
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from server.engine.llm_engine import LLMEngine
from server.engine.sampling_params import SamplingParams
from server.engine.structured import StructuredSpec
from tests.engine.test_structured_decoding import make_engine
from tests.support.engine import run_engine

_WORD = st.text(alphabet="abcxyz_", min_size=1, max_size=5)


def _integer() -> st.SearchStrategy[dict]:
    return st.tuples(st.integers(-50, 50), st.integers(0, 60)).map(
        lambda t: {"type": "integer", "minimum": t[0], "maximum": t[0] + t[1]})


_LEAVES = st.one_of(
    _integer(),
    st.just({"type": "boolean"}),
    st.just({"type": "null"}),
    st.lists(_WORD, min_size=1, max_size=4, unique=True).map(lambda e: {"enum": e}),
    st.integers(0, 6).map(lambda n: {"type": "string", "maxLength": n}),
    st.sampled_from(["^[a-c]{1,3}$", "^[0-9]{2}-[0-9]{2}$"]).map(lambda p: {"type": "string", "pattern": p}),
)


def _composite(children: st.SearchStrategy[dict]) -> st.SearchStrategy[dict]:
    objects = st.dictionaries(_WORD, children, min_size=1, max_size=3).flatmap(
        lambda props: st.sets(st.sampled_from(sorted(props))).map(
            lambda required: {"type": "object", "properties": props, "required": sorted(required),
                              "additionalProperties": False}))
    arrays = st.tuples(children, st.integers(0, 2), st.integers(0, 2)).map(
        lambda t: {"type": "array", "items": t[0], "minItems": t[1], "maxItems": t[1] + t[2]})
    any_of = st.lists(children, min_size=2, max_size=2).map(lambda alts: {"anyOf": alts})
    return st.one_of(objects, arrays, any_of)


SCHEMAS = st.recursive(_LEAVES, _composite, max_leaves=5)


@pytest.fixture(scope="module")
def engine() -> LLMEngine:
    return make_engine()


@settings(max_examples=30, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(schema=SCHEMAS, seed=st.one_of(st.none(), st.integers(0, 1000)))
def test_every_finished_output_validates(engine, schema, seed) -> None:
    sampling = {"temperature": 0.0} if seed is None else {"temperature": 1.0, "seed": seed}
    params = SamplingParams(max_tokens=160, n=2, structured=StructuredSpec.json_schema(schema), **sampling)
    engine.add_request("p", engine.tokenizer.encode("data = "), params)
    outputs = run_engine(engine)
    validator = jsonschema_rs.validator_for(schema)
    for index in range(2):
        deltas = outputs[("p", index)]
        assert deltas[-1].finish_reason in ("stop", "length")
        if deltas[-1].finish_reason == "stop":
            text = "".join(d.new_text for d in deltas)
            assert "\n" not in text
            assert validator.is_valid(json.loads(text)), (schema, text)
