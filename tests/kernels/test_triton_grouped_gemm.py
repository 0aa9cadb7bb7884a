"""The Triton grouped GEMM against the per-expert loop, and the expert-path dispatch.

Without CUDA the kernel runs on CPU tensors under the Triton interpreter (switched on before the kernel module
is first imported); on a CUDA machine the same tests run the compiled kernel and add bf16.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from tests.support.triton_env import (  # first: may switch on the interpreter
    CUDA,
    DEVICE,
    skip_unless_kernels_run,
)

# isort: split

from model.kernels import KernelChoice, KernelError, select_kernels, triton_grouped_gemm
from model.kernels.triton_grouped_gemm import block_m_for, grouped_gemm, grouped_linear_triton
from model.layers.attention import allocate_kv_cache
from model.layers.experts import grouped_linear_loop
from model.layers.routing import ExpertCounts
from model.loader import load_model
from server.engine.worker.batch import build_flat_batch
from tests.support.checkpoints import TOP2_OF_8, save_checkpoint
from tests.support.triton_compile import assert_no_spills, compile_kernels

skip_unless_kernels_run(triton_grouped_gemm)

COUNTS = {
    "all-busy": [3, 5, 2, 6],
    "idle-experts": [0, 7, 0, 1],
    "only-first": [40, 0, 0, 0],
    "only-last": [0, 0, 0, 9],
    "one-each": [1] * 8,
    "tile-edges": [16, 17, 0, 33],
}
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if CUDA else [])
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-2, torch.bfloat16: 5e-2}


def inputs(counts: list[int], in_features: int, out_features: int, dtype: torch.dtype):
    gen = torch.Generator().manual_seed(sum(counts) * 31 + in_features)
    x = torch.randn(sum(counts), in_features, generator=gen)  # [N, in]
    weight = torch.randn(len(counts), out_features, in_features, generator=gen) / in_features**0.5  # [E, out, in]
    offsets = torch.tensor(counts).cumsum(0).to(torch.int32)  # [E]
    return x.to(DEVICE, dtype), weight.to(DEVICE, dtype), offsets.to(DEVICE)


def reference(x: torch.Tensor, weight: torch.Tensor, counts: list[int]) -> torch.Tensor:
    return grouped_linear_loop(x.float(), weight.float(), ExpertCounts.from_counts(counts))


def max_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return (actual.float() - expected).abs().max().item()


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("name", list(COUNTS))
def test_grouped_gemm_matches_the_loop(name: str, dtype: torch.dtype) -> None:
    counts = COUNTS[name]
    x, weight, offsets = inputs(counts, in_features=40, out_features=70, dtype=dtype)  # not tile multiples
    actual = grouped_gemm(x, weight, offsets)
    assert actual.shape == (sum(counts), 70) and actual.dtype == dtype
    assert max_error(actual, reference(x, weight, counts)) <= TOLERANCE[dtype]


@pytest.mark.parametrize("block_m", [16, 32, 128])
def test_every_tile_height_covers_every_row(block_m: int) -> None:
    counts = [50, 3, 0, 31, 1]
    x, weight, offsets = inputs(counts, in_features=24, out_features=130, dtype=torch.float32)
    actual = grouped_gemm(x, weight, offsets, block_m=block_m)
    assert max_error(actual, reference(x, weight, counts)) <= 1e-5


def test_strided_input_and_int64_offsets() -> None:
    counts = [4, 0, 6]
    x, weight, offsets = inputs(counts, in_features=32, out_features=48, dtype=torch.float32)
    wide = torch.zeros(x.shape[0], 64, device=DEVICE)
    wide[:, 16:48] = x
    strided = wide[:, 16:48]  # [N, 32] with row stride 64
    actual = grouped_gemm(strided, weight, offsets.long())
    assert max_error(actual, reference(x, weight, counts)) <= 1e-5


def test_no_rows() -> None:
    x, weight, offsets = inputs([0, 0], in_features=8, out_features=16, dtype=torch.float32)
    assert grouped_gemm(x, weight, offsets).shape == (0, 16)


def test_block_m_follows_rows_per_expert() -> None:
    assert block_m_for(2, 8) == 16  # a decode step: a row or two per expert
    assert block_m_for(8 * 40, 8) == 64
    assert block_m_for(16 * 512 * 2, 8) == 128  # a long prefill
    assert block_m_for(16 * 512 * 2, 8, torch.float32) == 64


def test_selection() -> None:
    x, weight, _ = inputs([3, 2], 16, 16, torch.float32)
    counts = ExpertCounts.from_counts([3, 2], DEVICE)
    expected = reference(x, weight, [3, 2])
    chosen = select_kernels(DEVICE, KernelChoice(experts="triton"))
    assert chosen.expert_matmul is grouped_linear_triton and chosen.cuda_graph_safe is CUDA
    assert max_error(chosen.expert_matmul(x, weight, counts), expected) <= 1e-5
    assert select_kernels("cpu").expert_matmul is grouped_linear_loop  # auto on CPU: the reference
    with pytest.raises(KernelError, match="unknown expert kernel"):
        KernelChoice(experts="cutlass")
    if CUDA:  # fp32: torch._grouped_mm's fast kernel does not apply
        assert select_kernels(DEVICE, dtype=torch.float32).choice.experts == "triton"


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory):
    directory = tmp_path_factory.mktemp("gemm_ckpt")
    save_checkpoint(TOP2_OF_8, directory, seed=21)
    return directory


def test_whole_model_logits_match_the_loop(tiny_model) -> None:
    models = {
        path: load_model(tiny_model, dtype="float32", device=DEVICE, kernels=KernelChoice(experts=path))
        for path in ("loop", "triton")
    }
    c = models["loop"].config
    gen = torch.Generator().manual_seed(5)
    lengths = [9, 1, 14]
    ids = torch.randint(0, c.vocab_size, (sum(lengths),), generator=gen).to(DEVICE)
    pool = list(range(12))
    random.Random(6).shuffle(pool)
    tables = [pool[4 * i : 4 * i + 4] for i in range(len(lengths))]
    logits = {}
    for path, model in models.items():
        assert model.kernels.choice.experts == path
        positions, meta = build_flat_batch(
            model.attention_backend, lengths, lengths, tables, 4, device=DEVICE, all_logits=True
        )
        cache = allocate_kv_cache(c.num_layers, 12, 4, c.num_kv_heads, c.head_dim, torch.float32, DEVICE)
        logits[path] = model(ids, positions, cache, meta)
    assert (logits["triton"] - logits["loop"]).abs().max().item() <= 1e-5


# The JetMoe-8B expert projections (hidden 2048, 16 x 128 query heads, intermediate 5632), each tile height.
_KERNELS = """
from model.kernels import triton_grouped_gemm as gg

for arch in (80, 90):
    for ty, block_k in (("bf16", 64), ("fp16", 64), ("fp32", 32)):
        for block_m in (16, 32, 64) + ((128,) if ty != "fp32" else ()):
            types = {"x_ptr": "*" + ty, "w_ptr": "*" + ty, "out_ptr": "*" + ty, "offsets_ptr": "*i32"}
            options = {"BLOCK_M": block_m, "BLOCK_N": gg.BLOCK_N, "BLOCK_K": block_k, "EVEN_K": True,
                       "DOT_PRECISION": "ieee" if ty == "fp32" else "tf32",
                       "num_warps": gg.num_warps_for(block_m)}
            compile_kernel(f"grouped_gemm_sm{arch}_{ty}_m{block_m}", gg._grouped_gemm_kernel, types, options, arch)
"""


@pytest.mark.skipif(CUDA, reason="on CUDA the kernel is compiled and run by the other tests")
def test_kernel_compiles_for_sm80_and_sm90_without_spills(tmp_path: Path) -> None:
    cubins = compile_kernels(_KERNELS, tmp_path)
    assert len(cubins) == 22
    assert_no_spills(cubins)
