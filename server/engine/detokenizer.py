"""Incremental, UTF-8 safe detokenization with stop strings.

Two layers, both O(window) per token:

1. Text from tokens (the prefix/read-offset technique of vLLM and TGI): decode `ids[prefix:]` and
   `ids[prefix:read]`; the new text is the difference. It is taken only when it does not end with U+FFFD,
   i.e. when no character is still split across byte-fallback tokens; otherwise the window grows until the
   character is complete. Byte-fallback tokens that are invalid UTF-8 for good are released at once, as
   U+FFFD, just as `tokenizer.decode` shows them. Both windows start at the same token, so the sentencepiece leading-space strip
   cancels out and the concatenated text equals `decode(prompt + output)[len(decode(prompt)):]`.
   The prompt's last tokens seed the window so that the first generated token's leading space is kept.
2. Stop strings: text that could still be the beginning of a stop string is held back. Generation stops as
   soon as a stop string is complete; among the matches completed by one step, the earliest one wins. The
   stop string and everything after it are never released.
"""

from __future__ import annotations

import codecs
import re
from collections.abc import Sequence
from dataclasses import dataclass

from model.tokenizer import Tokenizer

_PROMPT_CONTEXT_TOKENS = 5  # prompt tokens decoded along with the first generated ones
_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")  # sentencepiece byte-fallback piece
_MAX_UTF8_CONTINUATION = 3


def _is_continuation_byte(piece: str) -> bool:
    match = _BYTE_TOKEN.fullmatch(piece)
    return match is not None and int(match.group(1), 16) & 0xC0 == 0x80


def _prompt_context(tokenizer: Tokenizer, prompt_ids: Sequence[int], special: frozenset[int]) -> list[int]:
    """The prompt's last few (non-skipped) ids, not starting inside a character split over byte tokens."""
    tail = [i for i in prompt_ids[-(_PROMPT_CONTEXT_TOKENS + _MAX_UTF8_CONTINUATION) :] if i not in special]
    start = max(0, len(tail) - _PROMPT_CONTEXT_TOKENS)
    pieces = tokenizer.convert_ids_to_tokens(tail)
    while start > 0 and _is_continuation_byte(pieces[start]):
        start -= 1
    return tail[start:]


@dataclass(frozen=True)
class DetokenizerStep:
    """Result of one `add_tokens` call: text released now, and whether a stop string ended generation."""

    text: str
    stopped: bool = False
    stop_string: str | None = None


def _find_stop(text: str, stops: Sequence[str]) -> tuple[int, str] | None:
    """Earliest (index, stop) occurrence of any stop string in `text`; longest stop on ties."""
    best: tuple[int, str] | None = None
    for stop in stops:
        idx = text.find(stop)
        if idx >= 0 and (best is None or idx < best[0] or (idx == best[0] and len(stop) > len(best[1]))):
            best = (idx, stop)
    return best


def _is_unfinished_utf8(pieces: Sequence[str]) -> bool:
    """Whether `pieces` end with byte-fallback tokens that are valid UTF-8 but stop inside a character.

    Without trailing byte tokens (another tokenizer family) the answer is True: keep waiting, as vLLM does.
    """
    tail = bytearray()
    for piece in reversed(pieces):
        match = _BYTE_TOKEN.fullmatch(piece)
        if match is None:
            break
        tail.insert(0, int(match.group(1), 16))
    if not tail:
        return True
    decoder = codecs.getincrementaldecoder("utf-8")()
    try:
        decoder.decode(bytes(tail), final=False)
    except UnicodeDecodeError:
        return False  # invalid for good: release it as `tokenizer.decode` shows it (U+FFFD)
    return bool(decoder.getstate()[0])  # bytes buffered = an unfinished character


def _held_suffix_len(text: str, stops: Sequence[str]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of some stop string."""
    longest = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:n]):
                longest = n
                break
    return longest


class IncrementalDetokenizer:
    """Turns a stream of generated token ids into releasable text deltas for one request."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        prompt_ids: Sequence[int],
        stop: Sequence[str] = (),
        skip_special_tokens: bool = True,
    ) -> None:
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        self._special = frozenset(tokenizer.all_special_ids) if skip_special_tokens else frozenset()
        self._stops = (stop,) if isinstance(stop, str) else tuple(s for s in stop if s)
        # NOTE: skipped special ids are never stored, so a window never starts with an invisible token
        # (which would shift the leading-space strip onto the next token).
        self._ids = _prompt_context(tokenizer, prompt_ids, self._special)
        self._prefix_offset = 0
        self._read_offset = len(self._ids)
        self._held = ""  # decoded text not released yet: it may be the start of a stop string
        self._released: list[str] = []
        self._stopped = False

    @property
    def output_text(self) -> str:
        """All text released so far (the concatenation of every step's text and `flush()`)."""
        return "".join(self._released)

    @property
    def stopped(self) -> bool:
        """Whether a stop string has ended generation (later tokens are ignored)."""
        return self._stopped

    def add_tokens(self, token_ids: Sequence[int]) -> DetokenizerStep:
        """Feed newly generated tokens; return the text that may be sent to the client now."""
        if self._stopped:
            return DetokenizerStep("", True, None)
        self._ids.extend(i for i in token_ids if i not in self._special)
        self._held += self._decode_window(force=False)
        match = _find_stop(self._held, self._stops)
        if match is not None:
            idx, stop = match
            self._stopped = True
            return DetokenizerStep(self._release(idx), True, stop)
        keep = _held_suffix_len(self._held, self._stops)
        return DetokenizerStep(self._release(len(self._held) - keep))

    def flush(self) -> str:
        """Release everything held back (the request ended for another reason than a stop string)."""
        if self._stopped:
            return ""
        self._held += self._decode_window(force=True)
        match = _find_stop(self._held, self._stops)  # only possible via text forced out of a split character
        self._stopped = match is not None
        return self._release(len(self._held) if match is None else match[0])

    def _decode_window(self, force: bool) -> str:
        """New text from the token window; empty while a character is split across tokens (unless forced)."""
        if len(self._ids) == self._read_offset:
            return ""
        window = self._ids[self._prefix_offset :]
        prefix_text = self._tokenizer.decode(
            window[: self._read_offset - self._prefix_offset], skip_special_tokens=self._skip
        )
        full_text = self._tokenizer.decode(window, skip_special_tokens=self._skip)
        if full_text.endswith("\ufffd") and not force and self._pending_is_unfinished():
            return ""
        self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        self._trim()
        return full_text[len(prefix_text) :]

    def _pending_is_unfinished(self) -> bool:
        return _is_unfinished_utf8(self._tokenizer.convert_ids_to_tokens(self._ids[self._read_offset :]))

    def _trim(self) -> None:
        """Drop ids before the window so memory stays O(window)."""
        if self._prefix_offset > 0:
            del self._ids[: self._prefix_offset]
            self._read_offset -= self._prefix_offset
            self._prefix_offset = 0

    def _release(self, n: int) -> str:
        text, self._held = self._held[:n], self._held[n:]
        if text:
            self._released.append(text)
        return text
