"""Incremental detokenization that never loses a character, with stop strings.

1. Text from tokens. Each generated token contributes its bytes (``token_bytes``: a byte-fallback token its
   byte, other pieces their UTF-8 with the space marker as a space, kept special tokens their content), and
   one incremental UTF-8 decoder with ``errors="replace"`` turns the byte stream into text. So the
   concatenation of every delta is exactly ``b"".join(bytes of each token).decode("utf-8", "replace")``: a
   character split across tokens is held until complete, an invalid byte becomes one U+FFFD and the valid
   bytes after it stay themselves (``0xE6 0x54`` is ``"\\ufffdT"``). The prompt is the context: the decoder's
   dummy-prefix strip applies only when the prompt shows no text (e.g. BOS alone), as ``tokenizer.decode`` of
   the whole sequence does; otherwise a leading space marker is a space.
   With ``spaces_between_special_tokens`` (when special tokens are kept), an added token is set off from the
   text next to it by one space, as transformers' slow tokenizers join their segments.
2. Stop strings: text that could still be the beginning of a stop string is held back. Generation stops as
   soon as a stop string is complete; among the matches completed by one step, the earliest one wins. The
   stop string (unless ``include_stop_str_in_output``) and everything after it are never released. Stop
   strings are only looked for once more than ``min_tokens`` tokens were generated.
"""

from __future__ import annotations

import codecs
from collections.abc import Sequence
from dataclasses import dataclass

from model.tokenizer import Tokenizer
from server.engine.token_bytes import TokenBytes, token_bytes_for


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
        *,
        include_stop_str_in_output: bool = False,
        spaces_between_special_tokens: bool = True,
        min_tokens: int = 0,
        token_bytes: TokenBytes | None = None,
    ) -> None:
        self._bytes = token_bytes or token_bytes_for(tokenizer)
        self._skip = skip_special_tokens
        self._spaces = spaces_between_special_tokens and not skip_special_tokens
        self._stops = (stop,) if isinstance(stop, str) else tuple(s for s in stop if s)
        self._include_stop = include_stop_str_in_output
        self._min_tokens = min_tokens
        self._num_tokens = 0
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._strip = 0  # leading spaces still to strip: only while no text has been shown at all
        self._last_added: bool | None = None  # whether the last visible token was an added token
        self._seed_context(prompt_ids)
        self._held = ""  # decoded text not released yet: it may be the start of a stop string
        self._released: list[str] = []
        self._stopped = False

    def _seed_context(self, prompt_ids: Sequence[int]) -> None:
        for token in reversed(prompt_ids):
            if self._visible(token) and self._bytes.of(token):
                self._last_added = self._bytes.is_added(token)
                return
        self._strip = self._bytes.strip_leading

    def _visible(self, token: int) -> bool:
        return not (self._skip and token in self._bytes.special_ids)

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
        self._num_tokens += len(token_ids)
        self._held += self._decoder.decode(b"".join(self._token_bytes(t) for t in token_ids))
        return self._settle(final=False)

    def flush(self) -> str:
        """Release everything held back (the request ended for another reason than a stop string)."""
        if self._stopped:
            return ""
        self._held += self._decoder.decode(b"", final=True)  # an unfinished character: U+FFFD
        return self._settle(final=True).text

    def _settle(self, final: bool) -> DetokenizerStep:
        match = _find_stop(self._held, self._stops) if self._num_tokens > self._min_tokens else None
        if match is not None:
            idx, stop = match
            self._stopped = True
            return DetokenizerStep(self._release(idx + len(stop) if self._include_stop else idx), True, stop)
        keep = 0 if final else _held_suffix_len(self._held, self._stops)
        return DetokenizerStep(self._release(len(self._held) - keep))

    def _token_bytes(self, token: int) -> bytes:
        if not self._visible(token):
            return b""
        data = self._bytes.of(token)
        if not data:
            return b""
        added = self._bytes.is_added(token)
        beside_added = self._last_added is not None and (added or self._last_added)
        if self._spaces and beside_added and not data.startswith(b" "):
            data = b" " + data
        self._last_added = added
        while self._strip and data.startswith(b" "):
            data, self._strip = data[1:], self._strip - 1
        self._strip = 0
        return data

    def _release(self, n: int) -> str:
        text, self._held = self._held[:n], self._held[n:]
        if text:
            self._released.append(text)
        return text
