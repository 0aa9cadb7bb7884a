"""Tool calling through the official SDK against a live server: each ``tool_choice``, arguments valid against
the tool's schema, streamed calls reassembled by the SDK's stream helper, and past calls in the prompt."""

from __future__ import annotations

import json

import httpx
import jsonschema_rs
import openai
import pytest

from server.api.chat_template import render_messages
from server.api.schemas import ChatCompletionRequest
from server.api.tools import SYSTEM_PREAMBLE, template_inputs, tool_plan
from tests.support.live_server import SERVED_NAME

WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 10},
                                            "unit": {"enum": ["c", "f"]}},
           "required": ["city", "unit"], "additionalProperties": False}
CLOCK = {"type": "object", "properties": {"zone": {"type": "integer", "minimum": -12, "maximum": 12}},
         "required": ["zone"], "additionalProperties": False}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                      "parameters": WEATHER}},
    {"type": "function", "function": {"name": "get_time", "parameters": CLOCK}},
]
SCHEMAS = {"get_weather": WEATHER, "get_time": CLOCK}
MESSAGES = [{"role": "user", "content": "What is the weather in Paris?"}]


def _create(model_client: openai.OpenAI, **kwargs):
    defaults = {"messages": MESSAGES, "tools": TOOLS, "max_tokens": 300, "temperature": 0}
    return model_client.chat.completions.create(model=SERVED_NAME, **{**defaults, **kwargs})


def _check_calls(message, names: set[str]) -> None:
    assert message.tool_calls
    for call in message.tool_calls:
        assert call.type == "function" and call.id.startswith("call_") and call.function.name in names
        jsonschema_rs.validate(SCHEMAS[call.function.name], json.loads(call.function.arguments))


@pytest.mark.parametrize("sampling", [{"temperature": 0}, {"temperature": 1.0, "seed": 4}])
def test_required_forces_one_valid_call(model_client, sampling) -> None:
    choice = _create(model_client, tool_choice="required", parallel_tool_calls=False, **sampling).choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    assert len(choice.message.tool_calls) == 1
    _check_calls(choice.message, set(SCHEMAS))


def test_required_parallel_calls_are_each_valid(model_client) -> None:
    choice = _create(model_client, tool_choice="required", temperature=1.0, seed=9).choices[0]
    calls = choice.message.tool_calls
    assert choice.finish_reason in ("tool_calls", "length") and calls
    assert len({c.id for c in calls}) == len(calls)
    # A weak model may keep calling until max_tokens: then only the last call is cut short.
    complete = calls if choice.finish_reason == "tool_calls" else calls[:-1]
    assert len(calls) >= 2 or choice.finish_reason == "tool_calls"
    choice.message.tool_calls = complete
    _check_calls(choice.message, set(SCHEMAS))


def test_named_choice_calls_that_tool_once(model_client) -> None:
    for name in SCHEMAS:
        choice = _create(model_client, tool_choice={"type": "function", "function": {"name": name}}).choices[0]
        assert choice.finish_reason == "tool_calls" and [c.function.name for c in choice.message.tool_calls] == [name]
        _check_calls(choice.message, {name})


def test_none_never_calls(model_client) -> None:
    choice = _create(model_client, tool_choice="none", max_tokens=24).choices[0]
    assert choice.message.tool_calls is None and choice.finish_reason == "length"
    assert isinstance(choice.message.content, str) and choice.message.content


def test_auto_lets_the_model_answer_in_text(model_client) -> None:
    # A weak model does not start calls by itself; the grammar of a started call is pinned in test_tool_grammar.
    choice = _create(model_client, tool_choice="auto", max_tokens=24).choices[0]
    default = _create(model_client, max_tokens=24).choices[0]
    assert choice.message.tool_calls is None and choice.message.content and choice.finish_reason == "length"
    assert default.message.content == choice.message.content


@pytest.mark.parametrize("tool_choice", ["required", {"type": "function", "function": {"name": "get_time"}}])
def test_stream_helper_reassembles_calls(model_client, tool_choice) -> None:
    kwargs = {"tool_choice": tool_choice, "parallel_tool_calls": False, "temperature": 1.0, "seed": 21}
    whole = _create(model_client, **kwargs).choices[0]
    with model_client.chat.completions.stream(model=SERVED_NAME, messages=MESSAGES, tools=TOOLS, max_tokens=300,
                                        **kwargs) as stream:
        events = [event.type for event in stream]
        final = stream.get_final_completion().choices[0]
    assert "tool_calls.function.arguments.delta" in events and "tool_calls.function.arguments.done" in events
    assert final.finish_reason == whole.finish_reason == "tool_calls"
    assert final.message.content == whole.message.content
    strip = [(c.type, c.function.name, c.function.arguments) for c in final.message.tool_calls]
    assert strip == [(c.type, c.function.name, c.function.arguments) for c in whole.message.tool_calls]


def test_stream_deltas_have_openai_shape(model_server) -> None:
    body = {"model": SERVED_NAME, "messages": MESSAGES, "tools": TOOLS, "stream": True, "max_tokens": 300,
            "tool_choice": {"type": "function", "function": {"name": "get_time"}}, "temperature": 0}
    with httpx.stream("POST", f"{model_server.base_url}/chat/completions", json=body, timeout=120) as response:
        chunks = [json.loads(line[6:]) for line in response.iter_lines()
                  if line.startswith("data: ") and line != "data: [DONE]"]
    deltas = [c["choices"][0]["delta"] for c in chunks if c["choices"]]
    calls = [d["tool_calls"][0] for d in deltas if "tool_calls" in d]
    first = calls[0]
    assert first["index"] == 0 and first["id"].startswith("call_") and first["type"] == "function"
    assert first["function"]["name"] == "get_time"
    assert all(set(c) == {"index", "function"} and set(c["function"]) == {"arguments"} for c in calls[1:])
    arguments = "".join(c["function"].get("arguments", "") for c in calls)
    jsonschema_rs.validate(CLOCK, json.loads(arguments))
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"


def _render(model_server, history: list[dict], tools: list[dict] | None, **fields) -> list[int]:
    body = ChatCompletionRequest.model_validate({"messages": history, "tools": tools, **fields})
    return render_messages(model_server.state, body.messages, body, tool_plan(body))


def test_history_with_calls_and_results_is_rendered(model_server) -> None:
    history = [
        {"role": "developer", "content": "Be brief."},
        *MESSAGES,
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather",
                                                              "arguments": '{"city": "Paris", "unit": "c"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18 degrees"},
    ]
    tool_lines = "\n".join(json.dumps(t["function"]) for t in TOOLS)
    expected = [
        {"role": "system", "content": f"Be brief.\n\n{SYSTEM_PREAMBLE}\n{tool_lines}"},
        MESSAGES[0],
        {"role": "assistant", "content": '<tool_call>{"name": "get_weather", "arguments": '
                                         '{"city": "Paris", "unit": "c"}}</tool_call>'},
        {"role": "tool", "content": "18 degrees"},
    ]
    tokenizer = model_server.state.engine.tokenizer
    rendered = _render(model_server, history, TOOLS)
    assert rendered == tokenizer.apply_chat_template(expected)
    body = {"model": SERVED_NAME, "messages": history, "tools": TOOLS, "max_tokens": 4}
    answer = httpx.post(f"{model_server.base_url}/chat/completions", json=body, timeout=60)
    assert answer.status_code == 200, answer.text
    assert answer.json()["usage"]["prompt_tokens"] == len(rendered)
    without_tools = [{"role": "system", "content": "Be brief."}, *expected[1:]]
    assert _render(model_server, history, None) == tokenizer.apply_chat_template(without_tools)


def test_a_template_that_uses_tools_gets_them(model_server) -> None:
    template = ("{% for t in tools %}[{{ t.function.name }}]{% endfor %}{% for m in messages %}{{ m.role }}:"
                "{{ m.content }}{% for c in m.tool_calls or [] %}<{{ c.function.name }} "
                "{{ c.function.arguments.city }}>{% endfor %};{% endfor %}")
    history = [MESSAGES[0], {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'}}]}]
    body = ChatCompletionRequest.model_validate({"messages": history, "tools": TOOLS})
    messages, extra = template_inputs(body.messages, tool_plan(body), native=True)
    tokenizer = model_server.state.engine.tokenizer
    rendered = tokenizer.apply_chat_template(messages, False, chat_template=template, template_kwargs=extra)
    assert tokenizer.decode(rendered) == (
        "[get_weather][get_time]user:What is the weather in Paris?;assistant:<get_weather Rome>;")
