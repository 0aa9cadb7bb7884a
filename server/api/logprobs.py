"""Token texts and the two OpenAI log-probability formats (legacy completions and chat).

A token's text is its decoded contribution to the text, leading space included: decoding one sentencepiece
token alone drops its leading space, so each token is decoded after a fixed anchor token and the anchor's
text is cut off (what vLLM's incremental detokenization yields for each token).
"""

from __future__ import annotations

import functools
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

    @functools.cached_property
    def special_ids(self) -> frozenset[int]:
        return frozenset(self.tokenizer.all_special_ids)

    def bytes(self, token_id: int) -> list[int]:
        return self._entry(token_id)[1]

    def label(self, token_id: int, as_id: bool) -> str:
        """How a logprob entry names the token: its text, or ``token_id:N`` (``return_tokens_as_token_ids``)."""
        return f"token_id:{token_id}" if as_id else self.text(token_id)

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
    texts: TokenTexts, token_ids: Sequence[int], entries: Sequence[TokenLogprob | None], offset: int,
    as_ids: bool = False, hidden: Sequence[bool] = (), lead: int = 0,
) -> tuple[dict[str, Any], int]:
    """Legacy ``logprobs`` object for ``token_ids`` (an entry may be None: the first prompt token).

    ``offset`` is where the first token starts in the choice's text; returns the object and the next offset.
    With ``as_ids`` tokens are named ``token_id:N`` (offsets still count the text). ``hidden[i]`` marks a
    token whose text is not in the choice's text (a skipped special token such as ``<s>``): it takes no room;
    ``lead`` characters of the first counted token are not in the text either (the space a sentencepiece text
    drops at its start).
    """
    result: dict[str, Any] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for i, (token_id, entry) in enumerate(zip(token_ids, entries)):
        label = texts.label(token_id, as_ids)
        result["tokens"].append(label)
        result["text_offset"].append(offset)
        if not (i < len(hidden) and hidden[i]):
            offset += len(texts.text(token_id)) - lead
            lead = 0
        if entry is None:
            result["token_logprobs"].append(None)
            result["top_logprobs"].append(None)
            continue
        top = {texts.label(t, as_ids): lp for t, lp in entry.top}
        top.setdefault(label, entry.logprob)  # as vLLM: the chosen token is always listed
        result["token_logprobs"].append(entry.logprob)
        result["top_logprobs"].append(top)
    return result, offset


def chat_logprobs(texts: TokenTexts, entries: Sequence[TokenLogprob], top_n: int,
                  as_ids: bool = False) -> list[dict[str, Any]]:
    """The ``content`` list of chat logprobs: each token with ``top_n`` alternatives.

    With ``as_ids`` each token is ``token_id:N`` and its ``bytes`` those of that string (as vLLM).
    """
    def entry(token_id: int, logprob: float) -> dict[str, Any]:
        label = texts.label(token_id, as_ids)
        raw = list(label.encode("utf-8")) if as_ids else texts.bytes(token_id)
        return {"token": label, "logprob": logprob, "bytes": raw}

    return [
        {**entry(e.token_id, e.logprob), "top_logprobs": [entry(t, lp) for t, lp in e.top[:top_n]]}
        for e in entries
    ]


def prompt_logprobs_field(texts: TokenTexts, entries: Sequence[TokenLogprob | None],
                          top_n: int) -> list[dict[str, dict[str, Any]] | None]:
    """vLLM's ``prompt_logprobs``: per prompt position None (the first) or ``{token id: {logprob, rank,
    decoded_token}}`` for the prompt's own token first, then the ``top_n`` most likely ones (ranks 1..top_n)."""
    field: list[dict[str, dict[str, Any]] | None] = []
    for e in entries:
        if e is None:
            field.append(None)
            continue
        position = {str(e.token_id): {"logprob": e.logprob, "rank": e.rank, "decoded_token": texts.text(e.token_id)}}
        position.update({str(t): {"logprob": lp, "rank": r + 1, "decoded_token": texts.text(t)}
                         for r, (t, lp) in enumerate(e.top[:top_n])})
        field.append(position)
    return field
