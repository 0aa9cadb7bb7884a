"""The bytes each token contributes to the output text, read from the tokenizer's own decoder description.

Sentencepiece-style tokenizers (Llama, JetMoe): a byte-fallback piece ``<0xNN>`` is the byte NN, any other
piece is its UTF-8 with the space marker ``▁`` as a space. Byte-level BPE (GPT-2 style): each character of a
piece stands for one byte. Added tokens (special or not) are their content. The decoder's ``Strip`` step (the
dummy-prefix space of the text's first token) is reported as ``strip_leading``: it applies only at the very
start of a text. Other tokenizer families fall back to each token's decoded text (a character split across
tokens then shows as U+FFFD).
"""

from __future__ import annotations

import functools
import json
import re
from typing import Any

from model.tokenizer import Tokenizer

_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")
SPACE_MARKER = "\u2581"


@functools.lru_cache(maxsize=1)
def _byte_level_table() -> dict[str, int]:
    """GPT-2's byte <-> printable character table, inverted (character -> byte)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    chars = list(printable)
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars)}


def _decoder_steps(hf: Any) -> list[dict[str, Any]]:
    backend = getattr(hf, "backend_tokenizer", None)
    if backend is None:
        return []
    decoder = json.loads(backend.to_str()).get("decoder") or {}
    return list(decoder.get("decoders", [decoder])) if decoder else []


class TokenBytes:
    """Per-token bytes of one tokenizer (cached), and which ids are added tokens."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = tokenizer
        hf = tokenizer.hf
        steps = _decoder_steps(hf)
        kinds = {step.get("type") for step in steps}
        self.kind = "byte_level" if "ByteLevel" in kinds else (
            "sentencepiece" if "ByteFallback" in kinds or "Metaspace" in kinds or _replaces_marker(steps)
            else "other")
        self.strip_leading = sum(
            int(step.get("start", 0)) for step in steps if step.get("type") == "Strip" and step.get("content") == " "
        ) + sum(1 for step in steps if step.get("type") == "Metaspace" and step.get("prepend_scheme") != "never")
        self.special_ids = frozenset(tokenizer.all_special_ids)
        added = getattr(hf, "added_tokens_decoder", {}) or {}
        self.added: dict[int, str] = {int(i): str(getattr(t, "content", t)) for i, t in added.items()}
        self._cache: dict[int, bytes] = {}

    def of(self, token_id: int) -> bytes:
        """The bytes ``token_id`` adds to a text (b"" for ids the tokenizer does not know)."""
        cached = self._cache.get(token_id)
        if cached is None:
            cached = self._cache[token_id] = self._compute(token_id)
        return cached

    def is_added(self, token_id: int) -> bool:
        return token_id in self.added

    def _compute(self, token_id: int) -> bytes:
        if token_id in self.added:
            return self.added[token_id].encode("utf-8")
        piece = self._tokenizer.convert_ids_to_tokens([token_id])[0]
        if not piece:
            return b""
        if self.kind == "sentencepiece":
            match = _BYTE_PIECE.fullmatch(piece)
            return bytes([int(match.group(1), 16)]) if match else piece.replace(SPACE_MARKER, " ").encode("utf-8")
        if self.kind == "byte_level":
            table = _byte_level_table()
            if all(ch in table for ch in piece):
                return bytes(table[ch] for ch in piece)
            return piece.encode("utf-8")
        return self._decoded_after_anchor(token_id).encode("utf-8")

    def _decoded_after_anchor(self, token_id: int) -> str:
        """A token's text decoded after a fixed anchor token (so its leading space survives), anchor cut off."""
        anchor = self._tokenizer.encode("a", add_special_tokens=False)[-1:]
        head = self._tokenizer.decode(anchor, skip_special_tokens=False)
        text = self._tokenizer.decode(anchor + [token_id], skip_special_tokens=False)
        return text[len(head):] if text.startswith(head) else text


def _replaces_marker(steps: list[dict[str, Any]]) -> bool:
    return any(step.get("type") == "Replace" and step.get("pattern", {}).get("String") == SPACE_MARKER
               for step in steps)


@functools.lru_cache(maxsize=8)
def token_bytes_for(tokenizer: Tokenizer) -> TokenBytes:
    """One shared ``TokenBytes`` per tokenizer object."""
    return TokenBytes(tokenizer)
