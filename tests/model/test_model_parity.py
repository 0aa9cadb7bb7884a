"""Our JetMoe over the paged cache against transformers' implementation on the same checkpoints."""

from __future__ import annotations

import random

import pytest
import torch

from model.jetmoe import JetMoeForCausalLM
from model.layers.attention import allocate_kv_cache
from model.loader import load_model
from server.engine.worker.batch import build_flat_batch
from tests.support.checkpoints import TOP1_OF_4, TOP2_OF_8, TinyShape, save_checkpoint
from tests.support.engine import hf_greedy

BLOCK = 4
NUM_BLOCKS = 64


@pytest.fixture(scope="module", params=[TOP2_OF_8, TOP1_OF_4], ids=["top2of8", "top1of4"])
def pair(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    shape: TinyShape = request.param
    directory = tmp_path_factory.mktemp("ckpt")
    hf = save_checkpoint(shape, directory, seed=1)
    return hf, load_model(directory, dtype="float32", device="cpu"), shape


def new_cache(model: JetMoeForCausalLM) -> list[torch.Tensor]:
    c = model.config
    return allocate_kv_cache(
        c.num_layers, NUM_BLOCKS, BLOCK, c.num_kv_heads, c.head_dim, torch.float32, "cpu"
    )


def hf_logits(hf, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return hf(torch.tensor([ids])).logits[0]  # [L, V]


def shuffled_table(num_tokens: int, seed: int) -> list[int]:
    blocks = list(range(NUM_BLOCKS))
    random.Random(seed).shuffle(blocks)
    return blocks[: (num_tokens + BLOCK - 1) // BLOCK]


def run(model, cache, ids, query_lens, context_lens, tables, all_logits=False) -> torch.Tensor:
    positions, meta = build_flat_batch(
        model.attention_backend, query_lens, context_lens, tables, BLOCK, all_logits=all_logits
    )
    return model(torch.tensor(ids), positions, cache, meta)


def test_prefill_logits_match_transformers(pair) -> None:
    hf, ours, shape = pair
    ids = torch.randint(0, shape.vocab_size, (37,), generator=torch.Generator().manual_seed(3)).tolist()
    logits = run(ours, new_cache(ours), ids, [37], [37], [shuffled_table(37, 0)], all_logits=True)
    assert (logits - hf_logits(hf, ids)).abs().max().item() <= 1e-4


def test_paged_decode_matches_full_forward(pair) -> None:
    hf, ours, shape = pair
    ids = torch.randint(0, shape.vocab_size, (30,), generator=torch.Generator().manual_seed(4)).tolist()
    table = shuffled_table(len(ids), seed=5)  # non-contiguous, out of order
    full = hf_logits(hf, ids)
    cache = new_cache(ours)
    first = run(ours, cache, ids[:9], [9], [9], [table])
    assert (first[0] - full[8]).abs().max().item() <= 1e-4
    for pos in range(9, len(ids)):
        step = run(ours, cache, [ids[pos]], [1], [pos + 1], [table])
        assert (step[0] - full[pos]).abs().max().item() <= 1e-4, f"decode step at position {pos}"


def test_chunked_prefill_matches_full_forward(pair) -> None:
    hf, ours, shape = pair
    ids = torch.randint(0, shape.vocab_size, (25,), generator=torch.Generator().manual_seed(6)).tolist()
    table = shuffled_table(len(ids), seed=7)
    full = hf_logits(hf, ids)
    cache = new_cache(ours)
    done = 0
    for chunk in (7, 5, 13):
        out = run(ours, cache, ids[done : done + chunk], [chunk], [done + chunk], [table], all_logits=True)
        assert (out - full[done : done + chunk]).abs().max().item() <= 1e-4
        done += chunk


def test_ragged_batch_equals_separate_runs(pair) -> None:
    hf, ours, shape = pair
    gen = torch.Generator().manual_seed(8)
    seqs = [torch.randint(0, shape.vocab_size, (n,), generator=gen).tolist() for n in (12, 8, 15, 20, 3)]
    cached = [0, 7, 6, 19, 0]  # tokens already in the cache before the batched step
    pool = shuffled_table(NUM_BLOCKS * BLOCK, seed=20)  # disjoint, shuffled blocks per sequence
    tables = [pool[12 * i : 12 * i + (len(s) + BLOCK - 1) // BLOCK] for i, s in enumerate(seqs)]
    batch_cache, alone_cache = new_cache(ours), new_cache(ours)
    for seq, n, table in zip(seqs, cached, tables):
        if n:
            run(ours, batch_cache, seq[:n], [n], [n], [table])
            run(ours, alone_cache, seq[:n], [n], [n], [table])
    flat = [tok for seq, n in zip(seqs, cached) for tok in seq[n:]]
    q_lens = [len(s) - n for s, n in zip(seqs, cached)]  # prefill, decode, chunk, decode, prefill
    batched = run(ours, batch_cache, flat, q_lens, [len(s) for s in seqs], tables, all_logits=True)
    offset = 0
    for seq, n, table, q in zip(seqs, cached, tables, q_lens):
        alone = run(ours, alone_cache, seq[n:], [q], [len(seq)], [table], all_logits=True)
        assert (batched[offset : offset + q] - alone).abs().max().item() <= 1e-5
        assert (batched[offset : offset + q] - hf_logits(hf, seq)[n:]).abs().max().item() <= 1e-4
        offset += q


def test_greedy_generation_matches_transformers_generate(pair) -> None:
    hf, ours, shape = pair
    prompt = torch.randint(0, shape.vocab_size, (11,), generator=torch.Generator().manual_seed(9)).tolist()
    new_tokens = 32
    # A near-tie in the reference decides its token by rounding: compare only up to the first one.
    expected, limit = hf_greedy(hf, prompt, new_tokens)
    assert limit >= 16, "checkpoint too tie-prone for a meaningful comparison"
    table = shuffled_table(len(prompt) + new_tokens, seed=10)
    cache = new_cache(ours)
    logits = run(ours, cache, prompt, [len(prompt)], [len(prompt)], [table])
    generated: list[int] = []
    while len(generated) < limit:
        generated.append(int(logits[0].argmax()))
        context = len(prompt) + len(generated)
        logits = run(ours, cache, [generated[-1]], [1], [context], [table])
    assert generated == expected[:limit]
