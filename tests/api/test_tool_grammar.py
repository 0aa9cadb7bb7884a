"""The grammars ``tool_choice`` compiles to, driven character by character, and the call parser that turns
generated text into ``tool_calls`` (whole or streamed)."""

from __future__ import annotations

import json

import pytest
import xgrammar as xgr

from model.bundled import BUNDLED_MODEL_DIR
from model.tokenizer import Tokenizer
from server.api.schemas_structured import ChatTool
from server.api.tool_parser import ToolCallParser
from server.api.tools import ToolPlan, tool_spec
from server.engine.structured.compiler import GrammarCompiler

TOOLS = tuple(ChatTool.model_validate(t) for t in [
    {"type": "function", "function": {"name": "get_time", "parameters": {
        "type": "object", "properties": {"zone": {"type": "integer", "minimum": -12, "maximum": 12}},
        "required": ["zone"], "additionalProperties": False}}},
    {"type": "function", "function": {"name": "ping"}},
])
CALL = '<tool_call>{"name": "get_time", "arguments": {"zone": 3}}</tool_call>'
PING = '<tool_call>{"name": "ping", "arguments": {}}</tool_call>'


@pytest.fixture(scope="module")
def compiler() -> GrammarCompiler:
    tokenizer = Tokenizer.from_dir(BUNDLED_MODEL_DIR)
    return GrammarCompiler(tokenizer.hf, tokenizer.vocab_size)


def _accepts(compiler: GrammarCompiler, choice: str, parallel: bool, text: str, complete: bool = True) -> bool:
    spec = tool_spec(ToolPlan(TOOLS, choice, parallel))
    assert spec is not None
    matcher = xgr.GrammarMatcher(compiler.compile(spec))
    if not matcher.accept_string(text):
        return False
    return not complete or matcher.accept_token(compiler.tokenizer_info.stop_token_ids[0])


@pytest.mark.parametrize(("choice", "parallel", "text", "ok"), [
    ("auto", True, "Just text.", True),
    ("auto", True, f"Let me check. {CALL} Done.", True),
    ("auto", False, f"{CALL}", True),
    ("auto", True, CALL.replace('"zone": 3', '"zone": 13'), False),  # out of the tool's bounds
    ("auto", True, CALL.replace('{"zone": 3}', '{"zone": 3, "x": 1}'), False),
    ("auto", True, '<tool_call>{"name": "unknown", "arguments": {}}</tool_call>', False),
    ("required", False, CALL, True),
    ("required", False, PING, True),
    ("required", False, "text first " + CALL, False),
    ("required", False, CALL + "\n" + PING, False),
    ("required", True, CALL + "\n" + PING, True),
    ("required", True, "", False),
    ("get_time", True, CALL, True),
    ("get_time", True, PING, False),
    ("get_time", True, CALL + "\n" + CALL, False),
    ("get_time", True, CALL.replace('{"zone": 3}', '{ "zone": 3}'), False),  # no free whitespace
])
def test_tool_grammars(compiler, choice, parallel, text, ok) -> None:
    assert _accepts(compiler, choice, parallel, text) is ok


def test_none_has_no_grammar() -> None:
    assert tool_spec(ToolPlan(TOOLS, "none", True)) is None and tool_spec(None) is None


TEXT = f'Sure. {CALL}\n{PING} bye'


@pytest.mark.parametrize("size", [1, 2, 5, 13, len(TEXT)])
def test_parser_gives_the_same_message_at_any_chunking(size) -> None:
    parser = ToolCallParser()
    deltas = [parser.feed(TEXT[i:i + size], final=i + size >= len(TEXT)) for i in range(0, len(TEXT), size)]
    content, calls = parser.message_fields()
    assert content == "Sure.  bye"
    assert [(c["function"]["name"], c["function"]["arguments"]) for c in calls] == [
        ("get_time", '{"zone": 3}'), ("ping", "{}")]
    streamed_content = "".join(d.get("content", "") for d in deltas)
    fragments: dict[int, str] = {}
    for delta in deltas:
        for call in delta.get("tool_calls", []):
            fragments[call["index"]] = fragments.get(call["index"], "") + call["function"].get("arguments", "")
    assert streamed_content == content and fragments == {0: '{"zone": 3}', 1: "{}"}
    assert [c["id"] for c in calls] == [c["id"] for d in deltas for c in d.get("tool_calls", []) if "id" in c]


def test_parser_keeps_a_call_cut_short_and_stray_markers_as_text() -> None:
    parser = ToolCallParser()
    parser.feed(CALL[:-20], final=True)
    content, calls = parser.message_fields()
    assert content is None and calls[0]["function"]["arguments"] == CALL[len('<tool_call>{"name": "get_time", '
                                                                             '"arguments": '):-20]
    parser = ToolCallParser()
    parser.feed("a <tool_ca", final=True)
    assert parser.message_fields() == ("a <tool_ca", None)
    parser = ToolCallParser()
    parser.feed('x <tool_call>{"name": "ab', final=True)
    assert parser.message_fields() == ('x <tool_call>{"name": "ab', None)
    assert json.loads(TEXT.split("<tool_call>")[1].split("</tool_call>")[0])["name"] == "get_time"
