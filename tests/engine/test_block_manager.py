"""Block pool: ref counts, LRU reuse, prefix-cache keys and token verification."""

from __future__ import annotations

from server.engine import block_manager as bm
from server.engine.block_manager import BlockManager, chain_hash
from server.engine.request import Request
from tests.support.engine import make_request as request


def admit(blocks: BlockManager, req: Request) -> int:
    """Admit a whole prompt the way the scheduler does; returns the cached token count."""
    cached = blocks.match_prefix(req)
    assert blocks.allocate(req, req.num_tokens - len(cached) * blocks.block_size, cached)
    req.num_computed_tokens = req.num_tokens
    blocks.cache_full_blocks(req, req.num_tokens)
    return len(cached) * blocks.block_size


def test_allocate_and_free_return_every_block() -> None:
    blocks = BlockManager(num_blocks=8, block_size=4)
    req = request(list(range(10)))
    admit(blocks, req)
    assert len(req.block_ids) == 3 and blocks.num_free_blocks == 5
    assert abs(blocks.usage - 3 / 8) < 1e-9
    blocks.free(req)
    assert blocks.num_free_blocks == 8 and req.block_ids == []


def test_allocation_fails_without_changing_anything() -> None:
    blocks = BlockManager(num_blocks=2, block_size=4)
    req = request(list(range(12)))
    assert not blocks.allocate(req, 12)
    assert blocks.num_free_blocks == 2 and req.block_ids == []


def test_shared_prefix_hits_and_last_token_is_recomputed() -> None:
    blocks = BlockManager(num_blocks=16, block_size=4)
    first = request(list(range(12)))
    assert admit(blocks, first) == 0
    second = request(list(range(12)) + [99, 98])
    assert admit(blocks, second) == 12  # three full blocks shared
    assert second.block_ids[:3] == first.block_ids
    same = request(list(range(12)))
    assert admit(blocks, same) == 8  # its last token must be recomputed, so the third block is not reused
    assert blocks.prefix_cache_hits == 20 and blocks.prefix_cache_queries == 12 + 14 + 12


def test_shared_blocks_are_ref_counted() -> None:
    blocks = BlockManager(num_blocks=16, block_size=4)
    first, second = request(list(range(9))), request(list(range(9)))
    admit(blocks, first)
    admit(blocks, second)
    shared = first.block_ids[:2]
    assert second.block_ids[:2] == shared
    blocks.free(first)
    assert all(b not in blocks._free for b in shared)  # still held by the second request
    blocks.free(second)
    assert blocks.num_free_blocks == 16


def test_freed_prefix_survives_until_reused_in_lru_order() -> None:
    blocks = BlockManager(num_blocks=4, block_size=4)
    old = request(list(range(9)))
    admit(blocks, old)
    blocks.free(old)
    again = request(list(range(9)))
    assert admit(blocks, again) == 8  # cached blocks found after being freed
    blocks.free(again)
    filler = request(list(range(100, 116)))  # needs all 4 blocks: evicts every cached prefix
    admit(blocks, filler)
    blocks.free(filler)
    assert admit(blocks, request(list(range(9)))) == 0


def test_hash_collision_is_not_trusted(monkeypatch) -> None:
    monkeypatch.setattr(bm, "chain_hash", lambda parent, tokens: 7)  # every block gets the same key
    blocks = BlockManager(num_blocks=16, block_size=4)
    admit(blocks, request([1, 2, 3, 4, 5]))
    assert admit(blocks, request([9, 9, 9, 9, 5])) == 0  # same key, other tokens: no hit


def test_prompt_logprobs_requests_skip_the_cache() -> None:
    blocks = BlockManager(num_blocks=16, block_size=4)
    admit(blocks, request(list(range(9))))
    assert admit(blocks, request(list(range(9)), prompt_logprobs=1)) == 0


def test_disabled_prefix_caching_never_hits() -> None:
    blocks = BlockManager(num_blocks=16, block_size=4, enable_prefix_caching=False)
    admit(blocks, request(list(range(9))))
    assert admit(blocks, request(list(range(9)))) == 0


def test_block_keys_chain_their_parents() -> None:
    blocks = BlockManager(num_blocks=8, block_size=4)
    first = request([1, 2, 3, 4, 9, 9, 9, 9, 5], rid="a")
    admit(blocks, first)
    root = bm._ROOT_HASH
    assert first.block_hashes == [chain_hash(root, [1, 2, 3, 4]), chain_hash(chain_hash(root, [1, 2, 3, 4]), [9] * 4)]
    # The same second block after another first block is another key: no hit past the first difference.
    other = request([7, 7, 7, 7, 9, 9, 9, 9, 5], rid="b")
    assert admit(blocks, other) == 0
    assert other.block_hashes[1] != first.block_hashes[1]


def test_eviction_takes_the_least_recently_freed_block_first() -> None:
    blocks = BlockManager(num_blocks=6, block_size=2)
    old, new = request([1, 2, 3], rid="old"), request([4, 5, 6], rid="new")
    admit(blocks, old)  # blocks 0, 1 (block 0 cached as [1, 2])
    admit(blocks, new)  # blocks 2, 3 (block 2 cached as [4, 5])
    blocks.free(old)
    blocks.free(new)
    # Four blocks: first the two never used, then old's (freed first), never new's.
    taker = request([8] * 8, rid="taker")
    assert blocks.allocate(taker, 8)
    assert taker.block_ids == [4, 5, 1, 0]
    assert blocks.match_prefix(request([1, 2, 3], rid="gone")) == []  # old's cached block was evicted
    assert blocks.match_prefix(request([4, 5, 6], rid="again")) == [2]  # new's survived
