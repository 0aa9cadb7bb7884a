"""Fuzzing our own ``/openapi.json`` with schemathesis against a live server on loopback.

Every operation gets a bounded number of generated requests, valid ones (positive) and ones that break the
schema (negative). Checked: no 5xx, every status documented, every response body matching its schema,
content types as documented, and schema-breaking data rejected with a 4xx. Not checked: that every
schema-valid request is accepted (``positive_data_acceptance``): relations between fields (prompt plus
max_tokens within the context, best_of >= n, ids within the vocabulary) cannot be written in JSON Schema
and are answered with a documented 400.
"""

from __future__ import annotations

import os

import pytest

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, given, seed, settings  # noqa: E402
from schemathesis import GenerationMode  # noqa: E402
from schemathesis.specs.openapi import checks as openapi_checks  # noqa: E402

from server.api import ServerSettings  # noqa: E402
from tests.support.live_server import SERVED_NAME, live_server  # noqa: E402

# Per operation and generation mode, and the same every run; for a deeper or different run:
#   FUZZ_EXAMPLES=500 FUZZ_SEED=7 pytest tests/test_hardening_fuzz.py
EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "40"))
SEED = int(os.environ["FUZZ_SEED"]) if os.environ.get("FUZZ_SEED") else None
BODIES = [("POST", "/v1/completions"), ("POST", "/v1/chat/completions"), ("POST", "/tokenize"),
          ("POST", "/detokenize")]
# NOTE: no value breaks these schemas (a path parameter is any string), so they get valid requests only.
PLAIN = [("GET", "/v1/models"), ("GET", "/v1/models/{model}"), ("GET", "/health"), ("GET", "/metrics"),
         ("GET", "/ping"), ("POST", "/ping"), ("GET", "/version"), ("GET", "/tokenizer_info")]
OPERATIONS = BODIES + PLAIN
CASES = [(m, p, GenerationMode.POSITIVE) for m, p in OPERATIONS] + [
    (m, p, GenerationMode.NEGATIVE) for m, p in BODIES]


@pytest.fixture(scope="module")
def fuzz_server(engine_checkpoint):
    """A short context bounds how long any generated request can run."""
    settings_ = ServerSettings(served_model_name=SERVED_NAME, max_request_bytes=256 * 1024)
    with live_server(engine_checkpoint[0], settings_, max_model_len=48, num_kv_blocks=128) as server:
        yield server


@pytest.fixture(scope="module")
def api_schema(fuzz_server):
    return schemathesis.openapi.from_url(f"{fuzz_server.url}/openapi.json")


def test_every_operation_is_fuzzed(api_schema) -> None:
    found = {(op.ok().method.upper(), op.ok().path) for op in api_schema.get_all_operations()}
    assert found == set(OPERATIONS)


@pytest.mark.parametrize(("method", "path", "mode"), CASES, ids=[f"{m} {p} {g.value}" for m, p, g in CASES])
def test_openapi_fuzz(api_schema, fuzz_server, method, path, mode) -> None:
    operation = api_schema[path][method]
    seen: dict[int, int] = {}

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(max_examples=EXAMPLES, deadline=None, derandomize=SEED is None, database=None,
              suppress_health_check=list(HealthCheck))
    @seed(SEED)
    def run(case) -> None:
        response = case.call_and_validate(base_url=fuzz_server.url, timeout=30,
                                          excluded_checks=[openapi_checks.positive_data_acceptance])
        seen[response.status_code] = seen.get(response.status_code, 0) + 1

    run()
    assert not any(status >= 500 for status in seen), seen
    print(f"{method} {path} {mode}: {dict(sorted(seen.items()))}")
