"""Token texts and the two OpenAI log-probability formats (legacy completions and chat).

A token's text is its decoded contribution to the text, leading space included: decoding one sentencepiece
token alone drops its leading space, so each token is decoded after a fixed anchor token and the anchor's
text is cut off (what vLLM's incremental detokenization yields for each token).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from model.tokenizer import Tokenizer
from server.engine.request import TokenLogprob

_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


class TokenTexts:
    """Cached text (and UTF-8 bytes) of single tokens."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self._anchor = _pick_anchor(tokenizer)
        self._anchor_text = tokenizer.decode(self._anchor, skip_special_tokens=False)
        self._cache: dict[int, tuple[str, list[int]]] = {}

    def text(self, token_id: int) -> str:
        return self._entry(token_id)[0]

    def bytes(self, token_id: int) -> list[int]:
        return self._entry(token_id)[1]

    def _entry(self, token_id: int) -> tuple[str, list[int]]:
        entry = self._cache.get(token_id)
        if entry is None:
            text = self.tokenizer.decode(self._anchor + [token_id], skip_special_tokens=False)
            text = text[len(self._anchor_text):] if text.startswith(self._anchor_text) else text
            piece = self.tokenizer.convert_ids_to_tokens([token_id])[0]
            match = _BYTE_PIECE.fullmatch(piece or "")
            raw = [int(match.group(1), 16)] if match else list(text.encode("utf-8"))
            entry = self._cache[token_id] = (text, raw)
        return entry


def _pick_anchor(tokenizer: Tokenizer) -> list[int]:
    ids = tokenizer.encode("a", add_special_tokens=False)
    return ids[-1:] if ids else []


def completion_logprobs(
    texts: TokenTexts, token_ids: Sequence[int], entries: Sequence[TokenLogprob | None], offset: int
) -> tuple[dict[str, Any], int]:
    """Legacy ``logprobs`` object for ``token_ids`` (an entry may be None: the first prompt token).

    ``offset`` is where the first token starts in the choice's text; returns the object and the next offset.
    """
    result: dict[str, Any] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for token_id, entry in zip(token_ids, entries):
        text = texts.text(token_id)
        result["tokens"].append(text)
        result["text_offset"].append(offset)
        offset += len(text)
        if entry is None:
            result["token_logprobs"].append(None)
            result["top_logprobs"].append(None)
            continue
        top = {texts.text(t): lp for t, lp in entry.top}
        top.setdefault(text, entry.logprob)  # as vLLM: the chosen token is always listed
        result["token_logprobs"].append(entry.logprob)
        result["top_logprobs"].append(top)
    return result, offset


def chat_logprobs(texts: TokenTexts, entries: Sequence[TokenLogprob], top_n: int) -> list[dict[str, Any]]:
    """The ``content`` list of chat logprobs: each token with ``top_n`` alternatives."""
    return [
        {
            "token": texts.text(e.token_id),
            "logprob": e.logprob,
            "bytes": texts.bytes(e.token_id),
            "top_logprobs": [
                {"token": texts.text(t), "logprob": lp, "bytes": texts.bytes(t)} for t, lp in e.top[:top_n]
            ],
        }
        for e in entries
    ]
