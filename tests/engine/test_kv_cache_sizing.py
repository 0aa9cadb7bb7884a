"""KV cache sizing: the memory budget arithmetic, the profiled step, the padding block and the startup log."""

from __future__ import annotations

import logging

import pytest
import torch

from model.loader import load_model
from model.tokenizer import Tokenizer
from server.engine.config import EngineConfig
from server.engine.llm_engine import LLMEngine
from server.engine.worker.memory import (
    WORKSPACE_RESERVE,
    ProfileStep,
    decode_step,
    plan_for_device,
    plan_kv_cache_memory,
    profile_activation_peak,
    profile_batch,
    profile_steps,
)
from server.engine.worker.runner import kv_block_bytes, kv_blocks_for_memory

GIB = 1 << 30
CUDA = torch.cuda.is_available()


def test_budget_is_utilization_minus_what_is_in_use_and_the_peak() -> None:
    plan = plan_kv_cache_memory(total=140 * GIB, free=120 * GIB, weights=17 * GIB, activation_peak=2 * GIB,
                                utilization=0.9)
    assert plan.in_use == 20 * GIB
    assert plan.kv_cache == int(140 * GIB * 0.9) - 20 * GIB - 2 * GIB
    text = plan.describe()
    assert "90% of 140.0 GiB" in text and "weights 17.00 GiB" in text and "2.00 GiB activation peak" in text


def test_graph_pool_and_workspaces_are_reserved_explicitly() -> None:
    plan = plan_kv_cache_memory(total=140 * GIB, free=120 * GIB, weights=17 * GIB, activation_peak=2 * GIB,
                                utilization=0.95, reserved=GIB + WORKSPACE_RESERVE)
    assert plan.kv_cache == int(140 * GIB * 0.95) - 20 * GIB - 2 * GIB - GIB - WORKSPACE_RESERVE
    assert "1.50 GiB reserved for graphs and workspaces" in plan.describe()
    with pytest.raises(ValueError, match="1.50 GiB are reserved"):
        plan_kv_cache_memory(total=24 * GIB, free=4 * GIB, weights=17 * GIB, activation_peak=GIB, utilization=0.9,
                             reserved=GIB + WORKSPACE_RESERVE)


def test_profiled_steps_are_fresh_prompts_and_a_chunk_over_the_longest_context() -> None:
    assert profile_steps(2048, 4096) == [ProfileStep((2048,), (2048,)), ProfileStep((2048,), (4096,), False)]
    assert profile_steps(2048, 512) == [ProfileStep((512,) * 4, (512,) * 4), ProfileStep((511,), (512,), False)]
    assert profile_steps(16, 2) == [ProfileStep((2,) * 8, (2,) * 8)]  # no chunk can follow a 1-token cache
    assert decode_step(3, 16) == ProfileStep((1, 1, 1), (16, 16, 16), False)


def test_no_room_left_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="raise --gpu-memory-utilization or lower --max-num-batched-tokens"):
        plan_kv_cache_memory(total=80 * GIB, free=5 * GIB, weights=17 * GIB, activation_peak=GIB,
                             utilization=0.9)


def test_profile_batch_fills_the_token_budget_within_max_model_len() -> None:
    assert profile_batch(2048, 4096) == [2048]
    assert profile_batch(2048, 512) == [512] * 4
    assert profile_batch(1000, 300) == [300, 300, 300, 100]


@pytest.fixture(scope="module")
def parts(engine_checkpoint):
    directory, _ = engine_checkpoint
    return load_model(directory, dtype="float32", device="cpu"), Tokenizer.from_dir(directory)


def test_cache_has_one_padding_block_past_the_pool(parts) -> None:
    model, tokenizer = parts
    engine = LLMEngine(EngineConfig(model="unused", block_size=4, num_kv_blocks=20, max_model_len=64), model,
                       tokenizer)
    assert engine.num_kv_blocks == 20 and engine.runner.padding_block == 20
    assert all(cache.shape[1] == 21 for cache in engine.runner.kv_caches)
    assert engine.blocks.num_blocks == 20


def test_memory_sized_cache_counts_the_padding_block(parts) -> None:
    model, _ = parts
    per_block = kv_block_bytes(model, 16, torch.float32)
    assert kv_blocks_for_memory(model, 16, 10 * per_block, torch.float32) == 9
    assert kv_blocks_for_memory(model, 16, 10 * per_block - 1, torch.float32) == 8


def test_startup_logs_the_kv_cache_in_tokens(parts, caplog: pytest.LogCaptureFixture) -> None:
    model, tokenizer = parts
    per_block = kv_block_bytes(model, 4, torch.float32)
    config = EngineConfig(model="unused", block_size=4, kv_cache_memory=33 * per_block, max_model_len=64)
    with caplog.at_level(logging.INFO, logger="server.engine.core"):
        engine = LLMEngine(config, model, tokenizer)
    assert engine.num_kv_blocks == 32
    assert "KV cache: 32 blocks of 4 tokens = 128 tokens" in caplog.text and "2.0x max_model_len 64" in caplog.text


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_cuda_cache_is_sized_from_total_memory_after_the_profile(engine_checkpoint, caplog) -> None:
    directory, _ = engine_checkpoint
    model = load_model(directory, device="cuda")
    assert profile_activation_peak(model, 512, 256, 16) > 0
    probe = plan_for_device(model, 512, 256, 16, utilization=1.0)
    assert probe.in_use >= probe.weights > 0
    # A share that leaves this tiny model about 64 MiB of KV cache (a whole GPU would be millions of blocks).
    assert probe.reserved == WORKSPACE_RESERVE  # no graphs asked for: only the workspaces
    share = (probe.in_use + probe.activation_peak + probe.reserved + 64 * 2**20) / probe.total
    config = EngineConfig(model="unused", max_num_batched_tokens=512, max_model_len=256, enforce_eager=True,
                          gpu_memory_utilization=share)
    with caplog.at_level(logging.INFO, logger="server.engine.core"):
        engine = LLMEngine(config, model, Tokenizer.from_dir(directory))
    assert "GiB for the KV cache" in caplog.text and "activation peak" in caplog.text
    kv_bytes = (engine.num_kv_blocks + 1) * kv_block_bytes(model, 16, model.output_weight().dtype)
    assert 32 * 2**20 <= kv_bytes <= 64 * 2**20
