"""Hard token masks of one sampling step: `allowed_token_ids`, `min_tokens` and `bad_words` (vLLM semantics).

All three become one boolean `[B, V]` mask, built from index lists (one entry per allowed id, blocked stop id
or bad-word ending: never a loop over the vocabulary) and applied with one `masked_fill` to -inf. They run
after penalties and logit_bias, so no bias can bring a masked token back.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from model.tokenizer import Tokenizer

if TYPE_CHECKING:
    from server.engine.sampler import SamplingRow

TokenSequences = tuple[tuple[int, ...], ...]


def bad_words_token_ids(tokenizer: Tokenizer, words: Sequence[str]) -> TokenSequences:
    """Token sequences of each word, as vLLM tokenizes them: the word without leading space, and with one
    when that gives a different first token but as many tokens (a word in the middle of a text)."""
    sequences: list[tuple[int, ...]] = []
    for word in words:
        plain = tuple(tokenizer.encode(word.lstrip(), add_special_tokens=False))
        if not plain:
            continue
        sequences.append(plain)
        spaced = tuple(tokenizer.encode(" " + word.lstrip(), add_special_tokens=False))
        if spaced and spaced[0] != plain[0] and len(spaced) == len(plain):
            sequences.append(spaced)
    return tuple(sequences)


def _banned_next(output_ids: Sequence[int], bad_words: TokenSequences) -> list[int]:
    """Last tokens of the bad words whose other tokens the output ends with."""
    banned = []
    for sequence in bad_words:
        head = len(sequence) - 1
        if head == 0 or (len(output_ids) >= head and tuple(output_ids[len(output_ids) - head :]) == sequence[:-1]):
            banned.append(sequence[-1])
    return banned


def _index(values: list[int], device: torch.device) -> torch.Tensor:
    pin = device.type == "cuda"
    return torch.tensor(values, dtype=torch.long, pin_memory=pin).to(device, non_blocking=pin)


def apply_token_masks(logits: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
    """Set masked tokens to -inf (out of place). `logits`: `[B, V]`; ids outside the vocabulary are ignored."""
    vocab = logits.shape[1]
    restricted: list[int] = []  # rows limited to allowed_token_ids
    allow_rows: list[int] = []
    allow_ids: list[int] = []
    block_rows: list[int] = []
    block_ids: list[int] = []
    for i, row in enumerate(rows):
        allowed = row.params.allowed_token_ids
        if allowed is not None:
            restricted.append(i)
            allow_rows.extend([i] * len(allowed))
            allow_ids.extend(allowed)
        blocked = list(row.min_tokens_blocked) if len(row.output_ids) < row.params.min_tokens else []
        blocked += _banned_next(row.output_ids, row.bad_words)
        block_rows.extend([i] * len(blocked))
        block_ids.extend(blocked)
    if not restricted and not block_ids:
        return logits
    device = logits.device
    mask = torch.zeros(len(rows), vocab + 1, dtype=torch.bool, device=device)  # [B, V + 1]; spare column
    if restricted:
        mask.index_fill_(0, _index(restricted, device), True)  # [B, V + 1]
        cols = _index(allow_ids, device).clamp_(max=vocab)  # [A]
        mask.index_put_((_index(allow_rows, device), cols), torch.tensor(False, device=device))
    if block_ids:
        cols = _index(block_ids, device).clamp_(max=vocab)  # [K]
        mask.index_put_((_index(block_rows, device), cols), torch.tensor(True, device=device))
    return logits.masked_fill(mask[:, :vocab], float("-inf"))  # [B, V]
