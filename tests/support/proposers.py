"""Proposers for speculation tests: known continuations, with wrong tokens placed so that proposals are kept
in full, in part and not at all (a random checkpoint rarely continues an n-gram by itself)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from server.engine.request import Request


class ReferenceProposer:
    """Proposes each sequence's known continuation (``references[key]``: the output tokens a run without
    speculation produced, or transformers' greedy tokens) with one token made wrong at a position that cycles
    through the proposal and past it (then the whole proposal is right)."""

    def __init__(self, references: Mapping[tuple[str, int], Sequence[int]], vocab_size: int,
                 wrong_every: int = 2) -> None:
        self.references = references
        self.vocab_size = vocab_size
        self.wrong_every = wrong_every
        self.proposed = 0

    def propose(self, request: Request, num_tokens: int) -> list[int]:
        reference = self.references.get(request.key, ())
        done = len(request.output_ids)
        draft = list(reference[done : done + num_tokens])
        wrong = (done * 7 + request.index * 3 + len(request.prompt_ids)) % (num_tokens + self.wrong_every)
        if wrong < len(draft):
            draft[wrong] = (draft[wrong] + 1) % self.vocab_size
        self.proposed += len(draft)
        return draft

    def drop(self, key: tuple[str, int]) -> None:
        """Nothing is kept per sequence."""
