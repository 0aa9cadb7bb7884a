"""Reading a streamed completion: SSE lines -> events -> one ``RequestOutput`` with its timings.

Nothing here touches the network, so the timing rules can be tested on synthetic timestamps:

- TTFT: time to the first chunk with non-empty content (``text``, or ``delta.content`` for chat);
- ITL: the gaps between consecutive chunks with content;
- latency (end to end): time to the last chunk carrying choices (vLLM's definition);
- output tokens: ``usage.completion_tokens`` from the usage chunk (``stream_options.include_usage``); only a
  server that sends no usage falls back on the number of content chunks (``usage_reported`` is then False).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

DONE = "[DONE]"


def parse_sse_line(line: str) -> str | None:
    """The payload of a ``data:`` line; None for blank lines, comments (``:``) and other fields."""
    line = line.rstrip("\r\n")
    if not line.startswith("data:"):
        return None
    data = line[len("data:"):]
    return data[1:] if data.startswith(" ") else data


def error_message(payload: Any) -> str:
    """The message of an OpenAI-shaped error body (``{"error": {"message": ...}}``), or the body itself."""
    if isinstance(payload, dict):
        error = payload.get("error", payload)
        if isinstance(error, dict) and error.get("message"):
            return str(error["message"])
        if isinstance(error, str) and error:
            return error
        if payload.get("detail"):
            return str(payload["detail"])
    return str(payload)[:500]


def http_error_message(status: int, body: bytes) -> str:
    """``"HTTP 400: <message>"`` from a failed response's status and body."""
    try:
        message = error_message(json.loads(body))
    except (ValueError, UnicodeDecodeError):
        message = body.decode("utf-8", "replace").strip()[:500]
    return f"HTTP {status}: {message}" if message else f"HTTP {status}"


def chunk_content(choice: dict[str, Any]) -> str:
    """The text a chunk's choice adds: ``text`` (completions) or ``delta.content`` (chat)."""
    if "text" in choice:
        return choice.get("text") or ""
    delta = choice.get("delta") or {}
    return delta.get("content") or ""


@dataclass
class RequestOutput:
    """What one request measured; times in seconds from when it was sent."""

    success: bool = False
    prompt_len: int = 0
    output_tokens: int = 0
    ttft: float = 0.0
    latency: float = 0.0
    itl: list[float] = field(default_factory=list)
    generated_text: str = ""
    error: str = ""
    usage_reported: bool = False
    send_time: float = 0.0  # seconds after the benchmark started


@dataclass
class StreamRecorder:
    """Fed the data of each SSE event with its arrival time; ``finish`` builds the ``RequestOutput``."""

    prompt_len: int
    first_content: float | None = None
    last_content: float | None = None
    first_choice: float | None = None
    last_choice: float | None = None
    itl: list[float] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    usage: dict[str, Any] | None = None
    error: str = ""
    done: bool = False

    def on_data(self, data: str, now: float) -> None:
        """One event's data (a JSON chunk, an error, or ``[DONE]``) received ``now`` seconds after sending."""
        if data.strip() == DONE:
            self.done = True
            return
        try:
            chunk = json.loads(data)
        except json.JSONDecodeError:
            self.error = self.error or f"bad stream chunk: {data[:200]!r}"
            return
        if not isinstance(chunk, dict):
            return
        if chunk.get("error"):
            self.error = self.error or error_message(chunk)
            return
        if chunk.get("usage"):
            self.usage = chunk["usage"]
        choices = chunk.get("choices") or []
        if choices:
            self._on_choice(choices[0], now)

    def _on_choice(self, choice: dict[str, Any], now: float) -> None:
        if self.first_choice is None:
            self.first_choice = now
        self.last_choice = now
        text = chunk_content(choice)
        if not text:
            return
        if self.first_content is None:
            self.first_content = now
        else:
            self.itl.append(now - (self.last_content or now))
        self.last_content = now
        self.texts.append(text)

    def finish(self) -> RequestOutput:
        """The request's measurements; a stream with no choices or with an error event failed."""
        out = RequestOutput(prompt_len=self.prompt_len, itl=list(self.itl), generated_text="".join(self.texts))
        if self.error or self.first_choice is None:
            out.error = self.error or "the stream ended without any completion chunk"
            return out
        out.success = True
        out.ttft = self.first_content if self.first_content is not None else self.first_choice
        out.latency = self.last_choice if self.last_choice is not None else out.ttft
        usage = self.usage or {}
        if isinstance(usage.get("completion_tokens"), int):
            out.usage_reported = True
            out.output_tokens = usage["completion_tokens"]
            if isinstance(usage.get("prompt_tokens"), int):
                out.prompt_len = usage["prompt_tokens"]
        else:
            out.output_tokens = len(self.texts)
        return out
