"""Paged attention: K/V cache writes and attention over block tables.

``AttentionBackend`` is the seam for fast kernels: the model calls ``write_kv`` then ``attend`` once per layer.
``TorchPagedAttention`` is the reference implementation in plain PyTorch; it runs on any device and is the
oracle for faster backends.

JetMoe head mapping: attention has ``top_k x num_kv_heads`` query heads; query head ``h`` reads KV head
``h % num_kv_heads`` (the KV heads are tiled over the attention experts, not interleaved). The reference path
folds the ``top_k`` expert copies into the query-length axis, so every KV head attends to ``top_k x q_len``
queries and no K/V copy is needed.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F

from model.attention_metadata import AttentionMetadata, DecodeGroup, PrefillSlice


class AttentionBackend(Protocol):
    """Writes new K/V into a layer's paged cache and computes attention for a flat batch."""

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
        ``[T, Hkv, Dh]``, then ``write_kv`` of the rotated key; returns the rotated ``(query, key)``."""
        ...

    def write_kv(
        self, kv_cache: torch.Tensor, key: torch.Tensor, value: torch.Tensor, meta: AttentionMetadata
    ) -> None:
        """Store ``key``/``value`` ``[T, Hkv, Dh]`` at ``meta.slot_mapping`` in ``kv_cache``."""
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


class TorchPagedAttention:
    """Reference paged attention with ``scaled_dot_product_attention``.

    Decode tokens are batched into one call over their gathered blocks; each prefill (or prefill chunk) is one
    call with an explicit causal mask that accounts for tokens already in the cache.
    """

    # Its decode gathers every block of the (padded) block table: far too much work at CUDA-graph sizes.
    supports_cuda_graphs = False

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
        self.write_kv(kv_cache, key, value, meta)
        return query, key

    def write_kv(
        self, kv_cache: torch.Tensor, key: torch.Tensor, value: torch.Tensor, meta: AttentionMetadata
    ) -> None:
        heads, dim = key.shape[1], key.shape[2]
        kv_cache[0].view(-1, heads, dim).index_copy_(0, meta.slot_mapping, key)
        kv_cache[1].view(-1, heads, dim).index_copy_(0, meta.slot_mapping, value)

    def attend(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor:
        out = torch.empty_like(query)  # [T, K, Hkv, Dh]
        if meta.decode is not None:
            group = meta.decode
            out[group.token_index] = _decode_attention(query[group.token_index], kv_cache, group, scale)
        prefill_attention(out, query, key, value, kv_cache, meta, scale)
        return out


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half rotary embedding: ``x`` ``[T, ..., Dh]`` rotated by ``cos``/``sin`` ``[T, Dh]``."""
    shape = (cos.shape[0],) + (1,) * (x.dim() - 2) + (cos.shape[1],)
    cos, sin = cos.view(shape), sin.view(shape)
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


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
    query: torch.Tensor, kv_cache: torch.Tensor, group: DecodeGroup, scale: float
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
) -> torch.Tensor:
    """Several new tokens of one sequence, ``query`` ``[Q, K, Hkv, Dh]``; earlier tokens come from the cache."""
    q_len, top_k, heads, dim = query.shape
    if piece.context_len == q_len:  # nothing cached before this chunk: use the fresh K/V directly
        keys, values = key, value  # [C, Hkv, Dh]
    else:
        keys = kv_cache[0].index_select(0, piece.block_ids).view(-1, heads, dim)[: piece.context_len]  # [C, Hkv, Dh]
        values = kv_cache[1].index_select(0, piece.block_ids).view(-1, heads, dim)[: piece.context_len]  # [C, Hkv, Dh]
    if piece.context_len == q_len:
        # Plain causal attention: grouped-query layout where query head j*K + k reads KV head j.
        # K/V are expanded rather than passed with enable_gqa, which CPU SDPA serves only on its slow path.
        q = query.permute(2, 1, 0, 3).reshape(heads * top_k, q_len, dim)  # [Hkv*K, Q, Dh]
        k = keys.transpose(0, 1)[:, None].expand(heads, top_k, q_len, dim).reshape(heads * top_k, q_len, dim)
        v = (
            values.transpose(0, 1)[:, None]
            .expand(heads, top_k, q_len, dim)
            .reshape(heads * top_k, q_len, dim)
        )
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)  # [Hkv*K, Q, Dh]
        return out.view(heads, top_k, q_len, dim).permute(2, 1, 0, 3)  # [Q, K, Hkv, Dh]
    q = query.permute(2, 1, 0, 3).reshape(heads, top_k * q_len, dim)  # [Hkv, K*Q, Dh]
    mask = piece.causal.repeat(top_k, 1)  # [K*Q, C]
    out = F.scaled_dot_product_attention(
        q, keys.transpose(0, 1), values.transpose(0, 1), attn_mask=mask, scale=scale
    )  # [Hkv, K*Q, Dh]
    return out.view(heads, top_k, q_len, dim).permute(2, 1, 0, 3)  # [Q, K, Hkv, Dh]
