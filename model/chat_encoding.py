"""Chat prompts whose messages cannot forge control tokens.

A chat prompt is rendered to text and then tokenized, and a tokenizer turns every ``</s>``, ``<s>`` or other
special-token text it meets into that special token, wherever it came from. So a user who types ``</s>`` in a
message could end their turn early and write the next one. Here the template's own special tokens stay real
tokens, while the same text inside a message's content is tokenized as text.

How: the messages' content is located in the rendered prompt (the template is rendered once more with a
sentinel in place of each content and the two renderings are matched), the prompt is cut at the special tokens
outside the content, and the pieces between are tokenized with special-token parsing off, exactly as the
tokenizer itself tokenizes the pieces between special tokens (only the very first piece gets the
sentencepiece word marker). A prompt whose content holds no special-token text takes the ordinary path.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from tokenizers import Tokenizer as RawTokenizer

_SENTINEL = re.compile("\ue000(\\d+)\ue001")


class ChatContentError(ValueError):
    """The template changes message content, so content holding special-token text cannot be kept as text."""


def content_spans(rendered: str, sentinel_rendered: str, contents: Sequence[str]) -> list[tuple[int, int]] | None:
    """Where each message's content lies in ``rendered``, from the rendering with sentinels; None when the
    two renderings do not match up (the template transformed the content)."""
    spans, text, position = [], [], 0
    for match in _SENTINEL.finditer(sentinel_rendered):
        text.append(sentinel_rendered[position : match.start()])
        start = sum(len(t) for t in text)
        text.append(contents[int(match.group(1))])
        spans.append((start, start + len(text[-1])))
        position = match.end()
    text.append(sentinel_rendered[position:])
    return spans if "".join(text) == rendered else None


def special_cuts(text: str, specials: Mapping[str, int], spans: Sequence[tuple[int, int]]) -> list[tuple[int, int, int]]:
    """``(start, end, id)`` of every special-token text in ``text`` outside ``spans``, left to right."""
    if not specials:
        return []
    pattern = re.compile("|".join(re.escape(s) for s in sorted(specials, key=len, reverse=True)))
    inside = [range(a, b) for a, b in spans]
    return [
        (m.start(), m.end(), specials[m.group(0)])
        for m in pattern.finditer(text)
        if not any(m.start() in r for r in inside)
    ]


class ProtectedEncoder:
    """Tokenizes text pieces the way a fast tokenizer tokenizes the pieces between special tokens, with no
    special-token parsing inside them."""

    def __init__(self, backend: RawTokenizer) -> None:
        self._first = _clone(backend, keep_prefix=True)
        self._rest = _clone(backend, keep_prefix=False)

    def encode(self, text: str, cuts: Sequence[tuple[int, int, int]]) -> list[int]:
        ids: list[int] = []
        position = 0
        for start, end, token_id in [*cuts, (len(text), len(text), -1)]:
            piece = text[position:start]
            if piece:
                encoder = self._first if position == 0 else self._rest
                ids += encoder.encode(piece, add_special_tokens=False).ids
            if token_id >= 0:
                ids.append(token_id)
            position = end
        return ids


def _clone(backend: RawTokenizer, keep_prefix: bool) -> RawTokenizer:
    """A copy that reads special-token text as text, and (``keep_prefix`` off) adds no word marker in front."""
    spec = json.loads(backend.to_str())
    if not keep_prefix:
        _drop_prefix(spec)
    clone = RawTokenizer.from_str(json.dumps(spec))
    clone.encode_special_tokens = True
    return clone


def _drop_prefix(node: Any) -> None:
    """Metaspace pre-tokenizers stop prepending; a ``Prepend`` normalizer is removed."""
    if isinstance(node, dict):
        if node.get("type") == "Metaspace":
            node["prepend_scheme"] = "never"
            node["add_prefix_space"] = False
        for key, value in list(node.items()):
            if isinstance(value, dict) and value.get("type") == "Prepend":
                node[key] = None
            elif isinstance(value, list):
                node[key] = [v for v in value if not (isinstance(v, dict) and v.get("type") == "Prepend")]
                for v in node[key]:
                    _drop_prefix(v)
            else:
                _drop_prefix(value)


def encode_chat(
    render: Callable[[Sequence[Mapping[str, Any]]], str],
    messages: Sequence[Mapping[str, Any]],
    contents: Sequence[str],
    specials: Mapping[str, int],
    protected: Callable[[], ProtectedEncoder],
    encode_plain: Callable[[str], list[int]],
) -> list[int]:
    """Token ids of ``render(messages)`` with special-token text in ``contents`` kept as text (``protected``
    gives the encoder for that case, built on first use)."""
    rendered = render(messages)
    if not any(s in c for c in contents for s in specials):
        return encode_plain(rendered)
    marked = [{**m, "content": f"\ue000{i}\ue001"} for i, m in enumerate(messages)]
    spans = content_spans(rendered, render(marked), contents)
    if spans is None:
        raise ChatContentError("a message holds special-token text and the chat template changes message content")
    return protected().encode(rendered, special_cuts(rendered, specials, spans))
