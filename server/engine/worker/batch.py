"""A step's flat ragged batch: positions, cache slots and the backend's attention metadata.

See ``model.layers.attention`` for the batch layout and the KV cache layout. The runner builds a ``FlatBatch``
(the part every backend shares) once per step, and the model's attention backend turns it into its own
metadata (``AttentionBackend.build_metadata``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from model.layers.attention import AttentionBackend, AttentionMetadata, FlatBatch


def build_flat_batch(
    backend: AttentionBackend,
    query_lens: Sequence[int],
    context_lens: Sequence[int],
    block_tables: Sequence[Sequence[int]],
    block_size: int,
    device: torch.device | str = "cpu",
    all_logits: bool = False,
    logits_indices: Sequence[int] | None = None,
) -> tuple[torch.Tensor, AttentionMetadata]:
    """Positions ``[T]`` and ``backend``'s attention metadata for a ragged batch.

    Logits are computed at ``logits_indices`` (flat token indices) when given, at every token with
    ``all_logits``, and otherwise at the last token of each sequence.
    """
    positions, batch = flat_batch(
        query_lens, context_lens, block_tables, block_size, device, all_logits, logits_indices
    )
    return positions, backend.build_metadata(batch)


def flat_batch(
    query_lens: Sequence[int],
    context_lens: Sequence[int],
    block_tables: Sequence[Sequence[int]],
    block_size: int,
    device: torch.device | str = "cpu",
    all_logits: bool = False,
    logits_indices: Sequence[int] | None = None,
) -> tuple[torch.Tensor, FlatBatch]:
    """Positions ``[T]`` and the backend-independent ``FlatBatch`` (see ``build_flat_batch``)."""
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
    batch = FlatBatch(
        block_size=block_size,
        query_lens=tuple(int(q) for q in query_lens),
        context_lens=tuple(int(c) for c in context_lens),
        query_start_loc=starts.to(device=device, dtype=torch.int32),
        seq_lens=ctx_lens.to(device=device, dtype=torch.int32),
        block_tables=tables.to(device=device, dtype=torch.int32),
        slot_mapping=slots.to(device),
        logits_indices=logits_idx.to(device),
        host_block_tables=tables,
    )
    return positions.to(device), batch


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
