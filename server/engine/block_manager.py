"""Paged KV block pool: allocation, reference counts, LRU free list and automatic prefix caching.

A full block is keyed by a hash chained from its parent block's key and its own token ids. Cached blocks keep
their key after they are freed and stay in the free list in LRU order, so a repeated prefix is found again
until the block is reused for something else. A lookup compares the stored token ids, never the hash alone.
With ``record_events`` the pool keeps a log of its cache changes (``server.engine.kv_events``) that the engine
publishes after each step (``take_events``).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

from server.engine.kv_events import AllBlocksCleared, BlockRemoved, BlockStored, KVEvent
from server.engine.request import Request

_ROOT_HASH = 0x5EED


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    hash_key: int | None = None
    token_ids: tuple[int, ...] = ()


def chain_hash(parent: int, token_ids: Sequence[int]) -> int:
    """Key of a full block: its parent's key combined with its tokens."""
    return hash((parent, tuple(token_ids)))


class BlockManager:
    """Owns every KV block; requests hold block ids in ``request.block_ids``."""

    def __init__(
        self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True, record_events: bool = False
    ) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError("num_blocks and block_size must be positive")
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.enable_prefix_caching = enable_prefix_caching
        self._blocks = [Block(i) for i in range(num_blocks)]
        self._free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self._cached: dict[int, int] = {}  # hash key -> block id
        self.prefix_cache_queries = 0  # prompt tokens looked up
        self.prefix_cache_hits = 0  # of those, tokens found in the cache
        self._events: list[KVEvent] | None = [AllBlocksCleared()] if record_events else None

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self._free)

    @property
    def usage(self) -> float:
        """Fraction of blocks held by requests, 0..1."""
        return self.num_used_blocks / self.num_blocks

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def match_prefix(self, request: Request) -> list[int]:
        """Cached blocks holding the longest prefix of the request's tokens (never its last token)."""
        if not self.enable_prefix_caching or request.wants_prompt_logprobs:
            return []
        tokens = request.token_slice(0, request.num_tokens)
        limit = (len(tokens) - 1) // self.block_size
        found: list[int] = []
        parent = _ROOT_HASH
        for i in range(limit):
            chunk = tokens[i * self.block_size : (i + 1) * self.block_size]
            key = chain_hash(parent, chunk)
            block_id = self._cached.get(key)
            if block_id is None or self._blocks[block_id].token_ids != tuple(chunk):
                break
            found.append(block_id)
            parent = key
        self.prefix_cache_queries += len(tokens)
        self.prefix_cache_hits += len(found) * self.block_size
        return found

    def allocate(self, request: Request, num_new_tokens: int, cached: Sequence[int] = ()) -> bool:
        """Give ``request`` blocks for ``num_new_tokens`` more tokens (after ``cached`` prefix blocks).

        Returns False, changing nothing, when the free pool cannot cover it.
        """
        reused_free = sum(1 for b in cached if self._blocks[b].ref_count == 0)
        have = len(request.block_ids) + len(cached)
        total = request.num_computed_tokens + len(cached) * self.block_size + num_new_tokens
        need = max(self.blocks_for(total) - have, 0)
        if need + reused_free > len(self._free):
            return False
        for block_id in cached:
            self._take(block_id)
        request.block_ids.extend(cached)
        request.block_hashes.extend(self._blocks[b].hash_key or 0 for b in cached)
        request.block_ids.extend(self._pop_free() for _ in range(need))
        return True

    def cache_full_blocks(self, request: Request, num_computed_tokens: int) -> None:
        """Register the request's blocks that are full once ``num_computed_tokens`` tokens are in the cache."""
        if not self.enable_prefix_caching:
            return
        full = num_computed_tokens // self.block_size
        parent = request.block_hashes[-1] if request.block_hashes else _ROOT_HASH
        for i in range(len(request.block_hashes), full):
            chunk = request.token_slice(i * self.block_size, (i + 1) * self.block_size)
            parent = chain_hash(parent, chunk)
            request.block_hashes.append(parent)
            block = self._blocks[request.block_ids[i]]
            if block.hash_key is None and parent not in self._cached:
                block.hash_key, block.token_ids = parent, tuple(chunk)
                self._cached[parent] = block.block_id
                if self._events is not None:
                    previous = request.block_hashes[-2] if len(request.block_hashes) > 1 else None
                    self._events.append(BlockStored([parent], previous, list(chunk), self.block_size))

    def trim(self, request: Request) -> None:
        """Free the request's blocks past those its ``num_computed_tokens`` fill, tail first: after a step that
        verified proposed tokens, the blocks that hold only rejected ones. They were never registered in the
        prefix cache (only blocks full of known tokens are)."""
        keep = self.blocks_for(request.num_computed_tokens)
        for block_id in reversed(request.block_ids[keep:]):
            block = self._blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                self._free[block_id] = None
        del request.block_ids[keep:]
        del request.block_hashes[keep:]

    def free(self, request: Request) -> None:
        """Drop the request's references; blocks are freed tail first so shared prefixes stay longest."""
        for block_id in reversed(request.block_ids):
            block = self._blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                self._free[block_id] = None
        request.block_ids = []
        request.block_hashes = []

    def reset_prefix_cache(self) -> None:
        """Forget every cached key (used blocks keep their data)."""
        for block in self._blocks:
            block.hash_key, block.token_ids = None, ()
        self._cached.clear()
        if self._events is not None:
            self._events.append(AllBlocksCleared())

    def take_events(self) -> list[KVEvent]:
        """The cache changes recorded since the last call (empty unless ``record_events``)."""
        if not self._events:
            return []
        events, self._events = self._events, []
        return events

    def _take(self, block_id: int) -> None:
        block = self._blocks[block_id]
        if block.ref_count == 0:
            del self._free[block_id]
        block.ref_count += 1

    def _pop_free(self) -> int:
        block_id, _ = self._free.popitem(last=False)
        block = self._blocks[block_id]
        if block.hash_key is not None:  # evict its cached prefix entry
            self._cached.pop(block.hash_key, None)
            if self._events is not None:
                self._events.append(BlockRemoved([block.hash_key]))
            block.hash_key, block.token_ids = None, ()
        block.ref_count = 1
        return block_id
