"""Fused Triton RMSNorm (+ residual add) and rotary + K/V write against the PyTorch reference, and the whole
model with every fused kernel (norms, routing, expert combine, rotary) against the reference.

Without CUDA the kernels run under the Triton interpreter, whose float32 -> bfloat16 cast truncates where a
GPU rounds to nearest: bf16 results are compared within two bf16 steps there, exactly on CUDA.
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

from model.kernels import KernelChoice, KernelError, triton_fused
from model.kernels.triton_fused import rms_norm, rotary_write_kv
from model.layers.attention import allocate_kv_cache
from model.layers.norm import RMSNorm
from model.layers.rotary import RotaryEmbedding, apply_rotary
from model.loader import load_model
from server.engine.worker.batch import build_flat_batch
from tests.support.checkpoints import TOP1_OF_4, save_checkpoint
from tests.support.triton_compile import assert_no_spills, compile_kernels

skip_unless_kernels_run(triton_fused)

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def tolerance(dtype: torch.dtype, scale: float) -> float:
    if dtype == torch.float32:
        return 1e-6 * scale
    if dtype == torch.bfloat16 and not CUDA:
        return 2 * 2**-7 * scale  # the interpreter truncates: up to two bf16 steps
    return (2**-10 if dtype == torch.float16 else 2**-8) * scale  # one rounding step


def reference_norm(dim: int, dtype: torch.dtype, seed: int) -> RMSNorm:
    norm = RMSNorm(dim, 1e-6).to(DEVICE, dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.empty(dim).uniform_(0.5, 1.5, generator=torch.Generator().manual_seed(seed)))
    return norm


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("dim", [48, 96, 2048])
def test_rms_norm_with_and_without_residual(dim: int, dtype: torch.dtype) -> None:
    norm = reference_norm(dim, dtype, seed=dim)
    gen = torch.Generator().manual_seed(dim + 1)
    x = (3 * torch.randn(7, dim, generator=gen)).to(DEVICE, dtype)  # [T, D]
    residual = torch.randn(7, dim, generator=gen).to(DEVICE, dtype)  # [T, D]
    expected, expected_sum = norm(x, residual)
    written = residual.clone()
    actual, actual_sum = rms_norm(x, norm.weight, norm.eps, written)
    assert actual_sum.data_ptr() == written.data_ptr(), "the sum is written into the residual buffer"
    scale = expected.abs().max().item()
    assert (actual_sum.float() - expected_sum.float()).abs().max().item() <= tolerance(dtype, 5.0)
    assert (actual.float() - expected.float()).abs().max().item() <= tolerance(dtype, scale) * 2
    alone, same = rms_norm(x, norm.weight, norm.eps)
    assert same is x
    expected_alone, _ = norm(x)
    assert (alone.float() - expected_alone.float()).abs().max().item() <= tolerance(dtype, scale) * 2


def test_rms_norm_edge_cases() -> None:
    norm = reference_norm(16, torch.float32, seed=0)
    out, _ = rms_norm(torch.empty(0, 16, device=DEVICE), norm.weight, 1e-6)
    assert out.shape == (0, 16)
    with pytest.raises(ValueError, match="unit stride"):
        rms_norm(torch.randn(16, 4, device=DEVICE).t(), norm.weight[:4], 1e-6)
    with pytest.raises(KernelError, match="unknown fused kernels"):
        KernelChoice(fused="apex")


# (tokens, top_k, kv heads, head dim): JetMoe's top-2, top-1, and odd head counts and dims.
ROTARY_SHAPES = [(5, 2, 4, 16), (3, 1, 2, 32), (4, 3, 3, 24)]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("shape", ROTARY_SHAPES, ids=lambda s: "t{}-k{}-h{}-d{}".format(*s))
def test_rotary_write_kv_matches_rotary_then_write(shape, dtype: torch.dtype) -> None:
    tokens, top_k, heads, dim = shape
    block = 4
    gen = torch.Generator().manual_seed(sum(shape))
    query = torch.randn(tokens, top_k, heads, dim, generator=gen).to(DEVICE, dtype)  # [T, K, Hkv, Dh]
    kv = torch.randn(tokens, 2 * heads * dim, generator=gen).to(DEVICE, dtype)  # like kv_proj's output
    key = kv[:, : heads * dim].view(tokens, heads, dim)  # [T, Hkv, Dh], strided
    value = kv[:, heads * dim :].view(tokens, heads, dim)  # [T, Hkv, Dh], strided
    positions = torch.tensor(random.Random(1).sample(range(200), tokens), device=DEVICE)
    cos, sin = RotaryEmbedding(dim, 10000.0)(positions, dtype)  # [T, Dh] each
    slots = list(range(0, 3 * tokens, 3))
    slots[1] = -1  # a padding token: rotated, not stored
    cache = torch.randn(2, tokens, block, heads, dim, generator=gen).to(DEVICE, dtype)
    expected_q, expected_k = apply_rotary(query, cos, sin), apply_rotary(key, cos, sin)
    expected_cache = cache.clone()
    for t, slot in enumerate(slots):
        if slot >= 0:
            expected_cache[0].view(-1, heads, dim)[slot] = expected_k[t]
            expected_cache[1].view(-1, heads, dim)[slot] = value[t]
    rotary_write_kv(query, key, value, cos, sin, cache, torch.tensor(slots, device=DEVICE))
    tol = tolerance(dtype, 4.0) * 2
    assert (query.float() - expected_q.float()).abs().max().item() <= tol
    assert (key.float() - expected_k.float()).abs().max().item() <= tol
    assert (cache.float() - expected_cache.float()).abs().max().item() <= tol


def test_whole_model_with_fused_kernels_matches_reference(tmp_path: Path) -> None:
    save_checkpoint(TOP1_OF_4, tmp_path, seed=17)
    reference = load_model(tmp_path, dtype="float32", device=DEVICE, kernels=KernelChoice("torch", "loop", "torch"))
    fused = load_model(tmp_path, dtype="float32", device=DEVICE, kernels=KernelChoice("triton", "loop", "triton"))
    assert fused.kernels.rms_norm is rms_norm and fused.model.norm.impl is rms_norm
    c = reference.config
    lengths = [6, 11, 1]
    pool = list(range(12))
    random.Random(3).shuffle(pool)
    tables = [pool[4 * i : 4 * i + 4] for i in range(3)]
    ids = torch.randint(0, c.vocab_size, (sum(lengths),), generator=torch.Generator().manual_seed(4))
    caches = [allocate_kv_cache(c.num_layers, 12, 4, c.num_kv_heads, c.head_dim, torch.float32, DEVICE)
              for _ in range(2)]
    logits = []
    for model, cache in zip((reference, fused), caches):
        positions, meta = build_flat_batch(
            model.attention_backend, lengths, lengths, tables, 4, device=DEVICE, all_logits=True
        )
        logits.append(model(ids.to(DEVICE), positions, cache, meta))
    expected, actual = logits
    assert (actual - expected).abs().max().item() <= 1e-5
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(caches[0], caches[1]))


# JetMoe-8B: hidden 2048; 2 x 16 query heads and 16 KV heads of 128.
_KERNELS = """
from model.kernels import triton_fused as tf

for arch in (80, 90):
    for ty in ("bf16", "fp16", "fp32"):
        for residual in (False, True):
            types = {"x_ptr": "*" + ty, "res_ptr": "*" + ty, "w_ptr": "*" + ty, "out_ptr": "*" + ty, "eps": "fp32"}
            compile_kernel(f"rms_norm_sm{arch}_{ty}_{residual}", tf._rms_norm_kernel, types,
                           {"HAS_RESIDUAL": residual, "BLOCK": 2048, "num_warps": 8}, arch)
        types = {n: "*" + ty for n in ("q_ptr", "k_ptr", "v_ptr", "cos_ptr", "sin_ptr", "cache_ptr")}
        types["slot_ptr"] = "*i64"
        compile_kernel(f"rotary_sm{arch}_{ty}", tf._rotary_write_kv_kernel, types,
                       {"Q_HEADS": 32, "KV_HEADS": 16, "HALF": 64}, arch)
"""


@pytest.mark.skipif(CUDA, reason="on CUDA the kernels are compiled and run by the other tests")
def test_kernels_compile_for_sm80_and_sm90_without_spills(tmp_path: Path) -> None:
    cubins = compile_kernels(_KERNELS, tmp_path)
    assert len(cubins) == 18
    assert_no_spills(cubins)
