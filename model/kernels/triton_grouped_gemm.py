"""Triton grouped GEMM for expert projections: rows sorted by expert times that expert's weight.

``grouped_gemm(x_sorted, weight, offsets)`` computes, for every expert ``e``, rows
``offsets[e-1]:offsets[e]`` of ``x_sorted`` ``[N, in]`` times ``weight[e].T`` (``weight`` ``[E, out, in]``) in
one launch. The expert counts stay on the device: each program finds its expert by walking the ``E`` offsets
itself, so nothing is read back to the host and the call can be captured in a CUDA graph.

Grid: ``(cdiv(N, BLOCK_M) + E, cdiv(out, BLOCK_N))``. Every expert's rows are cut into tiles of ``BLOCK_M``
rows (its last tile partly masked); the tiles of all experts, in expert order, cannot outnumber
``cdiv(N, BLOCK_M) + E``, and programs past the last tile do nothing. Accumulation is fp32; fp32 inputs use
IEEE-precision dots (not TF32), so the result matches the per-expert loop to rounding.

This is the sync-free path where ``torch._grouped_mm``'s fast kernel does not apply (fp32 and fp16, GPUs older
than sm_90). It runs on CPU tensors only under the Triton interpreter (``TRITON_INTERPRET=1`` set before the
first import), which is how the tests check it without a GPU.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from model.kernels.triton_common import kernel_interpreted, require_kernel_device
from model.layers.routing import ExpertCounts

BLOCK_N = 64
MAX_BLOCK_M = 128


@triton.jit
def _grouped_gemm_kernel(
    x_ptr,
    w_ptr,
    out_ptr,
    offsets_ptr,
    num_experts,
    out_features,
    in_features,
    x_st_m,
    x_st_k,
    w_st_e,
    w_st_n,
    w_st_k,
    o_st_m,
    o_st_n,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    EVEN_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    # Find this program's expert and row range: expert e owns cdiv(count_e, BLOCK_M) consecutive tiles.
    expert = pid_m * 0 - 1
    row_start = pid_m * 0
    row_end = pid_m * 0
    tile_base = pid_m * 0
    prev_end = pid_m * 0
    for e in range(0, num_experts):
        end = tl.load(offsets_ptr + e).to(tl.int32)
        tiles = (end - prev_end + BLOCK_M - 1) // BLOCK_M
        hit = (pid_m >= tile_base) & (pid_m < tile_base + tiles)
        expert = tl.where(hit, e, expert)
        row_start = tl.where(hit, prev_end + (pid_m - tile_base) * BLOCK_M, row_start)
        row_end = tl.where(hit, end, row_end)
        tile_base += tiles
        prev_end = end

    if expert >= 0:
        # 64-bit base pointers of the tile, 32-bit offsets inside it: fewer registers than 64-bit everywhere.
        m = tl.arange(0, BLOCK_M)  # [M]
        n = tl.arange(0, BLOCK_N)  # [N]
        k = tl.arange(0, BLOCK_K)  # [K]
        m_mask = row_start + m < row_end
        n_mask = pid_n * BLOCK_N + n < out_features
        x_tile = x_ptr + row_start.to(tl.int64) * x_st_m
        w_tile = w_ptr + expert.to(tl.int64) * w_st_e + (pid_n * BLOCK_N).to(tl.int64) * w_st_n
        a_ptrs = x_tile + m[:, None] * x_st_m + k[None, :] * x_st_k  # [M, K]
        b_ptrs = w_tile + n[:, None] * w_st_n + k[None, :] * w_st_k  # [N, K]
        acc = tl.full([BLOCK_M, BLOCK_N], 0.0, tl.float32)
        for k0 in range(0, in_features, BLOCK_K):
            if EVEN_K:
                a = tl.load(a_ptrs, mask=m_mask[:, None], other=0.0)
                b = tl.load(b_ptrs, mask=n_mask[:, None], other=0.0)
            else:
                k_mask = k0 + k < in_features
                a = tl.load(a_ptrs, mask=m_mask[:, None] & k_mask[None, :], other=0.0)
                b = tl.load(b_ptrs, mask=n_mask[:, None] & k_mask[None, :], other=0.0)
            acc = tl.dot(a, tl.trans(b), acc, input_precision=DOT_PRECISION)  # [M, N]
            a_ptrs += BLOCK_K * x_st_k
            b_ptrs += BLOCK_K * w_st_k
        out_tile = out_ptr + row_start.to(tl.int64) * o_st_m + (pid_n * BLOCK_N).to(tl.int64) * o_st_n
        dst = out_tile + m[:, None] * o_st_m + n[None, :] * o_st_n
        tl.store(dst, acc.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


def is_interpreted() -> bool:
    """Whether the kernel runs under the Triton CPU interpreter (``TRITON_INTERPRET=1`` at import)."""
    return kernel_interpreted(_grouped_gemm_kernel)


def block_m_for(rows: int, num_experts: int, dtype: torch.dtype = torch.bfloat16) -> int:
    """Rows per tile: about the mean rows per expert, a power of two from 16 (``tl.dot``'s least) to 128, or to
    64 in fp32 (128 fp32 rows spill registers on sm_80)."""
    mean = max(1, rows // max(1, num_experts))
    largest = MAX_BLOCK_M // 2 if dtype == torch.float32 else MAX_BLOCK_M
    return min(largest, max(16, triton.next_power_of_2(mean)))


def num_warps_for(block_m: int) -> int:
    """8 warps for tiles of 64 rows or more: with 4 they spill registers (checked by compiling for sm_80/90)."""
    return 8 if block_m >= 64 else 4


def grouped_gemm(
    x_sorted: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor, block_m: int | None = None
) -> torch.Tensor:
    """``[N, out]``: rows ``offsets[e-1]:offsets[e]`` of ``x_sorted`` ``[N, in]`` times ``weight[e]`` ``[out, in]``.

    ``offsets`` ``[E]`` holds cumulative row counts (int32 or int64, on ``x_sorted``'s device) ending at ``N``.
    ``block_m`` (rows per tile, a power of two >= 16) defaults to ``block_m_for``.
    """
    require_kernel_device(x_sorted, is_interpreted(), __name__)
    rows, in_features = x_sorted.shape
    num_experts, out_features, _ = weight.shape
    out = x_sorted.new_empty(rows, out_features)  # [N, out]
    if rows == 0:
        return out
    tile = block_m or block_m_for(rows, num_experts, x_sorted.dtype)
    grid = (triton.cdiv(rows, tile) + num_experts, triton.cdiv(out_features, BLOCK_N))
    fp32 = x_sorted.dtype == torch.float32
    block_k = 32 if fp32 else 64
    _grouped_gemm_kernel[grid](
        x_sorted,
        weight,
        out,
        offsets,
        num_experts,
        out_features,
        in_features,
        *x_sorted.stride(),
        *weight.stride(),
        *out.stride(),
        BLOCK_M=tile,
        BLOCK_N=BLOCK_N,
        BLOCK_K=block_k,
        EVEN_K=in_features % block_k == 0,
        DOT_PRECISION="ieee" if fp32 else "tf32",  # 16-bit inputs ignore it
        num_warps=num_warps_for(tile),
    )
    return out


def grouped_linear_triton(x_sorted: torch.Tensor, weight: torch.Tensor, counts: ExpertCounts) -> torch.Tensor:
    """``grouped_gemm`` over a router's counts (the ``ExpertMatmulFn`` the layers call): device offsets only."""
    return grouped_gemm(x_sorted, weight, counts.offsets)
