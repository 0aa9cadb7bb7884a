"""N-gram (prompt lookup) proposals from a sequence's own prompt + output.

The sequence's last ``n`` tokens are looked up in the earlier tokens, ``n`` from ``max_n`` down to
``min_n``; the most recent earlier occurrence of the longest matching ``n`` wins, and the proposal is what
followed it. When the occurrence is so recent that its continuation runs into the end of the sequence (a
loop), the continuation goes on through the proposed tokens themselves, i.e. it repeats the loop.

Each sequence's tokens are kept as a ``str`` of one character per token id (``chr(id)``; ids up to 0x10FFFF,
lone surrogates included, are valid characters), so the lookup is ``str.rfind``: C speed, no copy.
"""

from __future__ import annotations

from server.engine.request import Request


def ngram_lookup(text: str, num_tokens: int, min_n: int, max_n: int) -> list[int]:
    """Up to ``num_tokens`` ids proposed to follow ``text`` (one character per token id); may be empty."""
    length = len(text)
    if num_tokens < 1:
        return []
    for n in range(min(max_n, length - 1), min_n - 1, -1):
        start = text.rfind(text[length - n :], 0, length - 1)  # an occurrence that ends before the last token
        if start < 0:
            continue
        follow = start + n
        proposal = [ord(c) for c in text[follow : follow + num_tokens]]
        period = length - follow
        while len(proposal) < num_tokens:  # the match's continuation reached the end: repeat the loop
            proposal.append(proposal[len(proposal) - period])
        return proposal
    return []


class NgramProposer:
    """Proposes from each sequence's own tokens; keeps one token string per sequence in flight."""

    def __init__(self, min_n: int, max_n: int) -> None:
        self.min_n = min_n
        self.max_n = max_n
        self._texts: dict[tuple[str, int], str] = {}

    def propose(self, request: Request, num_tokens: int) -> list[int]:
        """Up to ``num_tokens`` ids to follow ``request``'s prompt + output."""
        return ngram_lookup(self._text(request), num_tokens, self.min_n, self.max_n)

    def drop(self, key: tuple[str, int]) -> None:
        """Forget a sequence that ended."""
        self._texts.pop(key, None)

    def _text(self, request: Request) -> str:
        text = self._texts.get(request.key)
        if text is None:
            text = "".join(map(chr, request.prompt_ids))
        known = len(text) - request.num_prompt_tokens  # output tokens already in the string
        if known < len(request.output_ids):
            text += "".join(map(chr, request.output_ids[known:]))  # outputs only grow: append what is new
        self._texts[request.key] = text
        return text
