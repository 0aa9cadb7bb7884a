"""Structured outputs through the official SDK against a live server: ``parse()`` with Pydantic models,
``json_object``, ``structured_outputs`` and the ``guided_*`` names, and the 400s of bad constraints and of
fields the server refuses."""

from __future__ import annotations

import json
import logging
import re
from enum import Enum
from typing import Annotated, Literal

import httpx
import openai
import pytest
from pydantic import BaseModel, Field

from tests.support.live_server import SERVED_NAME

MAX_TOKENS = 400


class Colour(str, Enum):
    red = "red"
    green = "green"
    blue = "blue"


class Flat(BaseModel):
    name: str = Field(max_length=12)
    age: int = Field(ge=0, le=120)
    active: bool


class Point(BaseModel):
    x: int = Field(ge=-100, le=100)
    y: int = Field(ge=-100, le=100)


class Segment(BaseModel):  # nested models: $defs / $ref
    start: Point
    end: Point
    label: str | None = Field(max_length=8)


class Palette(BaseModel):  # enums and bounded arrays
    colours: list[Colour] = Field(min_length=1, max_length=3)
    primary: Colour


class Shape(BaseModel):  # literal and anyOf of models
    kind: Literal["circle", "square"]
    size: Point | None


class Code(BaseModel):  # string patterns
    zip: str = Field(pattern=r"^[0-9]{5}$")
    tags: list[Annotated[str, Field(max_length=6)]] = Field(max_length=2)


MODELS = [Flat, Segment, Palette, Shape, Code]


@pytest.mark.parametrize("model", MODELS, ids=[m.__name__ for m in MODELS])
@pytest.mark.parametrize("sampling", [{"temperature": 0}, {"temperature": 1.0, "seed": 11}],
                         ids=["greedy", "sampled"])
def test_parse_returns_the_model(model_client, model, sampling) -> None:
    completion = model_client.chat.completions.parse(
        model=SERVED_NAME, messages=[{"role": "user", "content": "Describe it as JSON."}],
        response_format=model, max_tokens=MAX_TOKENS, **sampling)
    choice = completion.choices[0]
    assert choice.finish_reason == "stop"
    assert isinstance(choice.message.parsed, model)
    assert json.loads(choice.message.content) == choice.message.parsed.model_dump(mode="json")
    assert " \n" not in choice.message.content and "\n" not in choice.message.content


def test_parse_with_n_samples_each_valid(model_client) -> None:
    completion = model_client.chat.completions.parse(
        model=SERVED_NAME, messages=[{"role": "user", "content": "JSON please"}], response_format=Flat,
        max_tokens=MAX_TOKENS, n=3, temperature=1.0, seed=5)
    assert [c.index for c in completion.choices] == [0, 1, 2]
    assert all(isinstance(c.message.parsed, Flat) for c in completion.choices)


def test_json_object_is_an_object(model_client) -> None:
    completion = model_client.chat.completions.create(
        model=SERVED_NAME, messages=[{"role": "user", "content": "an object"}],
        response_format={"type": "json_object"}, max_tokens=MAX_TOKENS, temperature=0,
        # NOTE: any object may nest without end on a weak model: biasing "}" up closes it early.
        logit_bias=_bias(model_client, "}", 8.0))
    assert completion.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(completion.choices[0].message.content), dict)


def _bias(model_client: openai.OpenAI, text: str, value: float) -> dict[str, float]:
    base = str(model_client.base_url).removesuffix("/v1/").removesuffix("/v1")
    ids = httpx.post(f"{base}/tokenize", json={"prompt": text, "add_special_tokens": False}).json()["tokens"]
    return {str(ids[-1]): value}


def test_stream_helper_reassembles_structured_content(model_client) -> None:
    kwargs = {"model": SERVED_NAME, "messages": [{"role": "user", "content": "JSON"}], "max_tokens": MAX_TOKENS,
              "temperature": 0}
    whole = model_client.chat.completions.parse(response_format=Segment, **kwargs)
    with model_client.chat.completions.stream(response_format=Segment, **kwargs) as stream:
        for _ in stream:
            pass
        final = stream.get_final_completion()
    assert final.choices[0].message.content == whole.choices[0].message.content
    assert final.choices[0].message.parsed == whole.choices[0].message.parsed


def test_completions_regex_and_choice_match_fully(model_client) -> None:
    pattern = r"[a-z]{2,6}@[a-z]{2,6}\.(com|org)"
    for body in ({"structured_outputs": {"regex": pattern}}, {"guided_regex": pattern}):
        completion = model_client.completions.create(model=SERVED_NAME, prompt="email:", max_tokens=64, temperature=0,
                                               extra_body=body)
        assert completion.choices[0].finish_reason == "stop"
        assert re.fullmatch(pattern, completion.choices[0].text)
    options = ["yes", "no", "maybe so"]
    for body in ({"structured_outputs": {"choice": options}}, {"guided_choice": options}):
        completion = model_client.completions.create(model=SERVED_NAME, prompt="answer:", max_tokens=16, n=4,
                                               temperature=1.0, seed=3, extra_body=body)
        assert all(c.text in options and c.finish_reason == "stop" for c in completion.choices)


def test_completions_json_schema_and_grammar(model_client) -> None:
    schema = Point.model_json_schema()
    completion = model_client.completions.create(model=SERVED_NAME, prompt="{", max_tokens=64, temperature=0,
                                           extra_body={"guided_json": schema})
    assert Point.model_validate_json(completion.choices[0].text)
    grammar = 'root ::= "f(" [0-9] ("," [0-9])? ")"'
    completion = model_client.completions.create(model=SERVED_NAME, prompt="call:", max_tokens=16, temperature=0,
                                           extra_body={"structured_outputs": {"grammar": grammar}})
    assert re.fullmatch(r"f\([0-9](,[0-9])?\)", completion.choices[0].text)


def _post(model_server, path: str, body: dict) -> httpx.Response:
    return httpx.post(f"{model_server.base_url}{path}", json={"model": SERVED_NAME, "max_tokens": 4, **body}, timeout=60)


CHAT = {"messages": [{"role": "user", "content": "hi"}]}
TOOLS = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
BAD = [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": {"type": "foo"}}}},
     "response_format.json_schema.schema"),
    ({"guided_json": "{not json"}, "guided_json"),
    ({"structured_outputs": {"regex": "(unclosed"}}, "structured_outputs.regex"),
    ({"structured_outputs": {"grammar": "root ::= undefined_rule"}}, "structured_outputs.grammar"),
    ({"guided_grammar": "root ::= " + " | ".join(f'"{i}"' for i in range(20000))}, "guided_grammar"),
    ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, "structured_outputs"),
    ({"guided_regex": "a", "response_format": {"type": "json_object"}}, "guided_regex"),
    ({"guided_choice": []}, "guided_choice"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": [{"type": "function", "function": {"name": "has space"}}]}, "tools.0.function.name"),
    ({"tools": TOOLS * 2}, "tools"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "foo"}}}],
      "tool_choice": "required"}, "tools"),
    ({"tools": [{"type": "function"}]}, "tools.0.function"),
    ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}}, "response_format"),
    ({"audio": {"voice": "alloy", "format": "wav"}, "modalities": ["text", "audio"]}, "audio"),
    ({"modalities": ["audio"]}, "modalities"),
    ({"prediction": {"type": "content", "content": "x"}}, "prediction"),
    ({"web_search_options": {}}, "web_search_options"),
    ({"functions": [{"name": "f"}]}, "functions"),
]


@pytest.mark.parametrize(("body", "param"), BAD, ids=[p for _, p in BAD])
def test_bad_input_is_a_400_naming_the_field(model_server, body, param) -> None:
    response = _post(model_server, "/chat/completions", {**CHAT, **body})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error"
    assert set(error) == {"message", "type", "param", "code"}
    assert _post(model_server, "/chat/completions", CHAT).status_code == 200  # the server is unharmed


def test_completions_bad_constraint_is_a_400(model_server) -> None:
    response = _post(model_server, "/completions", {"prompt": "x", "structured_outputs": {"regex": "[z-a]"}})
    assert response.status_code == 400 and response.json()["error"]["param"] == "structured_outputs.regex"


def test_informational_and_unknown_fields_are_accepted(model_server, caplog) -> None:
    informational = {"user": "u", "metadata": {"k": "v"}, "store": False, "service_tier": "auto",
                     "safety_identifier": "s", "prompt_cache_key": "p", "modalities": ["text"],
                     "response_format": {"type": "text"}, "tool_choice": "none"}
    assert _post(model_server, "/chat/completions", {**CHAT, **informational}).status_code == 200
    with caplog.at_level(logging.WARNING, logger="server.api.fields"):
        for _ in range(3):
            assert _post(model_server, "/chat/completions", {**CHAT, "made_up_field": 1}).status_code == 200
    warnings = [r.getMessage() for r in caplog.records if "made_up_field" in r.getMessage()]
    assert len(warnings) <= 1  # once per name per process (another test may have logged it first)


def test_unknown_field_is_logged_once_per_name(caplog) -> None:
    from server.api.fields import check_fields
    from server.api.schemas import ChatCompletionRequest

    body = ChatCompletionRequest.model_validate(
        {**CHAT, "brand_new_option": 1, "stream_options": {"include_usage": True, "other": 2}})
    with caplog.at_level(logging.WARNING, logger="server.api.fields"):
        check_fields(body)
        check_fields(body)
    names = sorted(r.getMessage().split("'")[1] for r in caplog.records)
    assert names == ["brand_new_option", "stream_options.other"]
