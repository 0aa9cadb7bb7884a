"""Fused Triton kernels for the small per-layer steps that would otherwise be a dozen launches each.

- ``rms_norm``: optional residual add, then RMSNorm (one launch instead of about eight): one program per row;
  the sum ``x + residual`` is rounded to the input dtype (as PyTorch's add would) and written back into
  ``residual``; the variance is computed in float32; the normalised row is rounded to the input dtype before
  the weight multiplies it, as ``model.jetmoe.RMSNorm`` does.
- ``rotary_write_kv``: rotate-half rotary embedding of the queries and keys in place, then the K/V cache write
  (one launch instead of about eleven): one program per token. Rotation is computed in float32 and rounded once.

On CUDA these are what the model runs (``RMSNorm.path`` and the Triton attention backend select them); the
PyTorch code stays the reference. On CPU they run only under the Triton interpreter (``TRITON_INTERPRET=1``
set before the first import), which is how the tests compare them with the reference.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# NOTE: builtins only (see model.triton_attention): tl.sum is a jit helper the interpreter may not pick up.
from triton.language.standard import _sum_combine

from model.kernels.triton_common import kernel_interpreted, require_kernel_device


@triton.jit
def _rms_norm_kernel(
    x_ptr,
    res_ptr,
    w_ptr,
    out_ptr,
    x_st,
    res_st,
    out_st,
    dim,
    eps,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < dim
    x = tl.load(x_ptr + row * x_st + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + row * res_st + cols, mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(res_ptr.dtype.element_ty)
        tl.store(res_ptr + row * res_st + cols, x, mask=mask)
    h = x.to(tl.float32)
    variance = tl.reduce(h * h, 0, _sum_combine) / dim
    h = (h * tl.rsqrt(variance + eps)).to(x.dtype).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * out_st + cols, (h * w).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rotate(ptr, cos_lo, cos_hi, sin_lo, sin_hi, head_st, dim_st, heads, half, HEADS: tl.constexpr, HALF: tl.constexpr):
    """Rotate ``[heads, 2 * half]`` rows at ``ptr`` in place; returns the rotated halves (float32)."""
    h = tl.arange(0, HEADS)[:, None]
    d = tl.arange(0, HALF)[None, :]
    mask = (h < heads) & (d < half)
    lo_ptr = ptr + h * head_st + d * dim_st
    hi_ptr = lo_ptr + half * dim_st
    lo = tl.load(lo_ptr, mask=mask, other=0.0).to(tl.float32)
    hi = tl.load(hi_ptr, mask=mask, other=0.0).to(tl.float32)
    new_lo = lo * cos_lo - hi * sin_lo
    new_hi = hi * cos_hi + lo * sin_hi
    tl.store(lo_ptr, new_lo.to(ptr.dtype.element_ty), mask=mask)
    tl.store(hi_ptr, new_hi.to(ptr.dtype.element_ty), mask=mask)
    return new_lo, new_hi, mask, h, d


@triton.jit
def _rotary_write_kv_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    cos_ptr,
    sin_ptr,
    cache_ptr,
    slot_ptr,
    q_st_t,
    q_st_h,
    q_st_d,
    k_st_t,
    k_st_h,
    k_st_d,
    v_st_t,
    v_st_h,
    v_st_d,
    cs_st_t,
    c_st_kv,
    c_st_blk,
    c_st_off,
    c_st_h,
    c_st_d,
    block_size,
    q_heads,
    kv_heads,
    half,
    Q_HEADS: tl.constexpr,
    KV_HEADS: tl.constexpr,
    HALF: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    d = tl.arange(0, HALF)
    d_mask = d < half
    trig = t * cs_st_t + d
    cos_lo = tl.load(cos_ptr + trig, mask=d_mask, other=0.0).to(tl.float32)[None, :]
    cos_hi = tl.load(cos_ptr + trig + half, mask=d_mask, other=0.0).to(tl.float32)[None, :]
    sin_lo = tl.load(sin_ptr + trig, mask=d_mask, other=0.0).to(tl.float32)[None, :]
    sin_hi = tl.load(sin_ptr + trig + half, mask=d_mask, other=0.0).to(tl.float32)[None, :]
    _rotate(q_ptr + t * q_st_t, cos_lo, cos_hi, sin_lo, sin_hi, q_st_h, q_st_d, q_heads, half, Q_HEADS, HALF)
    k_lo, k_hi, mask, h, dd = _rotate(
        k_ptr + t * k_st_t, cos_lo, cos_hi, sin_lo, sin_hi, k_st_h, k_st_d, kv_heads, half, KV_HEADS, HALF
    )
    slot = tl.load(slot_ptr + t).to(tl.int64)
    if slot >= 0:
        v_row = v_ptr + t * v_st_t + h * v_st_h + dd * v_st_d
        v_lo = tl.load(v_row, mask=mask, other=0.0)
        v_hi = tl.load(v_row + half * v_st_d, mask=mask, other=0.0)
        dst = cache_ptr + (slot // block_size) * c_st_blk + (slot % block_size) * c_st_off + h * c_st_h + dd * c_st_d
        out_ty = cache_ptr.dtype.element_ty
        tl.store(dst, k_lo.to(out_ty), mask=mask)
        tl.store(dst + half * c_st_d, k_hi.to(out_ty), mask=mask)
        tl.store(dst + c_st_kv, v_lo, mask=mask)
        tl.store(dst + c_st_kv + half * c_st_d, v_hi, mask=mask)


def is_interpreted() -> bool:
    """Whether this module's kernels run under the Triton CPU interpreter (``TRITON_INTERPRET=1`` at import)."""
    return kernel_interpreted(_rms_norm_kernel)


def _check_device(tensor: torch.Tensor) -> None:
    require_kernel_device(tensor, is_interpreted(), __name__)


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(norm(s), s)`` with ``s = x + residual`` (written into ``residual``) or ``s = x``; ``x`` ``[T, D]``."""
    _check_device(x)
    rows, dim = x.shape
    out = torch.empty_like(x)  # [T, D]
    if rows == 0:
        return out, x if residual is None else residual
    if x.stride(1) != 1 or (residual is not None and residual.stride(1) != 1):
        raise ValueError("rms_norm needs rows with unit stride")
    block = triton.next_power_of_2(dim)
    _rms_norm_kernel[(rows,)](
        x,
        x if residual is None else residual,
        weight,
        out,
        x.stride(0),
        x.stride(0) if residual is None else residual.stride(0),
        out.stride(0),
        dim,
        eps,
        HAS_RESIDUAL=residual is not None,
        BLOCK=block,
        num_warps=max(1, min(8, block // 256)),
    )
    return out, x if residual is None else residual


def rotary_write_kv(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    kv_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Rotate ``query`` ``[T, K, Hkv, Dh]`` and ``key`` ``[T, Hkv, Dh]`` in place by ``cos``/``sin`` ``[T, Dh]``
    (rotate-half), then store the rotated key and ``value`` at ``slot_mapping`` ``[T]`` of the layer's cache
    ``[2, num_blocks, block_size, Hkv, Dh]``; negative slots are not stored."""
    _check_device(query)
    tokens, top_k, heads, dim = query.shape
    if tokens == 0:
        return
    if dim % 2 or cos.stride(1) != 1 or sin.stride() != cos.stride():
        raise ValueError("rotary_write_kv needs an even head size and unit-stride cos/sin of one layout")
    q = query.view(tokens, top_k * heads, dim)  # [T, K*Hkv, Dh]: the (k, h) heads are one strided axis
    _rotary_write_kv_kernel[(tokens,)](
        q,
        key,
        value,
        cos,
        sin,
        kv_cache,
        slot_mapping,
        *q.stride(),
        *key.stride(),
        *value.stride(),
        cos.stride(0),
        *kv_cache.stride(),
        kv_cache.shape[2],
        top_k * heads,
        heads,
        dim // 2,
        Q_HEADS=triton.next_power_of_2(top_k * heads),
        KV_HEADS=triton.next_power_of_2(heads),
        HALF=triton.next_power_of_2(dim // 2),
    )
