"""Triton paged attention against the torch reference (``TorchPagedAttention``).

Without CUDA the kernels run on CPU tensors under the Triton interpreter, which must be switched on before
``triton`` (or ``model.triton_attention``) is first imported; sizes are kept tiny for it. On a CUDA machine
the same tests run the compiled kernels (``tl.dot`` path) and add bf16 cases.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from tests.triton_env import CUDA, DEVICE, skip_unless_kernels_run  # first: may switch on the interpreter

# isort: split

from model import triton_attention
from model.attention import TorchPagedAttention, allocate_kv_cache
from model.attention_metadata import build_flat_batch
from model.backends import BackendError, select_attention_backend
from model.loader import load_model
from model.triton_attention import TritonPagedAttention, write_kv
from tests.checkpoints import TOP2_OF_8, save_checkpoint
from tests.triton_compile import assert_no_spills, compile_kernels

skip_unless_kernels_run(triton_attention)

# (top_k, num_kv_heads, head_dim, block_size): JetMoe's top-2 and top-1, odd head counts, dims and block sizes.
SHAPES = [(2, 4, 16, 4), (1, 2, 32, 16), (3, 3, 24, 5)]
SHAPE_IDS = ["top2-h4-d16-b4", "top1-h2-d32-b16", "top3-h3-d24-b5"]
# Backend variants: the device default, forced tl.dot, forced context splits (flash-decoding), both.
VARIANTS = {
    "default": {},
    "dot": {"use_dot": True},
    "split3": {"num_splits": 3},
    "dot-split2": {"use_dot": True, "num_splits": 2},
}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-2, torch.bfloat16: 2e-2}


def dtype_id(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def backend_for(variant: str, dtype: torch.dtype) -> TritonPagedAttention:
    options = VARIANTS[variant]
    if not CUDA and dtype == torch.bfloat16 and options.get("use_dot"):
        pytest.skip("the Triton CPU interpreter computes bf16 tl.dot wrongly; covered on CUDA")
    return TritonPagedAttention(**options)


class Batch:
    """A random flat batch over a random paged cache with shuffled, non-contiguous block tables."""

    def __init__(
        self,
        shape: tuple[int, int, int, int],
        query_lens: list[int],
        context_lens: list[int],
        dtype: torch.dtype = torch.float32,
        seed: int = 0,
    ) -> None:
        top_k, heads, dim, block = shape
        gen = torch.Generator().manual_seed(seed)
        needed = [(c + block - 1) // block for c in context_lens]
        num_blocks = sum(needed) + 3
        pool = list(range(num_blocks))
        random.Random(seed).shuffle(pool)
        tables, start = [], 0
        for n in needed:
            tables.append(pool[start : start + n])
            start += n
        _, self.meta = build_flat_batch(query_lens, context_lens, tables, block, device=DEVICE)
        tokens = sum(query_lens)

        def rand(*size: int) -> torch.Tensor:
            return torch.randn(*size, generator=gen).to(dtype=dtype, device=DEVICE)

        self.cache = rand(2, num_blocks, block, heads, dim)  # [2, NB, BS, Hkv, Dh]
        kv = rand(tokens, 2 * heads * dim)  # like kv_proj's output: K and V are strided views
        self.key = kv[:, : heads * dim].view(tokens, heads, dim)  # [T, Hkv, Dh]
        self.value = kv[:, heads * dim :].view(tokens, heads, dim)  # [T, Hkv, Dh]
        self.query = rand(tokens, top_k, heads, dim)  # [T, K, Hkv, Dh]
        self.scale = dim**-0.5
        TorchPagedAttention().write_kv(self.cache, self.key, self.value, self.meta)

    def attend(self, backend) -> torch.Tensor:
        return backend.attend(self.query, self.key, self.value, self.cache, self.meta, self.scale)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    err = (actual.float() - expected.float()).abs().max().item()
    assert err <= TOLERANCE[dtype], f"max abs error {err}"


@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_write_kv_matches_reference_exactly(shape) -> None:
    batch = Batch(shape, query_lens=[5, 1, 3], context_lens=[5, 9, 11])
    for start in (torch.zeros_like(batch.cache), torch.randn_like(batch.cache)):
        expected, actual = start.clone(), start.clone()
        TorchPagedAttention().write_kv(expected, batch.key, batch.value, batch.meta)
        TritonPagedAttention().write_kv(actual, batch.key, batch.value, batch.meta)
        assert torch.equal(actual, expected)


def test_write_kv_skips_negative_slots() -> None:
    batch = Batch(SHAPES[0], query_lens=[6], context_lens=[6])
    cache = torch.zeros_like(batch.cache)
    slots = batch.meta.slot_mapping.clone()
    slots[2] = -1
    write_kv(cache, batch.key, batch.value, slots)
    expected = torch.zeros_like(batch.cache)
    keep = slots >= 0
    expected[0].view(-1, *batch.key.shape[1:])[slots[keep]] = batch.key[keep]
    expected[1].view(-1, *batch.key.shape[1:])[slots[keep]] = batch.value[keep]
    assert torch.equal(cache, expected)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_decode_batch_matches_reference(shape, variant, dtype) -> None:
    # Contexts of 1 key, below, at and past block boundaries; none a multiple of every block size.
    contexts = [1, 7, 13, 22]
    batch = Batch(shape, query_lens=[1] * len(contexts), context_lens=contexts, dtype=dtype, seed=1)
    assert_close(batch.attend(backend_for(variant, dtype)), batch.attend(TorchPagedAttention()), dtype)


@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_prefill_and_chunked_prefill_match_reference(shape) -> None:
    batch = Batch(shape, query_lens=[9, 4, 6], context_lens=[9, 11, 6], seed=2)  # prompt, chunk, prompt
    assert_close(batch.attend(TritonPagedAttention()), batch.attend(TorchPagedAttention()), torch.float32)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("variant", ["default", "dot-split2"])
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_mixed_batch_matches_reference(shape, variant, dtype) -> None:
    # prefill, decode, chunk, decode, decode, prefill: decodes through the kernel, the rest through SDPA
    batch = Batch(
        shape, query_lens=[7, 1, 5, 1, 1, 3], context_lens=[7, 10, 12, 3, 17, 3], dtype=dtype, seed=3
    )
    assert_close(batch.attend(backend_for(variant, dtype)), batch.attend(TorchPagedAttention()), dtype)


def test_decode_metadata_carries_context_lengths() -> None:
    batch = Batch(SHAPES[0], query_lens=[1, 4, 1], context_lens=[3, 6, 9], seed=4)
    group = batch.meta.decode
    assert group.context_lens.tolist() == [3, 9] and group.context_lens.dtype == torch.int32
    assert group.context_lens.tolist() == group.valid.sum(1).tolist()


def test_cpu_tensors_without_interpreter_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(triton_attention, "is_interpreted", lambda: False)
    batch = Batch(SHAPES[0], query_lens=[1], context_lens=[3])
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        TritonPagedAttention().write_kv(batch.cache.cpu(), batch.key.cpu(), batch.value.cpu(), batch.meta)
    with pytest.raises(BackendError, match="TRITON_INTERPRET"):
        select_attention_backend("cpu", "triton")


def test_select_attention_backend() -> None:
    assert isinstance(select_attention_backend("cpu"), TorchPagedAttention)
    assert isinstance(select_attention_backend("cpu", "torch"), TorchPagedAttention)
    assert isinstance(select_attention_backend(DEVICE, "triton"), TritonPagedAttention)  # interpreter on CPU
    if CUDA:
        assert isinstance(select_attention_backend("cuda"), TritonPagedAttention)
    with pytest.raises(BackendError, match="unknown attention backend"):
        select_attention_backend("cpu", "flash")


# Compiles the kernels as the GPU would run them (JetMoe-8B: top-2, 16 KV heads of 128) for sm_90.
_SM90_KERNELS = """
from model import triton_attention as ta

for dtype, ty in ((torch.bfloat16, "bf16"), (torch.float16, "fp16"), (torch.float32, "fp32")):
    for split in (False, True):
        ptrs = {"q_ptr": ty, "cache_ptr": ty, "out_ptr": ty, "part_acc_ptr": "fp32", "part_ml_ptr": "fp32",
                "token_ptr": "i64", "table_ptr": "i64", "lens_ptr": "i32"}
        types = {k: "*" + v for k, v in ptrs.items()} | {"scale": "fp32"}
        options = ta.decode_kernel_options(2, 128, dtype, use_dot=True) | {"SPLIT": split}
        compile_kernel(f"decode_{ty}_{'split' if split else 'single'}", ta._decode_kernel, types, options)
    ptrs = {"key_ptr": "*" + ty, "value_ptr": "*" + ty, "cache_ptr": "*" + ty, "slot_ptr": "*i64"}
    compile_kernel(f"write_kv_{ty}", ta._write_kv_kernel, ptrs, {"HEADS_PAD": 16, "DIM_PAD": 128})
    ptrs = {"out_ptr": "*" + ty, "part_acc_ptr": "*fp32", "part_ml_ptr": "*fp32", "token_ptr": "*i64"}
    compile_kernel(f"combine_{ty}", ta._combine_kernel, ptrs, {"TOPK_PAD": 2, "DIM_PAD": 128})
"""


@pytest.mark.skipif(CUDA, reason="on CUDA the kernels are compiled and run by the other tests")
def test_kernels_compile_for_sm90_without_spills(tmp_path: Path) -> None:
    cubins = compile_kernels(_SM90_KERNELS, tmp_path)
    assert len(cubins) == 12
    assert_no_spills(cubins)


_PREIMPORTED = textwrap.dedent(
    """
    import os, sys
    import torch._dynamo  # imports triton before the interpreter is switched on
    assert "triton" in sys.modules
    os.environ["TRITON_INTERPRET"] = "1"
    import torch
    from model.attention import TorchPagedAttention
    from model.attention_metadata import build_flat_batch
    from model.triton_attention import TritonPagedAttention, is_interpreted
    assert is_interpreted()
    _, meta = build_flat_batch([1, 3, 1], [5, 7, 9], [[2, 0], [5, 3], [1, 4, 6]], 4)
    cache = torch.randn(2, 8, 4, 2, 8)
    q, k, v = torch.randn(5, 2, 2, 8), torch.randn(5, 2, 8), torch.randn(5, 2, 8)
    ref, fast = TorchPagedAttention(), TritonPagedAttention()
    expected = cache.clone()
    ref.write_kv(expected, k, v, meta)
    fast.write_kv(cache, k, v, meta)
    assert torch.equal(cache, expected)
    err = (fast.attend(q, k, v, cache, meta, 0.3) - ref.attend(q, k, v, cache, meta, 0.3)).abs().max()
    assert err <= 1e-5, err
    """
)


@pytest.mark.skipif(CUDA, reason="interpreter only")
def test_interpreter_works_when_torch_imported_triton_first() -> None:
    # In the full suite torch._dynamo (pulled in by other imports) loads triton before this module can set
    # TRITON_INTERPRET; the kernels must not depend on triton.language's own jit helpers being interpreted.
    root = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run(
        [sys.executable, "-c", _PREIMPORTED], cwd=root, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.fixture(scope="module")
def model_pair(tmp_path_factory: pytest.TempPathFactory):
    directory = tmp_path_factory.mktemp("triton_ckpt")
    save_checkpoint(TOP2_OF_8, directory, seed=11)
    reference = load_model(directory, dtype="float32", device=DEVICE, backend=TorchPagedAttention())
    fast = load_model(directory, dtype="float32", device=DEVICE, backend=TritonPagedAttention())
    return reference, fast


def run_model(model, cache, ids, query_lens, context_lens, tables) -> torch.Tensor:
    positions, meta = build_flat_batch(query_lens, context_lens, tables, 4, device=DEVICE, all_logits=True)
    return model(torch.tensor(ids, device=DEVICE), positions, cache, meta)


def test_whole_model_logits_match_reference_backend(model_pair) -> None:
    reference, fast = model_pair
    c = reference.config
    gen = torch.Generator().manual_seed(12)
    seqs = [torch.randint(0, c.vocab_size, (n,), generator=gen).tolist() for n in (10, 7, 13, 3)]
    cached = [0, 6, 5, 0]  # prefill, decode, chunk, prefill in the batched step
    pool = list(range(32))
    random.Random(13).shuffle(pool)
    tables = [pool[8 * i : 8 * i + 4] for i in range(len(seqs))]
    caches = [
        allocate_kv_cache(c.num_layers, 32, 4, c.num_kv_heads, c.head_dim, torch.float32, DEVICE)
        for _ in range(2)
    ]
    for model, cache in zip((reference, fast), caches):
        for seq, n, table in zip(seqs, cached, tables):
            if n:
                run_model(model, cache, seq[:n], [n], [n], [table])
    flat = [tok for seq, n in zip(seqs, cached) for tok in seq[n:]]
    q_lens = [len(s) - n for s, n in zip(seqs, cached)]
    ctx = [len(s) for s in seqs]
    expected = run_model(reference, caches[0], flat, q_lens, ctx, tables)
    actual = run_model(fast, caches[1], flat, q_lens, ctx, tables)
    assert (actual - expected).abs().max().item() <= 1e-5
    assert torch.equal(caches[0][0], caches[1][0])
    # Two all-decode steps on top of it.
    for step in range(2):
        next_ids = [int(i) for i in torch.randint(0, c.vocab_size, (len(seqs),), generator=gen)]
        ctx = [n + 1 for n in ctx]
        expected = run_model(reference, caches[0], next_ids, [1] * len(seqs), ctx, tables)
        actual = run_model(fast, caches[1], next_ids, [1] * len(seqs), ctx, tables)
        assert (actual - expected).abs().max().item() <= 1e-5, f"decode step {step}"
