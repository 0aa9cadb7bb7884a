"""Per-sequence grammar state and the batched token bitmask the sampler applies."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch
import xgrammar as xgr


class TokenBitmaskSource(Protocol):
    """Whatever writes one row of allowed next tokens: a ``GrammarState``, or a mask prepared in advance."""

    def fill(self, bitmask: torch.Tensor, row: int) -> None: ...


class GrammarState:
    """One sequence's position in its grammar: which tokens may come next, advanced on each sampled token.

    The engine keeps a sequence's generated tokens through preemption (it recomputes their K/V, it does not
    sample them again), so the state stays in step with them; ``replay`` rebuilds it from scratch for code
    that has only the tokens.
    """

    def __init__(self, grammar: xgr.CompiledGrammar) -> None:
        self._grammar = grammar
        self._matcher = xgr.GrammarMatcher(grammar)
        self.num_accepted = 0

    def fill(self, bitmask: torch.Tensor, row: int) -> None:
        """Write the allowed next tokens into row ``row`` of ``bitmask`` (``[B, ceil(V / 32)]`` int32)."""
        self._matcher.fill_next_token_bitmask(bitmask, row)

    def accept(self, token_id: int) -> bool:
        """Advance on ``token_id``; False (and no change) when the grammar does not allow it."""
        if self._matcher.accept_token(token_id):
            self.num_accepted += 1
            return True
        return False

    def rollback(self, num_tokens: int) -> None:
        """Undo the last ``num_tokens`` accepted tokens (speculative walks through proposed tokens)."""
        if num_tokens:
            self._matcher.rollback(num_tokens)
            self.num_accepted -= num_tokens

    @property
    def is_terminated(self) -> bool:
        """The grammar has been completed and its end (a stop token) accepted."""
        return self._matcher.is_terminated()

    def replay(self, token_ids: Sequence[int]) -> bool:
        """Reset to the start and accept ``token_ids``; False if one of them is not allowed."""
        self._matcher.reset()
        self.num_accepted = 0
        return all(self.accept(t) for t in token_ids)


def apply_grammar_bitmask(logits: torch.Tensor, grammars: Sequence[TokenBitmaskSource | None]) -> torch.Tensor:
    """Tokens a row's grammar forbids get -inf (out of place); rows without a grammar are untouched.

    ``logits``: ``[B, V]`` float32, ``grammars``: one entry per row. One bitmask of the whole batch is filled on
    the host (bits set = allowed), copied once and applied by xgrammar's kernel to the constrained rows only.
    """
    rows = [i for i, grammar in enumerate(grammars) if grammar is not None]
    if not rows:
        return logits
    bitmask = xgr.allocate_token_bitmask(len(grammars), logits.shape[1])  # [B, ceil(V / 32)] int32
    for i in rows:
        grammar = grammars[i]
        assert grammar is not None
        grammar.fill(bitmask, i)
    masked = logits.clone()  # [B, V]; the caller's logits may be the model's output buffer
    device_mask = bitmask.to(logits.device, non_blocking=logits.device.type == "cuda")
    xgr.apply_token_bitmask_inplace(masked, device_mask, indices=rows)
    return masked
