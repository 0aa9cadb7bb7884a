"""Grouped expert matmul: ``torch._grouped_mm`` against the per-expert loop, the router's counts and offsets,
and when ``select_kernels`` picks ``torch._grouped_mm``."""

from __future__ import annotations

import pytest
import torch

from model.config import JetMoeModelConfig
from model.kernels import KernelChoice, registry, select_kernels
from model.layers.experts import grouped_linear_grouped_mm, grouped_linear_loop
from model.layers.routing import ExpertCounts, TopKRouter

CUDA = torch.cuda.is_available()
needs_grouped_mm = pytest.mark.skipif(not hasattr(torch, "_grouped_mm"), reason="torch has no _grouped_mm")


def sorted_inputs(counts: list[int], in_features: int, out_features: int, dtype=torch.float32, device="cpu"):
    gen = torch.Generator().manual_seed(sum(counts) + len(counts))
    x = torch.randn(sum(counts), in_features, generator=gen).to(dtype=dtype, device=device)  # [N, in]
    weight = torch.randn(len(counts), out_features, in_features, generator=gen).to(dtype=dtype, device=device)
    return x, weight, ExpertCounts.from_counts(counts, device)


def config(hidden: int = 64, heads: int = 4, head_dim: int = 16, intermediate: int = 96) -> JetMoeModelConfig:
    return JetMoeModelConfig(vocab_size=32, hidden_size=hidden, num_layers=1, num_kv_heads=heads,
                             head_dim=head_dim, intermediate_size=intermediate, num_experts=4, top_k=2)


@needs_grouped_mm
@pytest.mark.parametrize(
    "counts",
    [[3, 5, 2, 6], [0, 7, 0, 1], [4, 0, 0, 0], [0, 0, 0, 9], [1, 1, 1, 1, 1, 1, 1, 1]],
    ids=["all-busy", "idle-experts", "only-first", "only-last", "one-each"],
)
def test_grouped_mm_equals_loop_on_cpu_fp32(counts: list[int]) -> None:
    x, weight, expert_counts = sorted_inputs(counts, in_features=16, out_features=24)
    expected = grouped_linear_loop(x, weight, expert_counts)
    actual = grouped_linear_grouped_mm(x, weight, expert_counts)
    assert actual.shape == expected.shape == (sum(counts), 24)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


def test_cpu_selection_keeps_the_loop() -> None:
    kernels = select_kernels("cpu", dtype=torch.float32, config=config())
    assert kernels.expert_matmul is grouped_linear_loop and kernels.choice.experts == "loop"
    explicit = select_kernels("cpu", KernelChoice(experts="grouped_mm"))
    assert explicit.expert_matmul is grouped_linear_grouped_mm and explicit.choice.experts == "grouped_mm"


def test_router_exposes_counts_and_device_offsets() -> None:
    torch.manual_seed(0)
    router = TopKRouter(hidden_size=8, num_experts=6, top_k=2)
    x = torch.randn(11, 8)
    routing = router(x)
    experts = router.layer(x).topk(2, dim=1).indices.flatten()
    expected = tuple(torch.bincount(experts, minlength=6).tolist())
    counts = routing.expert_counts
    assert isinstance(counts, ExpertCounts)
    assert counts == expected and tuple(counts) == expected
    assert len(counts) == 6 and counts[2] == expected[2]
    assert counts.offsets.dtype == torch.int32
    assert counts.offsets.tolist() == torch.tensor(expected).cumsum(0).tolist()
    # Sorted assignments really are grouped by expert in that order.
    assert torch.equal(
        experts[routing.slot_order], torch.repeat_interleave(torch.arange(6), torch.tensor(expected))
    )


def test_grouped_mm_needs_bf16_and_16_byte_rows() -> None:
    device = torch.device("cpu")  # both checks come before any device query
    assert not registry._fast_grouped_mm(device, torch.float32, config())
    assert not registry._fast_grouped_mm(device, torch.bfloat16, config(intermediate=100))  # 200-byte rows
    assert not registry._fast_grouped_mm(device, torch.bfloat16, config(heads=3, head_dim=2))  # kv 6 wide


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.skipif(CUDA and torch.cuda.get_device_capability() < (9, 0), reason="fast grouped_mm needs sm_90")
@needs_grouped_mm
@pytest.mark.parametrize("counts", [[30, 0, 17, 64, 1, 0, 9, 7], [0, 0, 0, 128, 0, 0, 0, 0]])
def test_cuda_bf16_uses_grouped_mm_without_host_sync(counts: list[int]) -> None:
    kernels = select_kernels("cuda", dtype=torch.bfloat16, config=config(hidden=256, intermediate=256))
    assert kernels.choice.experts == "grouped_mm", "grouped_mm not chosen on CUDA bf16"
    x, weight, offsets = sorted_inputs(counts, 256, 512, dtype=torch.bfloat16, device="cuda")
    lazy = ExpertCounts(torch.tensor(counts, device="cuda"), offsets.offsets)
    actual = kernels.expert_matmul(x, weight, lazy)
    assert lazy._values is None, "the grouped_mm path read the counts back to the host"
    expected = grouped_linear_loop(x, weight, ExpertCounts.from_counts(counts, "cuda"))
    torch.testing.assert_close(actual.float(), expected.float(), rtol=2e-2, atol=2e-2)
