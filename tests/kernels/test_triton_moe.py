"""Triton routing (top-k + softmax + counting sort) and expert combine against the PyTorch router and combine.

Without CUDA the kernels run under the Triton interpreter (switched on before the first import).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.support.triton_env import (  # first: may switch on the interpreter
    CUDA,
    DEVICE,
    skip_unless_kernels_run,
)

# isort: split

from model.kernels import triton_moe
from model.kernels.triton_moe import COUNT_ROWS, TOKENS_PER_PROGRAM, combine, combine_routed, route
from model.layers.experts import combine_reference
from model.layers.routing import TopKRouter
from tests.support.triton_compile import assert_no_spills, compile_kernels

skip_unless_kernels_run(triton_moe)

# (tokens, experts, top_k): a decode token, a few, more than one program's tokens, several sort chunks.
SHAPES = [(1, 8, 2), (7, 8, 2), (5, 4, 1), (9, 6, 3), (TOKENS_PER_PROGRAM + 3, 8, 2), (5 * TOKENS_PER_PROGRAM + 9, 8, 2)]


def torch_router(hidden: int, experts: int, top_k: int, seed: int) -> TopKRouter:
    torch.manual_seed(seed)
    return TopKRouter(hidden, experts, top_k).to(DEVICE)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "t{}-e{}-k{}".format(*s))
def test_route_equals_the_torch_router(shape) -> None:
    tokens, experts, top_k = shape
    router = torch_router(16, experts, top_k, seed=tokens)
    x = torch.randn(tokens, 16, generator=torch.Generator().manual_seed(tokens)).to(DEVICE)
    expected = router(x)
    actual = route(router.layer(x), top_k, torch.float32)
    assert (actual.token_gates - expected.token_gates).abs().max().item() <= 1e-6
    assert torch.equal(actual.slot_order, expected.slot_order)  # the stable argsort's order, exactly
    assert torch.equal(actual.token_order, expected.token_order)
    assert torch.equal(actual.positions.long(), expected.positions)
    assert actual.expert_counts.counts.tolist() == list(expected.expert_counts)
    assert torch.equal(actual.expert_counts.offsets, expected.expert_counts.offsets)
    assert torch.equal(actual.gates, actual.token_gates.flatten()[actual.slot_order])


def test_fused_router_returns_the_same_routing() -> None:
    router = torch_router(24, 8, 2, seed=3)
    x = torch.randn(13, 24, device=DEVICE)
    expected = router(x)
    router.impl = route  # what select_kernels hands the layers for fused="triton"
    actual = router(x)
    assert torch.equal(actual.slot_order, expected.slot_order)
    assert actual.expert_counts == tuple(expected.expert_counts)
    assert (actual.gates - expected.gates).abs().max().item() <= 1e-6


@pytest.mark.parametrize(
    "tokens, top_k, skew",
    [
        (COUNT_ROWS * TOKENS_PER_PROGRAM + 70, 2, False),  # more chunks than the sort reads per loop iteration
        (7 * TOKENS_PER_PROGRAM + 5, 3, True),  # most assignments to one expert, chunks of 96 padded to 128
        (3 * TOKENS_PER_PROGRAM, 1, True),  # whole chunks only
    ],
)
def test_parallel_sort_keeps_the_stable_argsort_order(tokens: int, top_k: int, skew: bool) -> None:
    gen = torch.Generator().manual_seed(tokens)
    logits = torch.randn(tokens, 8, generator=gen)  # [T, E]
    if skew:  # expert 5 wins almost every token: long runs of one expert across chunk boundaries
        logits[:, 5] += 4.0
    out = route(logits.to(DEVICE), top_k, torch.float32)
    experts = logits.topk(top_k, dim=1).indices.flatten()  # [T*K] flat assignments t * k + j
    order = torch.argsort(experts, stable=True)  # [T*K]
    assert torch.equal(out.slot_order.cpu(), order)
    assert torch.equal(out.token_order.cpu(), order // top_k)
    assert torch.equal(out.positions.cpu().long()[order], torch.arange(tokens * top_k))
    counts = torch.bincount(experts, minlength=8)  # [E]
    assert out.expert_counts.counts.cpu().tolist() == counts.tolist()
    assert out.expert_counts.offsets.cpu().tolist() == counts.cumsum(0).tolist()
    assert torch.equal(out.gates.cpu(), out.token_gates.cpu().flatten()[order])


def test_route_in_bf16_and_with_no_tokens() -> None:
    logits = torch.randn(6, 8, device=DEVICE).to(torch.bfloat16)
    out = route(logits, 2, torch.bfloat16)
    assert out.token_gates.dtype == torch.bfloat16
    assert (out.token_gates.float().sum(1) - 1).abs().max().item() <= 1e-2
    experts = logits.float().topk(2, dim=1).indices.flatten()  # [T*K] in token order
    expected_order = torch.repeat_interleave(torch.arange(8, device=DEVICE), out.expert_counts.counts)
    assert torch.equal(experts[out.slot_order], expected_order)
    empty = route(torch.empty(0, 8, device=DEVICE), 2, torch.float32)
    assert empty.slot_order.shape == (0,) and empty.expert_counts.offsets.tolist() == [0] * 8


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("shape", SHAPES[:4], ids=lambda s: "t{}-e{}-k{}".format(*s))
def test_combine_equals_the_torch_combine(shape, dtype: torch.dtype) -> None:
    tokens, experts, top_k = shape
    router = torch_router(16, experts, top_k, seed=tokens + 1)
    gen = torch.Generator().manual_seed(tokens + 2)
    routing = router(torch.randn(tokens, 16, generator=gen).to(DEVICE))
    y = torch.randn(tokens * top_k, 300, generator=gen).to(DEVICE, dtype)  # [T*K, D], D not a block multiple
    bias = torch.randn(300, generator=gen).to(DEVICE, dtype)
    expected = combine_reference(y.float(), routing, bias.float())
    actual = combine(y, routing.positions, routing.token_gates.to(dtype), bias)
    assert actual.dtype == dtype and actual.shape == (tokens, 300)
    tol = 1e-5 if dtype == torch.float32 else 5e-2
    assert (actual.float() - expected).abs().max().item() <= tol
    if dtype == torch.float32:
        assert torch.equal(combine_routed(y, routing, bias), actual)


_KERNELS = """
from model.kernels import triton_moe as tm

for arch in (80, 90):
    for ty in ("bf16", "fp32"):
        types = {"logits_ptr": "*" + ty, "experts_ptr": "*i32", "gates_ptr": "*" + ty, "chunk_counts_ptr": "*i32"}
        compile_kernel(f"topk_sm{arch}_{ty}", tm._topk_softmax_kernel, types,
                       {"TOP_K": 2, "K_PAD": 2, "E_PAD": 8, "BLOCK_T": tm.TOKENS_PER_PROGRAM}, arch)
        types = {"experts_ptr": "*i32", "gates_ptr": "*" + ty, "chunk_counts_ptr": "*i32", "counts_ptr": "*i64",
                 "offsets_ptr": "*i32",
                 "positions_ptr": "*i32", "slot_order_ptr": "*i64", "token_order_ptr": "*i64",
                 "sorted_gates_ptr": "*" + ty}
        compile_kernel(f"sort_sm{arch}_{ty}", tm._sort_kernel, types,
                       {"TOP_K": 2, "E_PAD": 8, "CHUNK": 2 * tm.TOKENS_PER_PROGRAM,
                        "CHUNK_PAD": 2 * tm.TOKENS_PER_PROGRAM, "ROWS": tm.COUNT_ROWS}, arch)
        types = {"y_ptr": "*" + ty, "positions_ptr": "*i32", "gates_ptr": "*" + ty, "bias_ptr": "*" + ty,
                 "out_ptr": "*" + ty}
        compile_kernel(f"combine_sm{arch}_{ty}", tm._combine_kernel, types,
                       {"TOP_K": 2, "BLOCK": tm.COMBINE_BLOCK}, arch)
"""


@pytest.mark.skipif(CUDA, reason="on CUDA the kernels are compiled and run by the other tests")
def test_kernels_compile_for_sm80_and_sm90_without_spills(tmp_path: Path) -> None:
    cubins = compile_kernels(_KERNELS, tmp_path)
    assert len(cubins) == 12
    assert_no_spills(cubins)
