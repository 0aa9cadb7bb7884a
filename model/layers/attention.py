"""Paged attention: the flat ragged batch, the backend seam and the PyTorch reference backend.

A step concatenates the new tokens of every scheduled sequence into one flat batch of ``T`` tokens
(``FlatBatch``). Sequence ``i`` contributes ``query_lens[i]`` new tokens at positions
``context_lens[i] - query_lens[i] .. context_lens[i] - 1``; ``context_lens[i]`` counts the tokens already in the
KV cache plus the new ones. A decode is a sequence with one new token.

KV cache layout (one tensor per layer): ``[2, num_blocks, block_size, num_kv_heads, head_dim]``; index 0 holds
K (after rotary), index 1 holds V. Token ``p`` of a sequence lives in block ``block_table[p // block_size]`` at
offset ``p % block_size``; its flat slot is ``block * block_size + offset``.

``AttentionBackend`` is the seam for fast kernels. The runner describes a step as a ``FlatBatch`` and the
backend turns it into its own metadata once per step (``build_metadata``; ``build_decode_metadata`` for an
all-decode step read only from tensors, which CUDA graphs can capture); each layer then calls
``rotate_and_write`` and ``attend``. ``TorchPagedAttention`` is the reference: it runs on any device and is the
oracle for the others.

JetMoe head mapping: attention has ``top_k x num_kv_heads`` query heads; query head ``h`` reads KV head
``h % num_kv_heads`` (the KV heads are tiled over the attention experts, not interleaved). The reference path
folds the ``top_k`` expert copies into the query-length axis, so every KV head attends to ``top_k x q_len``
queries and no K/V copy is needed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F

from model.layers.rotary import apply_rotary


@dataclass(frozen=True)
class FlatBatch:
    """One step's flat ragged batch, as every backend sees it (built by the runner, once per step).

    ``query_lens``/``context_lens`` are host values; on a batch replayed from a CUDA graph they are placeholders
    and only the tensors are real (see ``AttentionBackend.build_decode_metadata``).
    """

    block_size: int
    query_lens: tuple[int, ...]
    context_lens: tuple[int, ...]
    query_start_loc: torch.Tensor  # [B + 1] int32 offsets of each sequence's tokens in the flat batch
    seq_lens: torch.Tensor  # [B] int32 context length of each sequence
    block_tables: torch.Tensor  # [B, max_blocks] int32, padded
    slot_mapping: torch.Tensor  # [T] int64 cache slot of each new token
    logits_indices: torch.Tensor  # [N] int64 flat indices whose logits are wanted
    host_block_tables: torch.Tensor  # [B, max_blocks] int64 on the host (for slicing per sequence)


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
    """What every backend's metadata holds: the batch, and its prefills (served by the shared SDPA path)."""

    batch: FlatBatch
    prefills: tuple[PrefillSlice, ...]

    @property
    def logits_indices(self) -> torch.Tensor:
        return self.batch.logits_indices

    @property
    def slot_mapping(self) -> torch.Tensor:
        return self.batch.slot_mapping


class AttentionBackend(Protocol):
    """Builds its metadata for a step, writes new K/V into a layer's paged cache and computes attention."""

    # Whether an all-decode forward over ``build_decode_metadata`` may be captured in a CUDA graph.
    supports_cuda_graphs: bool

    def build_metadata(self, batch: FlatBatch) -> AttentionMetadata:
        """Metadata for any mix of prefills and decodes (may read the host lengths)."""
        ...

    def build_decode_metadata(self, batch: FlatBatch) -> AttentionMetadata:
        """Metadata for a step where every sequence adds one token, derived from the batch's tensors only."""
        ...

    def rotate_and_write(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        rotary: tuple[torch.Tensor, torch.Tensor],
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotary ``(cos, sin)`` ``[T, Dh]`` applied to ``query`` ``[T, top_k, Hkv, Dh]`` and ``key``
        ``[T, Hkv, Dh]``, the rotated key and ``value`` stored at ``meta.slot_mapping``; returns the rotated
        ``(query, key)``."""
        ...

    def attend(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor:
        """Attention output ``[T, top_k, Hkv, Dh]`` for ``query`` ``[T, top_k, Hkv, Dh]``.

        ``key``/``value`` are this step's new K/V ``[T, Hkv, Dh]`` (already in the cache too).
        """
        ...


def allocate_kv_cache(
    num_layers: int,
    num_blocks: int,
    block_size: int,
    num_kv_heads: int,
    head_dim: int,
    dtype: torch.dtype,
    device: torch.device | str,
) -> list[torch.Tensor]:
    """One zeroed ``[2, num_blocks, block_size, Hkv, Dh]`` tensor per layer."""
    shape = (2, num_blocks, block_size, num_kv_heads, head_dim)
    return [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]


def kv_cache_bytes_per_block(
    num_layers: int, block_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype
) -> int:
    """Bytes one block takes across all layers (K and V)."""
    element = torch.empty((), dtype=dtype).element_size()
    return 2 * num_layers * block_size * num_kv_heads * head_dim * element


def prefill_slices(batch: FlatBatch) -> tuple[PrefillSlice, ...]:
    """The sequences of ``batch`` that add several tokens, with their blocks and causal masks."""
    device = batch.slot_mapping.device
    slices, start = [], 0
    for i, (q, c) in enumerate(zip(batch.query_lens, batch.context_lens)):
        if q > 1:
            num_blocks = -(-c // batch.block_size)
            key_pos = torch.arange(c)  # [C]
            query_pos = torch.arange(c - q, c)  # [Q]
            slices.append(
                PrefillSlice(
                    token_start=start,
                    query_len=q,
                    context_len=c,
                    block_ids=batch.host_block_tables[i, :num_blocks].to(device),
                    causal=(key_pos[None, :] <= query_pos[:, None]).to(device),  # [Q, C]
                )
            )
        start += q
    return tuple(slices)


@dataclass(frozen=True)
class DecodeRows:
    """The sequences of a batch that add exactly one token."""

    token_index: torch.Tensor  # [b] flat index of each decode token, on the batch's device
    block_tables: torch.Tensor  # [b, width] their blocks, width = the longest of their contexts
    context_lens: list[int]  # [b] keys each decode token attends to, on the host


def decode_rows(batch: FlatBatch) -> DecodeRows | None:
    """The decodes of ``batch`` (None without any), read from its host lengths."""
    rows, tokens, start = [], [], 0
    for i, q in enumerate(batch.query_lens):
        if q == 1:
            rows.append(i)
            tokens.append(start)
        start += q
    if not rows:
        return None
    device = batch.slot_mapping.device
    width = max(-(-batch.context_lens[i] // batch.block_size) for i in rows)
    return DecodeRows(
        token_index=torch.tensor(tokens, dtype=torch.int64).to(device),
        block_tables=batch.host_block_tables[torch.tensor(rows, dtype=torch.int64), :width].to(device),
        context_lens=[batch.context_lens[i] for i in rows],
    )


@dataclass(frozen=True)
class TorchDecode:
    """The decodes of a batch, for one batched SDPA call over their gathered blocks."""

    token_index: torch.Tensor  # [b] flat index of each decode token
    block_tables: torch.Tensor  # [b, width] blocks to gather
    valid: torch.Tensor  # [b, width * block_size] True where the key position is inside the context


@dataclass(frozen=True)
class TorchAttentionMetadata(AttentionMetadata):
    decode: TorchDecode | None


class TorchPagedAttention:
    """Reference paged attention with ``scaled_dot_product_attention``.

    Decode tokens are batched into one call over their gathered blocks; each prefill (or prefill chunk) is one
    call with an explicit causal mask that accounts for tokens already in the cache.
    """

    # Its decode gathers every block of the (padded) block table: far too much work at CUDA-graph sizes.
    supports_cuda_graphs = False

    def build_metadata(self, batch: FlatBatch) -> TorchAttentionMetadata:
        rows, decode = decode_rows(batch), None
        if rows is not None:
            context = torch.tensor(rows.context_lens, dtype=torch.int64)  # [b]
            keys = torch.arange(rows.block_tables.shape[1] * batch.block_size)  # [S]
            valid = keys[None, :] < context[:, None]  # [b, S]
            decode = TorchDecode(rows.token_index, rows.block_tables, valid.to(rows.token_index.device))
        return TorchAttentionMetadata(batch, prefill_slices(batch), decode)

    def build_decode_metadata(self, batch: FlatBatch) -> TorchAttentionMetadata:
        tables = batch.block_tables
        device, size = tables.device, tables.shape[0]
        keys = torch.arange(tables.shape[1] * batch.block_size, device=device)  # [S]
        decode = TorchDecode(
            token_index=torch.arange(size, device=device),
            block_tables=tables,
            valid=keys[None, :] < batch.seq_lens[:, None],  # [B, S]
        )
        return TorchAttentionMetadata(batch, (), decode)

    def rotate_and_write(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        rotary: tuple[torch.Tensor, torch.Tensor],
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        query, key = apply_rotary(query, *rotary), apply_rotary(key, *rotary)
        write_kv(kv_cache, key, value, meta.slot_mapping)
        return query, key

    def attend(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor:
        assert isinstance(meta, TorchAttentionMetadata)
        out = torch.empty_like(query)  # [T, K, Hkv, Dh]
        if meta.decode is not None:
            group = meta.decode
            out[group.token_index] = _decode_attention(query[group.token_index], kv_cache, group, scale)
        prefill_attention(out, query, key, value, kv_cache, meta, scale)
        return out


def write_kv(kv_cache: torch.Tensor, key: torch.Tensor, value: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Store ``key``/``value`` ``[T, Hkv, Dh]`` at ``slot_mapping`` ``[T]`` of a layer's cache."""
    heads, dim = key.shape[1], key.shape[2]
    kv_cache[0].view(-1, heads, dim).index_copy_(0, slot_mapping, key)
    kv_cache[1].view(-1, heads, dim).index_copy_(0, slot_mapping, value)


def prefill_attention(
    out: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    kv_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
) -> None:
    """Write into ``out`` the attention of every prefill (or chunk) of the batch, one SDPA call each."""
    for piece in meta.prefills:
        rows = slice(piece.token_start, piece.token_start + piece.query_len)
        out[rows] = _prefill_attention(query[rows], key[rows], value[rows], kv_cache, piece, scale)


def _decode_attention(
    query: torch.Tensor, kv_cache: torch.Tensor, group: TorchDecode, scale: float
) -> torch.Tensor:
    """One query token per sequence, ``query`` ``[b, K, Hkv, Dh]``."""
    tables, valid = group.block_tables, group.valid
    batch, _, heads, dim = query.shape
    flat = tables.reshape(-1)  # index_select gathers blocks several times faster than advanced indexing on CPU
    keys = kv_cache[0].index_select(0, flat).view(batch, -1, heads, dim).transpose(1, 2)  # [b, Hkv, S, Dh]
    values = kv_cache[1].index_select(0, flat).view(batch, -1, heads, dim).transpose(1, 2)  # [b, Hkv, S, Dh]
    q = query.permute(0, 2, 1, 3)  # [b, Hkv, K, Dh]
    mask = valid[:, None, None, :]  # [b, 1, 1, S]
    out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=scale)  # [b, Hkv, K, Dh]
    return out.permute(0, 2, 1, 3)  # [b, K, Hkv, Dh]


def _prefill_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    kv_cache: torch.Tensor,
    piece: PrefillSlice,
    scale: float,
    gqa: bool | None = None,
) -> torch.Tensor:
    """Several new tokens of one sequence, ``query`` ``[Q, K, Hkv, Dh]``; earlier tokens come from the cache.

    Always 4-D SDPA inputs (the fused flash / memory-efficient kernels take nothing else). A fresh prompt with
    ``gqa`` (the default on CUDA) is one grouped-query causal call, which CUDA serves with flash attention and no
    K/V copy. Otherwise (CPU, and chunks that continue a cached sequence) the ``top_k`` expert copies are folded
    into the query axis under an explicit causal mask: every KV head attends ``top_k x Q`` queries, no K/V copy,
    and CPU SDPA takes its fused path (with ``enable_gqa`` it takes only its slow one).
    """
    q_len, top_k, heads, dim = query.shape
    fresh = piece.context_len == q_len
    if fresh:  # nothing cached before this chunk: use the fresh K/V directly
        keys, values = key, value  # [C, Hkv, Dh]
    else:
        keys = kv_cache[0].index_select(0, piece.block_ids).view(-1, heads, dim)[: piece.context_len]  # [C, Hkv, Dh]
        values = kv_cache[1].index_select(0, piece.block_ids).view(-1, heads, dim)[: piece.context_len]  # [C, Hkv, Dh]
    k = keys.transpose(0, 1)[None]  # [1, Hkv, C, Dh]
    v = values.transpose(0, 1)[None]  # [1, Hkv, C, Dh]
    if fresh and (query.is_cuda if gqa is None else gqa):
        # Query head j*K + k reads KV head j = h // K: the grouped-query layout.
        q = query.permute(2, 1, 0, 3).reshape(1, heads * top_k, q_len, dim)  # [1, Hkv*K, Q, Dh]
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True)
    else:
        q = query.permute(2, 1, 0, 3).reshape(1, heads, top_k * q_len, dim)  # [1, Hkv, K*Q, Dh]
        mask = piece.causal.repeat(top_k, 1)  # [K*Q, C]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)  # [1, Hkv, K*Q, Dh]
    return out.view(heads, top_k, q_len, dim).permute(2, 1, 0, 3)  # [Q, K, Hkv, Dh]
