"""Triton kernels for expert routing and for combining the experts' outputs.

``route(logits, top_k)`` does in two launches what the PyTorch router does in about a dozen:

1. ``_topk_softmax_kernel`` (a program per chunk of ``TOKENS_PER_PROGRAM`` tokens): the top-k experts of every
   token (the highest logit first, ties to the lower expert index), the softmax over those k logits only, in
   float32, and how many of the chunk's assignments went to each expert (``chunk_counts`` ``[chunks, E]``).
2. ``_sort_kernel`` (a program per chunk, in parallel): a stable counting sort of the ``T x k`` assignments by
   expert. Each program sums ``chunk_counts`` into the per-expert totals (their cumulative offsets) and into
   the assignments of earlier chunks, which gives where its own assignments of each expert start; a scan
   inside the chunk places them. It writes every assignment's position in expert order, the sorted slot
   order, token order and gates (the first program also the counts and offsets). Stable by flat index
   ``t * k + j``, so the order is exactly ``torch.argsort(experts, stable=True)``'s.

``combine(y_sorted, positions, gates, bias)`` is the gate-weighted sum of each token's ``k`` expert outputs plus
the shared bias, accumulated in float32 (a program per token and block of features), instead of a multiply, a
zero fill, an ``index_add_`` and an add.

Everything stays on the device: no host sync, capturable in a CUDA graph. On CPU the kernels run only under
the Triton interpreter (tests).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# NOTE: builtins only (see model.kernels.triton_attention).
from triton.language.standard import _elementwise_max, _elementwise_min, _sum_combine

from model.kernels.triton_common import kernel_interpreted, require_kernel_device
from model.layers.routing import ExpertCounts, Routing

TOKENS_PER_PROGRAM = 32  # also the sort's chunk: TOKENS_PER_PROGRAM * top_k assignments
COUNT_ROWS = 64  # chunk_counts rows the sort reads per loop iteration
COMBINE_BLOCK = 256


@triton.jit
def _topk_softmax_kernel(
    logits_ptr,
    experts_ptr,
    gates_ptr,
    chunk_counts_ptr,
    tokens,
    num_experts,
    logits_st,
    TOP_K: tl.constexpr,
    K_PAD: tl.constexpr,
    E_PAD: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)  # [BT]
    e = tl.arange(0, E_PAD)  # [E]
    kk = tl.arange(0, K_PAD)  # [K]
    t_mask = t < tokens
    valid = t_mask[:, None] & (e[None, :] < num_experts)
    logits = tl.load(logits_ptr + t.to(tl.int64)[:, None] * logits_st + e[None, :], mask=valid, other=float("-inf"))
    logits = tl.where(t_mask[:, None], logits.to(tl.float32), 0.0)  # [BT, E]; padding rows stay finite
    chosen = tl.full([BLOCK_T, K_PAD], 0, tl.int32)
    values = tl.full([BLOCK_T, K_PAD], float("-inf"), tl.float32)
    counts = tl.full([E_PAD], 0, tl.int32)  # this chunk's assignments per expert
    for k in tl.static_range(TOP_K):
        best = tl.reduce(logits, 1, _elementwise_max)  # [BT]
        index = tl.reduce(tl.where(logits == best[:, None], e[None, :], E_PAD), 1, _elementwise_min)  # [BT]
        hits = (index[:, None] == e[None, :]) & t_mask[:, None]  # [BT, E]
        counts += tl.reduce(hits.to(tl.int32), 0, _sum_combine)
        chosen = tl.where(kk[None, :] == k, index[:, None], chosen)
        values = tl.where(kk[None, :] == k, best[:, None], values)
        logits = tl.where(e[None, :] == index[:, None], float("-inf"), logits)
    k_mask = kk[None, :] < TOP_K
    top = tl.reduce(tl.where(k_mask, values, float("-inf")), 1, _elementwise_max)  # [BT]
    p = tl.where(k_mask, tl.exp(tl.where(k_mask, values, top[:, None]) - top[:, None]), 0.0)  # [BT, K]
    gates = p / tl.reduce(p, 1, _sum_combine)[:, None]
    flat = t.to(tl.int64)[:, None] * TOP_K + kk[None, :]  # [BT, K]
    store = t_mask[:, None] & k_mask
    tl.store(experts_ptr + flat, chosen, mask=store)
    tl.store(gates_ptr + flat, gates.to(gates_ptr.dtype.element_ty), mask=store)
    tl.store(chunk_counts_ptr + tl.program_id(0) * E_PAD + e, counts)


@triton.jit
def _sort_kernel(
    experts_ptr,
    gates_ptr,
    chunk_counts_ptr,
    counts_ptr,
    offsets_ptr,
    positions_ptr,
    slot_order_ptr,
    token_order_ptr,
    sorted_gates_ptr,
    assignments,
    num_chunks,
    num_experts,
    TOP_K: tl.constexpr,
    E_PAD: tl.constexpr,
    CHUNK: tl.constexpr,
    CHUNK_PAD: tl.constexpr,
    ROWS: tl.constexpr,
):
    chunk = tl.program_id(0)
    e = tl.arange(0, E_PAD)  # [E]
    r = tl.arange(0, ROWS)  # [R]
    totals = tl.full([E_PAD], 0, tl.int32)
    earlier = tl.full([E_PAD], 0, tl.int32)  # assignments of each expert in the chunks before this one
    for start in range(0, num_chunks, ROWS):
        row = start + r
        rows = tl.load(chunk_counts_ptr + row[:, None] * E_PAD + e[None, :], mask=row[:, None] < num_chunks,
                       other=0)  # [R, E]
        totals += tl.reduce(rows, 0, _sum_combine)
        earlier += tl.reduce(tl.where(row[:, None] < chunk, rows, 0), 0, _sum_combine)
    offsets = tl.associative_scan(totals, 0, _sum_combine)  # [E] cumulative: expert e ends at offsets[e]
    first = e + chunk * E_PAD < num_experts  # only the first program writes the totals
    tl.store(counts_ptr + e, totals.to(counts_ptr.dtype.element_ty), mask=first)
    tl.store(offsets_ptr + e, offsets, mask=first)
    c = tl.arange(0, CHUNK_PAD)  # [C]
    a = chunk * CHUNK + c
    a_mask = (c < CHUNK) & (a < assignments)
    expert = tl.load(experts_ptr + a, mask=a_mask, other=E_PAD)  # [C]; E_PAD: no expert
    hits = (expert[:, None] == e[None, :]).to(tl.int32)  # [C, E]
    before = tl.associative_scan(hits, 0, _sum_combine) - hits  # [C, E] same-expert assignments before
    start_of = offsets - totals + earlier  # [E] where this chunk's assignments of each expert begin
    position = tl.reduce(hits * (before + start_of[None, :]), 1, _sum_combine)  # [C]
    tl.store(positions_ptr + a, position, mask=a_mask)
    tl.store(slot_order_ptr + position, a.to(tl.int64), mask=a_mask)
    tl.store(token_order_ptr + position, (a // TOP_K).to(tl.int64), mask=a_mask)
    gate = tl.load(gates_ptr + a, mask=a_mask, other=0.0)
    tl.store(sorted_gates_ptr + position, gate, mask=a_mask)


@triton.jit
def _combine_kernel(
    y_ptr,
    positions_ptr,
    gates_ptr,
    bias_ptr,
    out_ptr,
    dim,
    y_st,
    out_st,
    TOP_K: tl.constexpr,
    BLOCK: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    d = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = d < dim
    acc = tl.full([BLOCK], 0.0, tl.float32)
    for k in tl.static_range(TOP_K):
        row = tl.load(positions_ptr + t * TOP_K + k).to(tl.int64)
        gate = tl.load(gates_ptr + t * TOP_K + k).to(tl.float32)
        acc += gate * tl.load(y_ptr + row * y_st + d, mask=mask, other=0.0).to(tl.float32)
    acc += tl.load(bias_ptr + d, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + t * out_st + d, acc.to(out_ptr.dtype.element_ty), mask=mask)


def is_interpreted() -> bool:
    """Whether this module's kernels run under the Triton CPU interpreter (``TRITON_INTERPRET=1`` at import)."""
    return kernel_interpreted(_sort_kernel)


def _check_device(tensor: torch.Tensor) -> None:
    require_kernel_device(tensor, is_interpreted(), __name__)


def route(logits: torch.Tensor, top_k: int, gate_dtype: torch.dtype) -> Routing:
    """Top-k routing of router ``logits`` ``[T, E]``, sorted by expert (see the module docstring).

    The same ``Routing`` as ``model.layers.routing.route_reference``, in the same order (``positions`` is int32).
    """
    _check_device(logits)
    tokens, experts = logits.shape
    n = tokens * top_k
    device = logits.device
    out = {
        "experts": torch.empty(n, dtype=torch.int32, device=device),
        "token_gates": torch.empty(tokens, top_k, dtype=gate_dtype, device=device),
        "counts": torch.empty(experts, dtype=torch.int64, device=device),
        "offsets": torch.empty(experts, dtype=torch.int32, device=device),
        "positions": torch.empty(n, dtype=torch.int32, device=device),
        "slot_order": torch.empty(n, dtype=torch.int64, device=device),
        "token_order": torch.empty(n, dtype=torch.int64, device=device),
        "gates": torch.empty(n, dtype=gate_dtype, device=device),
    }
    if tokens == 0:
        out["counts"].zero_()
        out["offsets"].zero_()
        return _routing(out)
    e_pad = triton.next_power_of_2(experts)
    chunks = triton.cdiv(tokens, TOKENS_PER_PROGRAM)
    chunk_counts = torch.empty(chunks, e_pad, dtype=torch.int32, device=device)  # [chunks, E]
    _topk_softmax_kernel[(chunks,)](
        logits, out["experts"], out["token_gates"], chunk_counts, tokens, experts, logits.stride(0),
        TOP_K=top_k, K_PAD=triton.next_power_of_2(top_k), E_PAD=e_pad, BLOCK_T=TOKENS_PER_PROGRAM,
    )  # fmt: skip
    chunk = TOKENS_PER_PROGRAM * top_k
    _sort_kernel[(chunks,)](
        out["experts"], out["token_gates"], chunk_counts, out["counts"], out["offsets"], out["positions"],
        out["slot_order"], out["token_order"], out["gates"], n, chunks, experts,
        TOP_K=top_k, E_PAD=e_pad, CHUNK=chunk, CHUNK_PAD=triton.next_power_of_2(chunk), ROWS=COUNT_ROWS,
    )  # fmt: skip
    return _routing(out)


def _routing(out: dict[str, torch.Tensor]) -> Routing:
    return Routing(
        slot_order=out["slot_order"],
        token_order=out["token_order"],
        gates=out["gates"],
        expert_counts=ExpertCounts(out["counts"], out["offsets"]),
        positions=out["positions"],
        token_gates=out["token_gates"],
    )


def combine(
    y_sorted: torch.Tensor, positions: torch.Tensor, token_gates: torch.Tensor, bias: torch.Tensor
) -> torch.Tensor:
    """``[T, D]``: ``bias + sum_j token_gates[t, j] * y_sorted[positions[t * k + j]]`` for ``y_sorted`` ``[T*k, D]``."""
    _check_device(y_sorted)
    tokens, top_k = token_gates.shape
    dim = y_sorted.shape[1]
    out = y_sorted.new_empty(tokens, dim)  # [T, D]
    if tokens == 0:
        return out
    if y_sorted.stride(1) != 1:
        raise ValueError("combine needs rows with unit stride")
    grid = (tokens, triton.cdiv(dim, COMBINE_BLOCK))
    _combine_kernel[grid](
        y_sorted, positions, token_gates, bias, out, dim, y_sorted.stride(0), out.stride(0),
        TOP_K=top_k, BLOCK=COMBINE_BLOCK,
    )  # fmt: skip
    return out


def combine_routed(y_sorted: torch.Tensor, routing: Routing, bias: torch.Tensor) -> torch.Tensor:
    """``combine`` over a ``Routing`` (the ``CombineFn`` the layers call)."""
    return combine(y_sorted, routing.positions, routing.token_gates, bias)
