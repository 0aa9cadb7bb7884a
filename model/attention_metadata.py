"""Description of one flat, ragged batch for paged attention.

A step concatenates the new tokens of every scheduled sequence into one flat batch of ``T`` tokens.
Sequence ``i`` contributes ``query_lens[i]`` new tokens whose positions are
``context_lens[i] - query_lens[i] .. context_lens[i] - 1``; ``context_lens[i]`` counts the tokens already in the
KV cache plus the new ones. A decode is simply a sequence with one new token.

KV cache layout (one tensor per layer): ``[2, num_blocks, block_size, num_kv_heads, head_dim]``; index 0 holds
K (after rotary), index 1 holds V. Token ``p`` of a sequence lives in block ``block_table[p // block_size]`` at
offset ``p % block_size``; its flat slot is ``block * block_size + offset``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class DecodeGroup:
    """The sequences of a batch that add exactly one token, batched for one attention call."""

    token_index: torch.Tensor  # [b] flat index of each decode token
    context_lens: torch.Tensor  # [b] int32 keys each decode token attends to
    block_tables: torch.Tensor  # [b, max_blocks]
    valid: torch.Tensor  # [b, max_blocks * block_size] True where the key position is inside the context


@dataclass(frozen=True)
class PrefillSlice:
    """One sequence that adds several tokens (a prompt or a chunk of one)."""

    token_start: int
    query_len: int
    context_len: int
    block_ids: torch.Tensor  # [ceil(context_len / block_size)]
    causal: torch.Tensor  # [query_len, context_len] True where query i may attend key j


@dataclass(frozen=True)
class AttentionMetadata:
    """Everything attention needs to know about a flat batch; built once per step, shared by all layers."""

    block_size: int
    query_lens: tuple[int, ...]
    context_lens: tuple[int, ...]
    query_start_loc: torch.Tensor  # [B + 1] int32 offsets of each sequence's tokens in the flat batch
    seq_lens: torch.Tensor  # [B] int32 context length of each sequence
    block_tables: torch.Tensor  # [B, max_blocks] int32, padded with 0
    slot_mapping: torch.Tensor  # [T] int64 cache slot of each new token
    logits_indices: torch.Tensor  # [N] int64 flat indices whose logits are wanted
    decode: DecodeGroup | None
    prefills: tuple[PrefillSlice, ...]

    @property
    def num_tokens(self) -> int:
        return int(sum(self.query_lens))


def build_flat_batch(
    query_lens: Sequence[int],
    context_lens: Sequence[int],
    block_tables: Sequence[Sequence[int]],
    block_size: int,
    device: torch.device | str = "cpu",
    all_logits: bool = False,
    logits_indices: Sequence[int] | None = None,
) -> tuple[torch.Tensor, AttentionMetadata]:
    """Positions ``[T]`` and attention metadata for a ragged batch.

    Logits are computed at ``logits_indices`` (flat token indices) when given, at every token with
    ``all_logits``, and otherwise at the last token of each sequence.
    """
    _check_batch(query_lens, context_lens, block_tables, block_size)
    num_seqs = len(query_lens)
    q_lens = torch.tensor(query_lens, dtype=torch.int64)  # [B]
    ctx_lens = torch.tensor(context_lens, dtype=torch.int64)  # [B]
    starts = torch.zeros(num_seqs + 1, dtype=torch.int64)  # [B + 1]
    torch.cumsum(q_lens, 0, out=starts[1:])
    max_blocks = max(len(t) for t in block_tables)
    tables = torch.zeros(num_seqs, max_blocks, dtype=torch.int64)  # [B, max_blocks]
    for i, table in enumerate(block_tables):
        tables[i, : len(table)] = torch.tensor(table, dtype=torch.int64)
    total = int(starts[-1])
    seq_of_token = torch.repeat_interleave(torch.arange(num_seqs), q_lens)  # [T]
    positions = torch.arange(total) - starts[seq_of_token] + (ctx_lens - q_lens)[seq_of_token]  # [T]
    blocks = tables[seq_of_token, positions // block_size]  # [T]
    slots = blocks * block_size + positions % block_size  # [T]
    if logits_indices is not None:
        logits_idx = torch.tensor(logits_indices, dtype=torch.int64)  # [N]
    else:
        logits_idx = torch.arange(total) if all_logits else starts[1:] - 1  # [N]
    meta = AttentionMetadata(
        block_size=block_size,
        query_lens=tuple(int(q) for q in query_lens),
        context_lens=tuple(int(c) for c in context_lens),
        query_start_loc=starts.to(device=device, dtype=torch.int32),
        seq_lens=ctx_lens.to(device=device, dtype=torch.int32),
        block_tables=tables.to(device=device, dtype=torch.int32),
        slot_mapping=slots.to(device),
        logits_indices=logits_idx.to(device),
        decode=_decode_group(query_lens, context_lens, starts, tables, block_size, device),
        prefills=_prefill_slices(query_lens, context_lens, starts, tables, block_size, device),
    )
    return positions.to(device), meta


def _check_batch(
    query_lens: Sequence[int],
    context_lens: Sequence[int],
    block_tables: Sequence[Sequence[int]],
    block_size: int,
) -> None:
    if not (len(query_lens) == len(context_lens) == len(block_tables)) or not query_lens:
        raise ValueError("query_lens, context_lens and block_tables must be non-empty and of equal length")
    for q, c, table in zip(query_lens, context_lens, block_tables):
        if q < 1 or c < q:
            raise ValueError(f"invalid sequence: {q} new tokens with context length {c}")
        if len(table) * block_size < c:
            raise ValueError(f"block table of {len(table)} blocks cannot hold {c} tokens")


def _decode_group(
    query_lens: Sequence[int],
    context_lens: Sequence[int],
    starts: torch.Tensor,
    tables: torch.Tensor,
    block_size: int,
    device: torch.device | str,
) -> DecodeGroup | None:
    rows = [i for i, q in enumerate(query_lens) if q == 1]
    if not rows:
        return None
    rows_t = torch.tensor(rows, dtype=torch.int64)  # [b]
    needed = max((context_lens[i] + block_size - 1) // block_size for i in rows)
    sub_tables = tables[rows_t, :needed]  # [b, needed]
    ctx = torch.tensor([context_lens[i] for i in rows], dtype=torch.int64)  # [b]
    valid = torch.arange(needed * block_size)[None, :] < ctx[:, None]  # [b, S]
    return DecodeGroup(
        token_index=starts[rows_t].to(device),
        context_lens=ctx.to(device=device, dtype=torch.int32),
        block_tables=sub_tables.to(device),
        valid=valid.to(device),
    )


def _prefill_slices(
    query_lens: Sequence[int],
    context_lens: Sequence[int],
    starts: torch.Tensor,
    tables: torch.Tensor,
    block_size: int,
    device: torch.device | str,
) -> tuple[PrefillSlice, ...]:
    slices = []
    for i, (q, c) in enumerate(zip(query_lens, context_lens)):
        if q == 1:
            continue
        num_blocks = (c + block_size - 1) // block_size
        key_pos = torch.arange(c)  # [C]
        query_pos = torch.arange(c - q, c)  # [Q]
        slices.append(
            PrefillSlice(
                token_start=int(starts[i]),
                query_len=q,
                context_len=c,
                block_ids=tables[i, :num_blocks].to(device),
                causal=(key_pos[None, :] <= query_pos[:, None]).to(device),  # [Q, C]
            )
        )
    return tuple(slices)
