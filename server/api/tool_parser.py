"""Tool calls out of generated text (the format of ``server.api.tools``), incrementally: the same parser
makes the streamed deltas and the whole message, so that a client that reassembles the stream gets the
non-streamed answer."""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from typing import Any

from server.api.tools import CALL_BEGIN, CALL_END

_ARGS_END = "}" + CALL_END
_HEADER_KEY = '{"name": '
_ARGS_KEY = ', "arguments": '


@dataclass
class ParsedCall:
    id: str
    name: str
    arguments: str = ""


@dataclass
class ToolCallParser:
    """Feed text as it is generated; get OpenAI delta fields (``content`` and ``tool_calls``) back."""

    content: str = ""
    calls: list[ParsedCall] = field(default_factory=list)
    _buffer: str = ""
    _in_call: bool = False
    _header_done: bool = False
    _after_call: bool = False  # a newline right after a call separates it from the next one

    def feed(self, text: str, final: bool = False) -> dict[str, Any]:
        """The delta for ``text`` (possibly empty: text that may start or end a call is held back);
        ``final``: the text ends here, nothing is held back."""
        self._buffer += text
        delta: dict[str, Any] = {}
        while self._step(delta):
            pass
        if final:
            self._finish(delta)
        return delta

    def _finish(self, delta: dict[str, Any]) -> None:
        """A call cut short (``max_tokens``) keeps what was generated of its arguments; text held back that
        did not become a call is content."""
        if self._in_call and self._header_done:
            self._add_arguments(delta, self.calls[-1], len(self.calls) - 1, self._buffer)
        elif self._buffer or self._in_call:
            self._add_content(delta, (CALL_BEGIN if self._in_call else "") + self._buffer)
        self._buffer, self._in_call, self._header_done = "", False, False

    def message_fields(self) -> tuple[str | None, list[dict[str, Any]] | None]:
        """``content`` (None when only tools were called) and ``tool_calls`` of the whole message."""
        calls = [{"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
                 for c in self.calls]
        if not calls:
            return self.content, None
        return (self.content if self.content.strip() else None), calls

    def _step(self, delta: dict[str, Any]) -> bool:
        if not self._in_call:
            return self._text(delta)
        if not self._header_done:
            return self._header(delta)
        return self._arguments(delta)

    def _text(self, delta: dict[str, Any]) -> bool:
        if self._after_call:
            if not self._buffer:
                return False
            self._after_call = False
            if self._buffer.startswith("\n"):
                self._buffer = self._buffer[1:]
        start = self._buffer.find(CALL_BEGIN)
        if start >= 0:
            self._add_content(delta, self._buffer[:start])
            self._buffer = self._buffer[start + len(CALL_BEGIN):]
            self._in_call = True
            return True
        keep = _partial_suffix(self._buffer, CALL_BEGIN)
        self._add_content(delta, self._buffer[: len(self._buffer) - keep])
        self._buffer = self._buffer[len(self._buffer) - keep:]
        return False

    def _header(self, delta: dict[str, Any]) -> bool:
        if not self._buffer.startswith(_HEADER_KEY):
            return False
        try:
            name, end = json.JSONDecoder().raw_decode(self._buffer, len(_HEADER_KEY))
        except ValueError:
            return False
        if not self._buffer.startswith(_ARGS_KEY, end):
            return False
        call = ParsedCall(f"call_{uuid.uuid4().hex[:24]}", str(name))
        self.calls.append(call)
        self._buffer = self._buffer[end + len(_ARGS_KEY):]
        self._header_done = True
        _tool_delta(delta, len(self.calls) - 1, {"id": call.id, "type": "function",
                                                 "function": {"name": call.name, "arguments": ""}})
        return True

    def _arguments(self, delta: dict[str, Any]) -> bool:
        call, index = self.calls[-1], len(self.calls) - 1
        end = self._arguments_end()
        if end is None:
            emit = self._buffer[: max(len(self._buffer) - len(_ARGS_END), 0)]
            self._buffer = self._buffer[len(emit):]
            self._add_arguments(delta, call, index, emit)
            return False
        self._add_arguments(delta, call, index, self._buffer[:end])
        self._buffer = self._buffer[end + len(_ARGS_END):]
        self._in_call, self._header_done, self._after_call = False, False, True
        return True

    def _arguments_end(self) -> int | None:
        """Where the arguments end in the buffer (they are one JSON value, then ``}</tool_call>``)."""
        text = self.calls[-1].arguments + self._buffer
        if _ARGS_END not in self._buffer:
            return None
        try:
            _, end = json.JSONDecoder().raw_decode(text)
        except ValueError:
            return None
        local = end - len(self.calls[-1].arguments)
        return local if self._buffer.startswith(_ARGS_END, local) else None

    def _add_content(self, delta: dict[str, Any], text: str) -> None:
        if text:
            self.content += text
            delta["content"] = delta.get("content", "") + text

    @staticmethod
    def _add_arguments(delta: dict[str, Any], call: ParsedCall, index: int, text: str) -> None:
        if text:
            call.arguments += text
            _tool_delta(delta, index, {"function": {"arguments": text}})


def _tool_delta(delta: dict[str, Any], index: int, fields: dict[str, Any]) -> None:
    calls = delta.setdefault("tool_calls", [])
    if calls and calls[-1]["index"] == index:
        entry = calls[-1]
        if "function" in fields:
            function = entry.setdefault("function", {})
            function["arguments"] = function.get("arguments", "") + fields["function"].get("arguments", "")
            if "name" in fields["function"]:
                function["name"] = fields["function"]["name"]
        entry.update({k: v for k, v in fields.items() if k != "function"})
        return
    calls.append({"index": index, **fields})


def _partial_suffix(text: str, marker: str) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of ``marker``."""
    for size in range(min(len(text), len(marker) - 1), 0, -1):
        if marker.startswith(text[-size:]):
            return size
    return 0
