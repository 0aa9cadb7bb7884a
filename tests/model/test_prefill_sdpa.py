"""What prefill attention hands ``scaled_dot_product_attention`` on each device path, and that every path
computes JetMoe's attention (query head ``k * Hkv + j`` reads KV head ``j``).

The fused SDPA kernels (flash and memory-efficient on CUDA, the fused CPU kernel) take only 4-D inputs; CUDA's
flash kernel serves grouped-query attention without a K/V copy. The CUDA path is chosen by ``gqa=True``, which
is what ``query.is_cuda`` selects, so it runs here on CPU tensors.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from model.layers import attention
from model.layers.attention import PrefillSlice

HEADS, TOP_K, DIM, BLOCK = 2, 2, 8, 4


class SpySDPA:
    """Records the arguments of every SDPA call, then runs the real one."""

    def __init__(self) -> None:
        self.calls: list[tuple[tuple[torch.Tensor, ...], dict]] = []
        self.real = F.scaled_dot_product_attention

    def __call__(self, q, k, v, **kwargs):
        self.calls.append(((q, k, v), kwargs))
        return self.real(q, k, v, **kwargs)


@pytest.fixture
def spy(monkeypatch: pytest.MonkeyPatch) -> SpySDPA:
    recorder = SpySDPA()
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", recorder)
    return recorder


def naive(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, context: int) -> torch.Tensor:
    """``[Q, K, Hkv, Dh]``: each query head over its KV head with an explicit softmax, causal from the end."""
    q_len = query.shape[0]
    scores = torch.einsum("qkhd,chd->qkhc", query, keys) / math.sqrt(DIM)  # [Q, K, Hkv, C]
    key_pos, query_pos = torch.arange(context), torch.arange(context - q_len, context)
    allowed = key_pos[None, :] <= query_pos[:, None]  # [Q, C]
    scores = scores.masked_fill(~allowed[:, None, None, :], float("-inf"))
    return torch.einsum("qkhc,chd->qkhd", scores.softmax(-1), values)


def case(q_len: int, context: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    blocks = -(-context // BLOCK)
    cache = torch.randn(2, blocks + 2, BLOCK, HEADS, DIM, generator=gen)  # [2, N, bs, Hkv, Dh]
    block_ids = torch.arange(blocks + 1, 0, -1)[:blocks]  # out of order
    keys = cache[0][block_ids].reshape(-1, HEADS, DIM)[:context]  # [C, Hkv, Dh]
    values = cache[1][block_ids].reshape(-1, HEADS, DIM)[:context]  # [C, Hkv, Dh]
    query = torch.randn(q_len, TOP_K, HEADS, DIM, generator=gen)  # [Q, K, Hkv, Dh]
    causal = torch.arange(context)[None, :] <= torch.arange(context - q_len, context)[:, None]  # [Q, C]
    piece = PrefillSlice(0, q_len, context, block_ids, causal)
    new_k, new_v = keys[context - q_len :].clone(), values[context - q_len :].clone()  # [Q, Hkv, Dh]
    return query, new_k, new_v, cache, piece, naive(query, keys, values, context)


def run(query, key, value, cache, piece, gqa):
    return attention._prefill_attention(query, key, value, cache, piece, 1 / math.sqrt(DIM), gqa=gqa)


def test_fresh_prompt_on_cuda_is_one_grouped_query_causal_call(spy: SpySDPA) -> None:
    query, key, value, cache, piece, expected = case(q_len=7, context=7, seed=1)
    out = run(query, key, value, cache, piece, gqa=True)
    [((q, k, v), kwargs)] = spy.calls
    assert q.shape == (1, HEADS * TOP_K, 7, DIM) and k.shape == v.shape == (1, HEADS, 7, DIM)
    assert kwargs["is_causal"] is True and kwargs["enable_gqa"] is True and kwargs.get("attn_mask") is None
    assert k.untyped_storage().data_ptr() == key.untyped_storage().data_ptr()  # a view: no expanded K copy
    assert v.untyped_storage().data_ptr() == value.untyped_storage().data_ptr()
    assert (out - expected).abs().max().item() <= 1e-5


@pytest.mark.parametrize("gqa", [False, True], ids=["cpu", "cuda"])
def test_chunk_after_cached_tokens_folds_the_experts_under_a_mask(spy: SpySDPA, gqa: bool) -> None:
    query, key, value, cache, piece, expected = case(q_len=5, context=13, seed=2)
    out = run(query, key, value, cache, piece, gqa=gqa)
    [((q, k, v), kwargs)] = spy.calls
    assert q.shape == (1, HEADS, TOP_K * 5, DIM) and k.shape == v.shape == (1, HEADS, 13, DIM)
    assert kwargs["attn_mask"].shape == (TOP_K * 5, 13) and "enable_gqa" not in kwargs
    assert not kwargs.get("is_causal", False)
    assert (out - expected).abs().max().item() <= 1e-5


def test_fresh_prompt_on_cpu_folds_the_experts_without_copying_keys(spy: SpySDPA) -> None:
    query, key, value, cache, piece, expected = case(q_len=9, context=9, seed=3)
    out = run(query, key, value, cache, piece, gqa=None)  # CPU tensors: the CPU path
    [((q, k, v), kwargs)] = spy.calls
    assert q.shape == (1, HEADS, TOP_K * 9, DIM) and k.shape == (1, HEADS, 9, DIM)
    assert kwargs["attn_mask"].shape == (TOP_K * 9, 9) and "enable_gqa" not in kwargs
    assert k.untyped_storage().data_ptr() == key.untyped_storage().data_ptr()
    assert (out - expected).abs().max().item() <= 1e-5


def test_the_reference_backend_prefills_through_that_path(spy: SpySDPA) -> None:
    from server.engine.worker.batch import build_flat_batch

    backend = attention.TorchPagedAttention()
    query, key, value, cache, _, _ = case(q_len=6, context=6, seed=4)
    _, meta = build_flat_batch(backend, [6], [6], [[3, 2]], BLOCK)
    out = backend.attend(query, key, value, cache, meta, 1 / math.sqrt(DIM))
    [((q, _, _), kwargs)] = spy.calls
    assert q.dim() == 4 and kwargs["attn_mask"].shape == (TOP_K * 6, 6)
    assert (out - naive(query, key, value, 6)).abs().max().item() <= 1e-5
