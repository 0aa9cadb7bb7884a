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

from tests.support.triton_env import (  # first: may switch on the interpreter
    CUDA,
    DEVICE,
    skip_unless_kernels_run,
)

# isort: split

from model.kernels import KernelChoice, KernelError, select_kernels, triton_attention
from model.kernels.triton_attention import TritonPagedAttention
from model.layers.attention import TorchPagedAttention, allocate_kv_cache, write_kv
from model.loader import load_model
from server.engine.worker.batch import build_flat_batch, flat_batch
from tests.support.checkpoints import TOP2_OF_8, save_checkpoint
from tests.support.triton_compile import assert_no_spills, compile_kernels

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
        _, self.batch = flat_batch(query_lens, context_lens, tables, block, device=DEVICE)
        tokens = sum(query_lens)

        def rand(*size: int) -> torch.Tensor:
            return torch.randn(*size, generator=gen).to(dtype=dtype, device=DEVICE)

        self.cache = rand(2, num_blocks, block, heads, dim)  # [2, NB, BS, Hkv, Dh]
        kv = rand(tokens, 2 * heads * dim)  # like kv_proj's output: K and V are strided views
        self.key = kv[:, : heads * dim].view(tokens, heads, dim)  # [T, Hkv, Dh]
        self.value = kv[:, heads * dim :].view(tokens, heads, dim)  # [T, Hkv, Dh]
        self.query = rand(tokens, top_k, heads, dim)  # [T, K, Hkv, Dh]
        self.scale = dim**-0.5
        write_kv(self.cache, self.key, self.value, self.batch.slot_mapping)

    def attend(self, backend) -> torch.Tensor:
        meta = backend.build_metadata(self.batch)  # each backend builds its own metadata
        return backend.attend(self.query, self.key, self.value, self.cache, meta, self.scale)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    err = (actual.float() - expected.float()).abs().max().item()
    assert err <= TOLERANCE[dtype], f"max abs error {err}"


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
    group = TritonPagedAttention().build_metadata(batch.batch).decode
    assert group.token_index.tolist() == [0, 5] and group.block_tables.shape[0] == 2
    assert group.context_lens.tolist() == [3, 9] and group.context_lens.dtype == torch.int32
    reference = TorchPagedAttention().build_metadata(batch.batch).decode
    assert group.context_lens.tolist() == reference.valid.sum(1).tolist()
    assert not hasattr(group, "valid"), "the Triton path builds no reference masks"


def test_cpu_tensors_without_interpreter_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(triton_attention, "is_interpreted", lambda: False)
    batch = Batch(SHAPES[0], query_lens=[1], context_lens=[3])
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        batch.attend(TritonPagedAttention())
    with pytest.raises(KernelError, match="TRITON_INTERPRET"):
        select_kernels("cpu", KernelChoice(attention="triton"))


def test_select_attention_backend() -> None:
    assert isinstance(select_kernels("cpu").attention, TorchPagedAttention)
    assert isinstance(select_kernels("cpu", KernelChoice(attention="torch")).attention, TorchPagedAttention)
    chosen = select_kernels(DEVICE, KernelChoice(attention="triton"))  # the interpreter on CPU
    assert isinstance(chosen.attention, TritonPagedAttention) and chosen.choice.attention == "triton"
    if CUDA:
        assert isinstance(select_kernels("cuda").attention, TritonPagedAttention)
    with pytest.raises(KernelError, match="unknown attention backend"):
        KernelChoice(attention="flash")


# Compiles the kernels as the GPU would run them (JetMoe-8B: top-2, 16 KV heads of 128) for sm_90.
_SM90_KERNELS = """
from model.kernels import triton_attention as ta

for dtype, ty in ((torch.bfloat16, "bf16"), (torch.float16, "fp16"), (torch.float32, "fp32")):
    for split in (False, True):
        ptrs = {"q_ptr": ty, "cache_ptr": ty, "out_ptr": ty, "part_acc_ptr": "fp32", "part_ml_ptr": "fp32",
                "token_ptr": "i64", "table_ptr": "i64", "lens_ptr": "i32"}
        types = {k: "*" + v for k, v in ptrs.items()} | {"scale": "fp32"}
        options = ta.decode_kernel_options(2, 128, dtype, use_dot=True) | {"SPLIT": split}
        compile_kernel(f"decode_{ty}_{'split' if split else 'single'}", ta._decode_kernel, types, options)
    ptrs = {"out_ptr": "*" + ty, "part_acc_ptr": "*fp32", "part_ml_ptr": "*fp32", "token_ptr": "*i64"}
    compile_kernel(f"combine_{ty}", ta._combine_kernel, ptrs, {"TOPK_PAD": 2, "DIM_PAD": 128})
"""


@pytest.mark.skipif(CUDA, reason="on CUDA the kernels are compiled and run by the other tests")
def test_kernels_compile_for_sm90_without_spills(tmp_path: Path) -> None:
    cubins = compile_kernels(_SM90_KERNELS, tmp_path)
    assert len(cubins) == 9
    assert_no_spills(cubins)


_PREIMPORTED = textwrap.dedent(
    """
    import os, sys
    import torch._dynamo  # imports triton before the interpreter is switched on
    assert "triton" in sys.modules
    os.environ["TRITON_INTERPRET"] = "1"
    import torch
    from model.layers.attention import TorchPagedAttention
    from server.engine.worker.batch import flat_batch
    from model.kernels.triton_attention import TritonPagedAttention, is_interpreted
    assert is_interpreted()
    _, batch = flat_batch([1, 3, 1], [5, 7, 9], [[2, 0], [5, 3], [1, 4, 6]], 4)
    cache = torch.randn(2, 8, 4, 2, 8)
    q, k, v = torch.randn(5, 2, 2, 8), torch.randn(5, 2, 8), torch.randn(5, 2, 8)
    ref, fast = TorchPagedAttention(), TritonPagedAttention()
    expected_q, expected_k = q.clone(), k.clone()
    expected = cache.clone()
    rotary = torch.randn(5, 8), torch.randn(5, 8)
    ref.rotate_and_write(expected_q, expected_k, v, rotary, expected, ref.build_metadata(batch))
    fast_meta = fast.build_metadata(batch)
    fast.rotate_and_write(q, k, v, rotary, cache, fast_meta)
    assert (cache - expected).abs().max() <= 1e-5
    err = (fast.attend(q, k, v, cache, fast_meta, 0.3) - ref.attend(q, k, v, cache, ref.build_metadata(batch), 0.3)).abs().max()
    assert err <= 1e-4, err
    """
)


@pytest.mark.skipif(CUDA, reason="interpreter only")
def test_interpreter_works_when_torch_imported_triton_first() -> None:
    # In the full suite torch._dynamo (pulled in by other imports) loads triton before this module can set
    # TRITON_INTERPRET; the kernels must not depend on triton.language's own jit helpers being interpreted.
    root = Path(__file__).resolve().parents[2]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run(
        [sys.executable, "-c", _PREIMPORTED], cwd=root, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.fixture(scope="module")
def model_pair(tmp_path_factory: pytest.TempPathFactory):
    directory = tmp_path_factory.mktemp("triton_ckpt")
    save_checkpoint(TOP2_OF_8, directory, seed=11)
    reference = load_model(directory, dtype="float32", device=DEVICE, kernels=KernelChoice("torch", "loop", "torch"))
    fast = load_model(directory, dtype="float32", device=DEVICE, kernels=KernelChoice("triton", "loop", "torch"))
    return reference, fast


def run_model(model, cache, ids, query_lens, context_lens, tables) -> torch.Tensor:
    positions, meta = build_flat_batch(
        model.attention_backend, query_lens, context_lens, tables, 4, device=DEVICE, all_logits=True
    )
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


class _RecordingLaunch:
    """Stands in for ``_combine_kernel``: records the split partials it is handed, then launches the kernel."""

    def __init__(self, kernel) -> None:
        self.kernel = kernel
        self.partials: list[torch.Tensor] = []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.partials.append(args[2].clone())  # part_ml [b, Hkv, splits, 2, K]: running max, sum
            return self.kernel[grid](*args, **kwargs)

        return launch


def test_splits_divide_each_context_not_the_table_width(monkeypatch: pytest.MonkeyPatch) -> None:
    # A decode graph's block tables are as wide as max_model_len; the contexts are much shorter.
    shape, contexts, width_blocks = (2, 2, 16, 4), [64, 20, 3], 64
    batch = Batch(shape, query_lens=[1, 1, 1], context_lens=contexts, seed=5)
    wide = torch.full((3, width_blocks), 0, dtype=torch.int32, device=DEVICE)
    wide[:, : batch.batch.block_tables.shape[1]] = batch.batch.block_tables
    recorder = _RecordingLaunch(triton_attention._combine_kernel)
    monkeypatch.setattr(triton_attention, "_combine_kernel", recorder)
    out = torch.empty_like(batch.query)
    rows = torch.arange(3, device=DEVICE)
    lens = torch.tensor(contexts, dtype=torch.int32, device=DEVICE)
    triton_attention.decode_attention(
        batch.query, batch.cache, out, rows, wide, lens, batch.scale, num_splits=4, use_dot=False, block_n=16
    )
    [partials] = recorder.partials
    used = (partials[:, :, :, 1, :2] > 0).all(-1).all(1)  # [b, splits] splits that saw keys
    # 64 keys: 4 splits of 16; 20 keys: 16 + 4; 3 keys: one split. Width-based splits would give 256 / 4 = 64
    # keys per split, all of every context in split 0.
    assert used.tolist() == [[True] * 4, [True, True, False, False], [True, False, False, False]]
    assert_close(out, batch.attend(TorchPagedAttention()), torch.float32)


def test_min_tokens_per_split_caps_the_splits_that_work(monkeypatch: pytest.MonkeyPatch) -> None:
    batch = Batch((2, 2, 16, 4), query_lens=[1], context_lens=[64], seed=6)
    recorder = _RecordingLaunch(triton_attention._combine_kernel)
    monkeypatch.setattr(triton_attention, "_combine_kernel", recorder)
    out = torch.empty_like(batch.query)
    triton_attention.decode_attention(
        batch.query, batch.cache, out, torch.arange(1, device=DEVICE), batch.batch.block_tables,
        batch.batch.seq_lens, batch.scale, num_splits=4, use_dot=False, block_n=16, min_tokens_per_split=32,
    )  # fmt: skip
    [partials] = recorder.partials
    assert (partials[0, :, :, 1, :2] > 0).all(-1).all(0).tolist() == [True, True, False, False]
    assert_close(out, batch.attend(TorchPagedAttention()), torch.float32)
