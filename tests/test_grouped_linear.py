"""Grouped expert matmul: ``torch._grouped_mm`` against the per-expert loop, and the router's offsets."""

from __future__ import annotations

import pytest
import torch

from model import moe
from model.moe import (
    ExpertCounts,
    TopKRouter,
    grouped_linear,
    grouped_linear_grouped_mm,
    grouped_linear_reference,
)

CUDA = torch.cuda.is_available()
needs_grouped_mm = pytest.mark.skipif(not hasattr(torch, "_grouped_mm"), reason="torch has no _grouped_mm")


def sorted_inputs(counts: list[int], in_features: int, out_features: int, dtype=torch.float32, device="cpu"):
    gen = torch.Generator().manual_seed(sum(counts) + len(counts))
    x = torch.randn(sum(counts), in_features, generator=gen).to(dtype=dtype, device=device)  # [N, in]
    weight = torch.randn(len(counts), out_features, in_features, generator=gen).to(dtype=dtype, device=device)
    offsets = torch.tensor(counts).cumsum(0).to(dtype=torch.int32, device=device)  # [E]
    return x, weight, offsets


@needs_grouped_mm
@pytest.mark.parametrize(
    "counts",
    [[3, 5, 2, 6], [0, 7, 0, 1], [4, 0, 0, 0], [0, 0, 0, 9], [1, 1, 1, 1, 1, 1, 1, 1]],
    ids=["all-busy", "idle-experts", "only-first", "only-last", "one-each"],
)
def test_grouped_mm_equals_loop_on_cpu_fp32(counts: list[int]) -> None:
    x, weight, offsets = sorted_inputs(counts, in_features=16, out_features=24)
    expected = grouped_linear_reference(x, weight, tuple(counts))
    actual = grouped_linear_grouped_mm(x, weight, offsets)
    assert actual.shape == expected.shape == (sum(counts), 24)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


def test_cpu_dispatch_keeps_the_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*args):
        raise AssertionError("torch._grouped_mm path taken on CPU")

    monkeypatch.setattr(moe, "grouped_linear_grouped_mm", fail)
    x, weight, _ = sorted_inputs([2, 0, 3], 8, 8)
    assert torch.equal(grouped_linear(x, weight, (2, 0, 3)), grouped_linear_reference(x, weight, (2, 0, 3)))


def test_router_exposes_counts_and_device_offsets() -> None:
    torch.manual_seed(0)
    router = TopKRouter(hidden_size=8, num_experts=6, top_k=2)
    x = torch.randn(11, 8)
    routing = router(x)
    experts = router.layer(x).topk(2, dim=1).indices.flatten()
    expected = tuple(torch.bincount(experts, minlength=6).tolist())
    assert isinstance(routing.expert_counts, ExpertCounts)
    assert routing.expert_counts == expected and tuple(routing.expert_counts) == expected
    assert len(routing.expert_counts) == 6 and routing.expert_counts[2] == expected[2]
    assert routing.expert_offsets.dtype == torch.int32
    assert routing.expert_offsets.tolist() == torch.tensor(expected).cumsum(0).tolist()
    assert routing.expert_counts.offsets is routing.expert_offsets
    # Sorted assignments really are grouped by expert in that order.
    assert torch.equal(
        experts[routing.slot_order], torch.repeat_interleave(torch.arange(6), torch.tensor(expected))
    )


def test_alignment_check() -> None:
    assert moe._aligned(torch.empty(4, 8, dtype=torch.bfloat16))  # 16-byte rows
    assert not moe._aligned(torch.empty(4, 6, dtype=torch.bfloat16))  # 12-byte rows
    assert not moe._aligned(torch.empty(8, 4, dtype=torch.bfloat16).t())  # not unit stride
    assert not moe._grouped_mm_applies(torch.empty(4, 8), torch.empty(2, 8, 8))  # CPU, fp32


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.skipif(CUDA and torch.cuda.get_device_capability() < (9, 0), reason="fast grouped_mm needs sm_90")
@needs_grouped_mm
@pytest.mark.parametrize("counts", [[30, 0, 17, 64, 1, 0, 9, 7], [0, 0, 0, 128, 0, 0, 0, 0]])
def test_cuda_bf16_uses_grouped_mm_without_host_sync(counts: list[int]) -> None:
    x, weight, offsets = sorted_inputs(counts, 256, 512, dtype=torch.bfloat16, device="cuda")
    assert moe._grouped_mm_applies(x, weight), "grouped_mm path not taken on CUDA bf16"
    lazy = ExpertCounts(torch.tensor(counts, device="cuda"), offsets)
    actual = grouped_linear(x, weight, lazy)
    assert lazy._values is None, "the grouped_mm path read the counts back to the host"
    expected = grouped_linear_reference(x, weight, tuple(counts))
    torch.testing.assert_close(actual.float(), expected.float(), rtol=2e-2, atol=2e-2)
