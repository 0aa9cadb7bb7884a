"""Triton paged decode attention over block tables, and the ``TritonPagedAttention`` backend.

``TritonPagedAttention`` implements ``AttentionBackend``. Rotary embedding and the K/V cache write are one fused
kernel (``model.kernels.triton_fused.rotary_write_kv``). Decode tokens (one new token per sequence) go through
a paged decode kernel; prefills and prefill chunks reuse the reference SDPA path (``prefill_attention``), so a
mixed batch is served by one ``attend`` call.

Kernels (one launch each per layer and step):

- ``_decode_kernel``: one program per (decode sequence, KV head[, context split]). JetMoe's query head ``h``
  reads KV head ``h % Hkv``, so with the query laid out ``[T, top_k, Hkv, Dh]`` the program for KV head ``h``
  loads the ``top_k`` query rows ``query[t, :, h, :]`` (no permutation needed), walks the sequence's keys in
  tiles of ``BLOCK_N`` positions (each position's physical block read from the block table, so any cache block
  size works), and keeps an online softmax in float32. With one split it writes the normalised ``[top_k, Dh]``
  output; with several (flash-decoding, for small batches that would leave most SMs idle) each split writes
  its unnormalised accumulator and running max/sum, and ``_combine_kernel`` merges the splits. Each sequence
  divides its own context among the splits (whole tiles, at least ``min_per_split`` keys each), not the
  block-table width: a CUDA graph's table is as wide as ``max_model_len`` while most contexts are far shorter.

On CUDA the score and value products use ``tl.dot`` (query rows padded to 16); elsewhere (the Triton CPU
interpreter) a broadcast-multiply-sum does the same maths. Inputs may be fp32, bf16 or fp16; accumulation is
fp32 throughout (fp32 dots use IEEE precision, not TF32).

Triton runs on CPU tensors only under the interpreter: ``TRITON_INTERPRET=1`` must be in the environment
before this module is imported.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

# NOTE: the kernels use only Triton builtins (tl.full, tl.reduce with the standard combine functions), none of
# triton.language's own @jit helpers (tl.zeros, tl.sum, tl.max). Those are built for the CPU interpreter only
# when TRITON_INTERPRET=1 is set before triton's first import, and torch (torch._dynamo) may import triton
# earlier. The interpreter recognises these two combine functions and reduces with numpy; compiled, this is
# exactly what tl.sum and tl.max do.
from triton.language.standard import _elementwise_max, _sum_combine

from model.kernels.triton_common import kernel_interpreted, require_kernel_device
from model.kernels.triton_fused import rotary_write_kv
from model.layers.attention import (
    AttentionMetadata,
    FlatBatch,
    decode_rows,
    prefill_attention,
    prefill_slices,
)

_NEG_BIG = tl.constexpr(
    -1.0e30
)  # finite "minus infinity" for running maxima: exp(_NEG_BIG - m) is 0 and never NaN


@triton.jit
def _decode_kernel(
    q_ptr,
    cache_ptr,
    out_ptr,
    part_acc_ptr,
    part_ml_ptr,
    token_ptr,
    table_ptr,
    lens_ptr,
    q_st_t,
    q_st_k,
    q_st_h,
    q_st_d,
    o_st_t,
    o_st_k,
    o_st_h,
    o_st_d,
    c_st_kv,
    c_st_blk,
    c_st_off,
    c_st_h,
    c_st_d,
    tab_st_b,
    tab_st_n,
    scale,
    block_size,
    top_k,
    head_dim,
    min_per_split,
    TOPK_PAD: tl.constexpr,
    DIM_PAD: tl.constexpr,
    BLOCK_N: tl.constexpr,
    USE_DOT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    SPLIT: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1).to(tl.int64)
    split = tl.program_id(2)
    num_heads = tl.num_programs(1)
    num_splits = tl.num_programs(2)
    token = tl.load(token_ptr + b).to(tl.int64)
    context = tl.load(lens_ptr + b).to(tl.int32)

    kk = tl.arange(0, TOPK_PAD)  # query slot (attention expert) k
    d = tl.arange(0, DIM_PAD)
    d_mask = d < head_dim
    q_mask = (kk[:, None] < top_k) & d_mask[None, :]
    q = tl.load(
        q_ptr + token * q_st_t + kk[:, None] * q_st_k + h * q_st_h + d[None, :] * q_st_d,
        mask=q_mask,
        other=0.0,
    )  # [K, D]
    if not USE_DOT:
        q = q.to(tl.float32)

    m_i = tl.full([TOPK_PAD], _NEG_BIG, tl.float32)  # running max of the scaled scores
    l_i = tl.full([TOPK_PAD], 0.0, tl.float32)  # running sum of exp(score - m_i)
    acc = tl.full([TOPK_PAD, DIM_PAD], 0.0, tl.float32)  # running sum of exp(score - m_i) * v
    per_split = (context + num_splits - 1) // num_splits
    per_split = tl.maximum((per_split + BLOCK_N - 1) // BLOCK_N * BLOCK_N, min_per_split)  # whole tiles
    lo = split * per_split
    hi = tl.minimum(lo + per_split, context)  # splits past the context stay empty
    kv_head = cache_ptr + h * c_st_h + d[None, :] * c_st_d  # [1, D]
    for start in range(lo, hi, BLOCK_N):
        n = start + tl.arange(0, BLOCK_N)  # key positions of this tile
        n_mask = n < hi
        blk = tl.load(table_ptr + b * tab_st_b + (n // block_size) * tab_st_n, mask=n_mask, other=0)
        row = blk.to(tl.int64) * c_st_blk + (n % block_size) * c_st_off  # [N]
        kv_mask = n_mask[:, None] & d_mask[None, :]
        k = tl.load(kv_head + row[:, None], mask=kv_mask, other=0.0)  # [N, D]
        v = tl.load(kv_head + c_st_kv + row[:, None], mask=kv_mask, other=0.0)  # [N, D]
        if USE_DOT:
            scores = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)  # [K, N]
        else:
            scores = tl.reduce(q[:, None, :] * k.to(tl.float32)[None, :, :], 2, _sum_combine)  # [K, N]
        scores = tl.where(n_mask[None, :], scores * scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.reduce(scores, 1, _elementwise_max))  # [K]
        alpha = tl.exp(m_i - m_new)  # [K]
        p = tl.exp(scores - m_new[:, None])  # [K, N]
        l_i = l_i * alpha + tl.reduce(p, 1, _sum_combine)
        if USE_DOT:
            pv = tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)  # [K, D]
        else:
            pv = tl.reduce(p[:, :, None] * v.to(tl.float32)[None, :, :], 1, _sum_combine)  # [K, D]
        acc = acc * alpha[:, None] + pv
        m_i = m_new

    if SPLIT:
        # Partials [b, Hkv, splits, K, D] (acc) and [b, Hkv, splits, 2, K] (max, sum), contiguous fp32.
        part = (b * num_heads + h) * num_splits + split
        tl.store(part_acc_ptr + (part * top_k + kk[:, None]) * head_dim + d[None, :], acc, mask=q_mask)
        k_mask = kk < top_k
        tl.store(part_ml_ptr + part * 2 * top_k + kk, m_i, mask=k_mask)
        tl.store(part_ml_ptr + part * 2 * top_k + top_k + kk, l_i, mask=k_mask)
    else:
        out = acc / l_i[:, None]
        dst = out_ptr + token * o_st_t + kk[:, None] * o_st_k + h * o_st_h + d[None, :] * o_st_d
        tl.store(dst, out.to(out_ptr.dtype.element_ty), mask=q_mask)


@triton.jit
def _combine_kernel(
    out_ptr,
    part_acc_ptr,
    part_ml_ptr,
    token_ptr,
    o_st_t,
    o_st_k,
    o_st_h,
    o_st_d,
    top_k,
    head_dim,
    num_splits,
    TOPK_PAD: tl.constexpr,
    DIM_PAD: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1).to(tl.int64)
    num_heads = tl.num_programs(1)
    token = tl.load(token_ptr + b).to(tl.int64)
    kk = tl.arange(0, TOPK_PAD)
    d = tl.arange(0, DIM_PAD)
    k_mask = kk < top_k
    mask = k_mask[:, None] & (d[None, :] < head_dim)
    m_tot = tl.full([TOPK_PAD], _NEG_BIG, tl.float32)
    l_tot = tl.full([TOPK_PAD], 0.0, tl.float32)
    acc = tl.full([TOPK_PAD, DIM_PAD], 0.0, tl.float32)
    for split in range(0, num_splits):
        part = (b * num_heads + h) * num_splits + split
        m_s = tl.load(part_ml_ptr + part * 2 * top_k + kk, mask=k_mask, other=_NEG_BIG)
        l_s = tl.load(part_ml_ptr + part * 2 * top_k + top_k + kk, mask=k_mask, other=0.0)
        a_s = tl.load(
            part_acc_ptr + (part * top_k + kk[:, None]) * head_dim + d[None, :], mask=mask, other=0.0
        )
        m_new = tl.maximum(m_tot, m_s)
        alpha = tl.exp(m_tot - m_new)
        beta = tl.exp(m_s - m_new)
        l_tot = l_tot * alpha + l_s * beta
        acc = acc * alpha[:, None] + a_s * beta[:, None]
        m_tot = m_new
    out = acc / tl.where(k_mask, l_tot, 1.0)[:, None]  # padded query rows have no keys
    dst = out_ptr + token * o_st_t + kk[:, None] * o_st_k + h * o_st_h + d[None, :] * o_st_d
    tl.store(dst, out.to(out_ptr.dtype.element_ty), mask=mask)


def is_interpreted() -> bool:
    """Whether this module's kernels run under the Triton CPU interpreter (``TRITON_INTERPRET=1`` at import)."""
    return kernel_interpreted(_decode_kernel)


def _check_device(tensor: torch.Tensor) -> None:
    require_kernel_device(tensor, is_interpreted(), __name__)


def _pow2(n: int, minimum: int = 1) -> int:
    return max(minimum, triton.next_power_of_2(n))


def decode_kernel_options(
    top_k: int,
    head_dim: int,
    dtype: torch.dtype,
    use_dot: bool,
    block_n: int | None = None,
    num_warps: int | None = None,
) -> dict:
    """Compile-time options of ``_decode_kernel`` (without ``SPLIT``).

    The defaults keep the kernel free of register spills on sm_90 (checked by compiling for it in the tests):
    4 warps and, with ``tl.dot`` on 16-bit inputs, 32 key positions per tile (16 for fp32 and for the
    broadcast path that the interpreter uses).
    """
    return {
        "TOPK_PAD": _pow2(top_k, 16 if use_dot else 1),
        "DIM_PAD": _pow2(head_dim, 16 if use_dot else 1),
        "BLOCK_N": block_n or (32 if use_dot and dtype != torch.float32 else 16),
        "USE_DOT": use_dot,
        # fp32 dots in IEEE precision (not TF32); 16-bit inputs ignore it ("tf32" is Triton's default)
        "DOT_PRECISION": "ieee" if dtype == torch.float32 else "tf32",
        "num_warps": num_warps or 4,
    }


def decode_attention(
    query: torch.Tensor,
    kv_cache: torch.Tensor,
    out: torch.Tensor,
    token_index: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    num_splits: int = 1,
    use_dot: bool | None = None,
    block_n: int | None = None,
    num_warps: int | None = None,
    min_tokens_per_split: int = 1,
) -> None:
    """Paged decode attention, written into ``out[token_index]``.

    ``query``/``out`` ``[T, top_k, Hkv, Dh]``; ``token_index`` ``[b]`` flat index of each decode token;
    ``block_tables`` ``[b, max_blocks]``; ``context_lens`` ``[b]`` keys per sequence (at least 1).
    ``num_splits`` > 1 splits each context into that many chunks (flash-decoding) and merges them: every
    sequence's own context is divided, in whole tiles of at least ``min_tokens_per_split`` keys.
    ``use_dot`` defaults to ``tl.dot`` on CUDA and a broadcast-multiply-sum under the interpreter;
    ``block_n`` (key positions per tile) and ``num_warps`` default as in ``decode_kernel_options``.
    """
    _check_device(query)
    batch = token_index.shape[0]
    if batch == 0:
        return
    _, top_k, heads, dim = query.shape
    block_size = kv_cache.shape[2]
    use_dot = query.is_cuda if use_dot is None else use_dot
    options = decode_kernel_options(top_k, dim, query.dtype, use_dot, block_n, num_warps)
    tile = options["BLOCK_N"]
    max_context = block_tables.shape[1] * block_size
    per_split = triton.cdiv(triton.cdiv(max_context, max(1, num_splits)), tile) * tile
    splits = triton.cdiv(max_context, per_split)
    if splits > 1:
        part_acc = torch.empty(batch, heads, splits, top_k, dim, dtype=torch.float32, device=query.device)
        part_ml = torch.empty(batch, heads, splits, 2, top_k, dtype=torch.float32, device=query.device)
    else:
        part_acc = part_ml = out  # unused
    _decode_kernel[(batch, heads, splits)](
        query,
        kv_cache,
        out,
        part_acc,
        part_ml,
        token_index,
        block_tables,
        context_lens,
        *query.stride(),
        *out.stride(),
        *kv_cache.stride(),
        *block_tables.stride(),
        scale,
        block_size,
        top_k,
        dim,
        triton.cdiv(min_tokens_per_split, tile) * tile,
        SPLIT=splits > 1,
        **options,
    )
    if splits > 1:
        _combine_kernel[(batch, heads)](
            out,
            part_acc,
            part_ml,
            token_index,
            *out.stride(),
            top_k,
            dim,
            splits,
            TOPK_PAD=_pow2(top_k),
            DIM_PAD=_pow2(dim),
        )


@functools.cache
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


@dataclass(frozen=True)
class PagedDecode:
    """The decodes of a batch as the paged decode kernel reads them."""

    token_index: torch.Tensor  # [b] flat index of each decode token
    block_tables: torch.Tensor  # [b, max_blocks]
    context_lens: torch.Tensor  # [b] int32 keys each decode token attends to


@dataclass(frozen=True)
class TritonAttentionMetadata(AttentionMetadata):
    decode: PagedDecode | None


class TritonPagedAttention:
    """``AttentionBackend`` with the fused rotary + K/V write and the paged decode kernel; prefills through the
    reference SDPA path.

    ``num_splits``: context splits per decode sequence; ``None`` picks them so that small decode batches still
    fill the GPU (one split on CPU). ``use_dot``, ``block_n``, ``num_warps``: see ``decode_attention``.
    The backend holds no per-step state: decode context lengths come with the metadata.
    """

    MIN_TOKENS_PER_SPLIT = 128
    # Reads only the keys inside each context and takes everything from device tensors: graph-capturable.
    supports_cuda_graphs = True

    def __init__(
        self,
        num_splits: int | None = None,
        use_dot: bool | None = None,
        block_n: int | None = None,
        num_warps: int | None = None,
    ) -> None:
        self.num_splits = num_splits
        self.use_dot = use_dot
        self.block_n = block_n
        self.num_warps = num_warps

    def build_metadata(self, batch: FlatBatch) -> TritonAttentionMetadata:
        rows, decode = decode_rows(batch), None
        if rows is not None:
            context = torch.tensor(rows.context_lens, dtype=torch.int32).to(rows.token_index.device)  # [b]
            decode = PagedDecode(rows.token_index, rows.block_tables, context)
        return TritonAttentionMetadata(batch, prefill_slices(batch), decode)

    def build_decode_metadata(self, batch: FlatBatch) -> TritonAttentionMetadata:
        size = batch.block_tables.shape[0]
        decode = PagedDecode(
            token_index=torch.arange(size, device=batch.block_tables.device),
            block_tables=batch.block_tables,
            context_lens=batch.seq_lens,
        )
        return TritonAttentionMetadata(batch, (), decode)

    def rotate_and_write(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        rotary: tuple[torch.Tensor, torch.Tensor],
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One fused kernel (``rotary_write_kv``): rotates in place, then writes K/V."""
        rotary_write_kv(query, key, value, *rotary, kv_cache, meta.slot_mapping)
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
        assert isinstance(meta, TritonAttentionMetadata)
        out = torch.empty_like(query)  # [T, K, Hkv, Dh]
        group = meta.decode
        if group is not None:
            decode_attention(
                query,
                kv_cache,
                out,
                group.token_index,
                group.block_tables,
                group.context_lens,
                scale,
                num_splits=self._splits(query, group, kv_cache.shape[2]),
                use_dot=self.use_dot,
                block_n=self.block_n,
                num_warps=self.num_warps,
                min_tokens_per_split=self.MIN_TOKENS_PER_SPLIT if self.num_splits is None else 1,
            )
        prefill_attention(out, query, key, value, kv_cache, meta, scale)
        return out

    def _splits(self, query: torch.Tensor, group: PagedDecode, block_size: int) -> int:
        if self.num_splits is not None:
            return self.num_splits
        if not query.is_cuda:
            return 1
        programs = group.token_index.shape[0] * query.shape[2]
        by_occupancy = math.ceil(2 * _sm_count(query.device) / programs)
        by_length = group.block_tables.shape[1] * block_size // self.MIN_TOKENS_PER_SPLIT
        return max(1, min(by_occupancy, by_length))
