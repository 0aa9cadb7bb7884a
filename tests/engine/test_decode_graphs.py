"""Decode steps through padded static buffers (what CUDA graphs replay) equal the eager forward.

On CPU the static path runs eagerly (``capture=False``): the padding, the buffer loading and the runner's
dispatch are the same code a captured graph replays. With CUDA the graphs are really captured and replayed.
"""

from __future__ import annotations

import os
import random

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from model.jetmoe import JetMoeForCausalLM  # noqa: E402
from model.kernels import KernelChoice  # noqa: E402
from model.layers.attention import TorchPagedAttention, allocate_kv_cache  # noqa: E402
from model.loader import load_model  # noqa: E402
from model.tokenizer import Tokenizer  # noqa: E402
from server.engine.config import EngineConfig  # noqa: E402
from server.engine.core import decode_graphs_apply  # noqa: E402
from server.engine.llm_engine import LLMEngine  # noqa: E402
from server.engine.sampling_params import SamplingParams  # noqa: E402
from server.engine.worker.batch import build_flat_batch  # noqa: E402
from server.engine.worker.decode_graphs import DecodeGraphs, StaticDecodeBatch, graph_batch_sizes  # noqa: E402
from tests.support.checkpoints import TOP2_OF_8, save_checkpoint  # noqa: E402
from tests.support.engine import hf_greedy, run_engine, tokens_of  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
BLOCK = 4
NUM_BLOCKS = 40  # the pool; block NUM_BLOCKS is the padding block
MAX_BLOCKS = 6  # block-table width: contexts up to 24 tokens


def test_graph_batch_sizes() -> None:
    assert graph_batch_sizes(1) == (1,)
    assert graph_batch_sizes(8) == (1, 2, 4, 8)
    assert graph_batch_sizes(6) == (1, 2, 4, 6)
    assert graph_batch_sizes(256) == (1, 2, 4, 8, 16, 32, 64, 128, 256)
    with pytest.raises(ValueError):
        graph_batch_sizes(0)


def test_static_batch_loads_rows_and_padding() -> None:
    static = StaticDecodeBatch(max_batch=4, max_blocks=3, block_size=BLOCK, padding_block=9, device=DEVICE)
    static.load([11, 12], [5, 8], [[3, 7], [2, 4, 6]], size=4)
    assert static.input_ids.tolist() == [11, 12, 0, 0]
    assert static.positions.tolist() == [4, 7, 0, 0]
    assert static.slot_mapping.tolist() == [7 * 4 + 0, 4 * 4 + 3, 36, 36]  # padding rows write block 9
    assert static.context_lens.tolist() == [5, 8, 1, 1]
    assert static.block_tables[:, :2].tolist() == [[3, 7], [2, 4], [9, 9], [9, 9]]
    meta = static.metadata(TorchPagedAttention(), 4)
    assert meta.decode is not None and meta.decode.token_index.tolist() == [0, 1, 2, 3] and meta.prefills == ()
    assert meta.decode.valid.sum(1).tolist() == [5, 8, 1, 1]  # the reference's masks, from the tensors
    # A smaller step afterwards: its rows and padding overwrite the old ones.
    static.load([13], [1], [[5]], size=2)
    assert static.context_lens[:2].tolist() == [1, 1] and static.slot_mapping[:2].tolist() == [20, 36]
    with pytest.raises(ValueError, match="padded batch"):
        static.load([1, 2, 3], [1, 1, 1], [[0], [1], [2]], size=2)
    with pytest.raises(ValueError, match="block-table width"):
        static.load([1], [13], [[0, 1, 2, 3]], size=1)


def test_static_batch_stages_each_step_in_page_locked_host_buffers() -> None:
    static = StaticDecodeBatch(max_batch=4, max_blocks=3, block_size=BLOCK, padding_block=9, device=DEVICE)
    assert static.pinned == CUDA
    assert all(buf.device.type == "cpu" and buf.is_pinned() == CUDA for buf in static._host.values())
    for step in range(3):  # back to back, as decode steps are: each waits for the last copies, never the graph
        static.load([20 + step, 30 + step], [5 + step, 2], [[3, 7], [2]], size=4)
    assert static.input_ids.tolist() == [22, 32, 0, 0]
    assert static._host["input_ids"][:4].tolist() == [22, 32, 0, 0]  # what was copied from
    assert static.block_tables[:2, :2].tolist() == [[3, 7], [2, 9]]
    assert static._host["block_tables"][:2, :2].tolist() == [[3, 7], [2, 9]]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory):
    directory = tmp_path_factory.mktemp("graph_ckpt")
    save_checkpoint(TOP2_OF_8, directory, seed=31)
    return directory


def triton_attention() -> KernelChoice:
    pytest.importorskip("triton")
    from model.kernels.triton_attention import is_interpreted

    if not CUDA and not is_interpreted():
        pytest.skip("model.kernels.triton_attention was imported without TRITON_INTERPRET=1")
    return KernelChoice(attention="triton")


def prefilled(model: JetMoeForCausalLM, lengths: list[int], seed: int):
    """A KV cache holding ``lengths`` random prompts in shuffled blocks: ``(cache, tables)``."""
    c = model.config
    pool = list(range(NUM_BLOCKS))
    random.Random(seed).shuffle(pool)
    tables = [pool[MAX_BLOCKS * i : MAX_BLOCKS * (i + 1)] for i in range(len(lengths))]
    dtype = model.output_weight().dtype
    cache = allocate_kv_cache(c.num_layers, NUM_BLOCKS + 1, BLOCK, c.num_kv_heads, c.head_dim, dtype, DEVICE)
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, c.vocab_size, (sum(lengths),), generator=gen).to(DEVICE)
    positions, meta = build_flat_batch(model.attention_backend, lengths, lengths, tables, BLOCK, device=DEVICE)
    model(ids, positions, cache, meta)
    return cache, tables


def eager_decode(model, cache, ids: list[int], contexts: list[int], tables) -> torch.Tensor:
    positions, meta = build_flat_batch(
        model.attention_backend, [1] * len(ids), contexts, tables, BLOCK, device=DEVICE
    )
    return model(torch.tensor(ids, device=DEVICE), positions, cache, meta)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_padded_static_decode_equals_eager(checkpoint, backend: str) -> None:
    choice = KernelChoice(attention="torch") if backend == "torch" else triton_attention()
    model = load_model(checkpoint, dtype="float32", device=DEVICE, kernels=choice)
    lengths = [3, 9, 1, 14, 6]
    eager_cache, tables = prefilled(model, lengths, seed=1)
    static_cache, _ = prefilled(model, lengths, seed=1)
    graphs = DecodeGraphs(model, static_cache, (1, 2, 4, 8), MAX_BLOCKS, BLOCK, NUM_BLOCKS, capture=CUDA)
    gen = torch.Generator().manual_seed(2)
    contexts = list(lengths)
    for batch in (5, 3, 1, 2, 5):  # padded to 8, 4, 1, 2, 8
        contexts = [c + 1 if i < batch else c for i, c in enumerate(contexts)]
        ids = torch.randint(3, model.config.vocab_size, (batch,), generator=gen).tolist()
        expected = eager_decode(model, eager_cache, ids, contexts[:batch], tables[:batch])
        actual = graphs.run(ids, contexts[:batch], tables[:batch])
        assert actual.shape == expected.shape == (batch, model.config.vocab_size)
        assert (actual - expected).abs().max().item() <= 1e-5, f"batch {batch}"
    # Live blocks hold the same K/V; only the padding block differs (padded rows wrote there).
    for eager_layer, static_layer in zip(eager_cache, static_cache):
        assert torch.allclose(eager_layer[:, :NUM_BLOCKS], static_layer[:, :NUM_BLOCKS], atol=1e-6)


def test_decode_graphs_only_on_cuda_with_a_capturable_backend(checkpoint) -> None:
    model = load_model(checkpoint, dtype="float32", device="cpu")
    assert not decode_graphs_apply(EngineConfig(model="unused"), model)
    if CUDA:
        cuda_model = load_model(checkpoint, device="cuda", kernels=triton_attention())
        assert decode_graphs_apply(EngineConfig(model="unused"), cuda_model)
        assert not decode_graphs_apply(EngineConfig(model="unused", enforce_eager=True), cuda_model)
        ref_model = load_model(checkpoint, device="cuda", kernels=KernelChoice(attention="torch"))
        assert not decode_graphs_apply(EngineConfig(model="unused"), ref_model)


def test_engine_greedy_parity_through_the_static_decode_path(engine_checkpoint) -> None:
    directory, hf = engine_checkpoint
    rng = random.Random(41)
    vocab = hf.config.vocab_size
    requests = []
    for i, length in enumerate([1, 30, 7, 12, 2, 25, 9, 4, 18, 5]):
        prompt = [rng.randrange(3, vocab) for _ in range(length)]
        max_tokens = rng.randint(3, 14)  # finishing at different steps: decode batches of every size
        requests.append((f"r{i}", prompt, max_tokens, *hf_greedy(hf, prompt, max_tokens)))
    model = load_model(directory, dtype="float32", device="cpu")
    config = EngineConfig(model="unused", block_size=4, num_kv_blocks=128, max_model_len=64, max_num_seqs=8)
    engine = LLMEngine(config, model, Tokenizer.from_dir(directory))
    engine.runner.enable_decode_graphs(graph_batch_sizes(8), engine.max_model_len, capture=False)
    graphs = engine.runner.decode_graphs
    replayed: list[int] = []
    original = graphs.run

    def counting_run(token_ids, context_lens, block_tables):
        replayed.append(len(token_ids))
        return original(token_ids, context_lens, block_tables)

    graphs.run = counting_run
    for rid, prompt, max_tokens, *_ in requests:
        engine.add_request(rid, prompt, SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True))
    outputs = run_engine(engine)
    for rid, _, max_tokens, expected, trusted in requests:
        got = tokens_of(outputs[(rid, 0)])
        assert len(got) == max_tokens and got[:trusted] == expected[:trusted], rid
    assert len(set(replayed)) >= 4, f"decode batch sizes replayed: {sorted(set(replayed))}"
    assert max(replayed) <= 8
    assert engine.blocks.num_free_blocks == engine.blocks.num_blocks
