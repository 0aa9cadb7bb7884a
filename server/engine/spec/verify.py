"""Verifying proposed tokens in the step that computes them: one sampling row per verified position.

A sequence scheduled with proposals ``d_0..d_{m-1}`` gets ``m + 1`` logits rows: row ``j`` (after its last
known token and ``d_0..d_{j-1}``) gives the target distribution ``p_j`` of the token at output position
``len(output) + j``. Each row is sampled exactly as a plain decode step at that position would be: penalties,
bias, masks, bad words and ``min_tokens`` see ``output + d_0..d_{j-1}``, the grammar row is its matcher's
state after those tokens, and a seeded sequence's ``j``-th draw is its generator's next one.

Acceptance (``accepted_length``): ``d_j`` is kept while the row's sampled token ``y_j`` equals it; the first
``y_j`` that differs (or ``y_m`` when all were kept) is the model's own next token. For greedy rows this is
"the longest prefix equal to the argmax, plus the argmax after it". For sampled rows it is rejection sampling
with a point-mass proposal: ``y_j`` is drawn from ``p_j``, so ``d_j`` is accepted with probability
``p_j(d_j) = min(1, p_j(d_j) / q(d_j))``, and given a rejection ``y_j`` is distributed as ``p_j`` without
``d_j``, renormalised: the residual ``max(0, p_j - q)`` normalised. Every emitted token is thus distributed as
without speculation, and because the draws are the ones the plain steps would make (``rewind_generators``
hands back the unused ones) a seeded sequence gets the very same tokens with or without proposals, alone or
in any batch.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
import xgrammar as xgr

from server.engine.sampler import SamplingRow
from server.engine.structured.matcher import GrammarState


class PrefilledMask:
    """One verified position's grammar mask, filled before the step (the sampler copies it into its bitmask)."""

    def __init__(self, masks: torch.Tensor, row: int) -> None:
        self.masks = masks  # [m + 1, ceil(V / 32)] int32
        self.row = row

    def fill(self, bitmask: torch.Tensor, row: int) -> None:
        bitmask[row].copy_(self.masks[self.row])  # [ceil(V / 32)]


def grammar_masks(grammar: GrammarState, draft: Sequence[int], vocab_size: int) -> list[PrefilledMask]:
    """The grammar's allowed tokens after each prefix ``draft[:j]``, j = 0..m; the matcher ends where it began.

    A proposed token the grammar refuses (or one after which it is complete) ends the walk: the rows after it
    repeat the last mask, and they are never used, since that row's sampled token cannot be the refused one.
    """
    masks = xgr.allocate_token_bitmask(len(draft) + 1, vocab_size)  # [m + 1, ceil(V / 32)] int32
    grammar.fill(masks, 0)
    walked = filled = 0
    for token in draft:
        if not grammar.accept(token):
            break
        walked += 1
        if grammar.is_terminated:
            break
        grammar.fill(masks, walked)
        filled = walked
    masks[filled + 1 :] = masks[filled]  # [m - filled, ceil(V / 32)]
    grammar.rollback(walked)
    return [PrefilledMask(masks, j) for j in range(len(draft) + 1)]


def verification_rows(row: SamplingRow, draft: Sequence[int], vocab_size: int) -> list[SamplingRow]:
    """The ``len(draft) + 1`` sampling rows of a sequence (its own ``row`` when nothing was proposed)."""
    if not draft:
        return [row]
    masks = grammar_masks(row.grammar, draft, vocab_size) if isinstance(row.grammar, GrammarState) else None
    output = list(row.output_ids)
    return [
        dataclasses.replace(row, output_ids=output + list(draft[:j]), grammar=masks[j] if masks else row.grammar)
        for j in range(len(draft) + 1)
    ]


def accepted_length(sampled: Sequence[int], draft: Sequence[int]) -> int:
    """How many proposed tokens are kept: the longest prefix of ``draft`` that ``sampled`` (one per row) repeats."""
    for j, token in enumerate(draft):
        if sampled[j] != token:
            return j
    return len(draft)


def rewindable_generator(rows: Sequence[SamplingRow]) -> torch.Generator | None:
    """The generator a sequence's verification draws from and may give draws back to: seeded, sampled (greedy
    rows draw nothing) and with proposed tokens (``rows``: its verification rows)."""
    row = rows[0]
    return row.generator if len(rows) > 1 and not row.params.greedy else None


def rewind_generators(saved: Sequence[tuple[torch.Generator, torch.Tensor, int]], vocab_size: int) -> None:
    """Give back the draws of rows past a rejection: restore each generator's state from before the step and
    repeat the ``used`` draws the kept rows made (the sampler draws one ``[V]`` vector per row, in row order)."""
    for generator, state, used in saved:
        generator.set_state(state)
        scratch = torch.empty(vocab_size, device=generator.device)  # [V]
        for _ in range(used):
            scratch.exponential_(generator=generator)
