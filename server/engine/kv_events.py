"""KV-cache events in vLLM's wire format, for prefix-aware routers (llm-d's precise prefix scorer, Dynamo).

The block manager records what happens to its prefix cache (``BlockStored`` when a full block gets its key,
``BlockRemoved`` when a cached block is evicted, ``AllBlocksCleared`` when the cache is reset); the engine
publishes what one step recorded as one batch. On the wire (a ZeroMQ PUB socket) each batch is a
three-frame message: the topic, an 8-byte big-endian sequence number, and the msgpack batch
``[timestamp, [event, ...]]`` where an event is a tagged array:
``["BlockStored", block_hashes, parent_block_hash, token_ids, block_size, lora_id, medium]``,
``["BlockRemoved", block_hashes, medium]`` or ``["AllBlocksCleared"]`` (lora_id and medium are null here).
A subscriber that decodes vLLM's events decodes these unchanged.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import msgpack

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class BlockStored:
    """Full blocks that entered the prefix cache, in chain order; ``parent_block_hash`` precedes the first."""

    block_hashes: list[int]
    parent_block_hash: int | None
    token_ids: list[int]
    block_size: int


@dataclass(frozen=True)
class BlockRemoved:
    """Cached blocks whose key was dropped (the block was reused for other tokens)."""

    block_hashes: list[int]


@dataclass(frozen=True)
class AllBlocksCleared:
    """Every cached key was dropped (at start, or after a failed step)."""


KVEvent = BlockStored | BlockRemoved | AllBlocksCleared


def encode_event(event: KVEvent) -> list[Any]:
    """The tagged array vLLM's msgspec structs encode to."""
    if isinstance(event, BlockStored):
        return ["BlockStored", event.block_hashes, event.parent_block_hash, event.token_ids, event.block_size,
                None, None]
    if isinstance(event, BlockRemoved):
        return ["BlockRemoved", event.block_hashes, None]
    return ["AllBlocksCleared"]


def encode_batch(events: Sequence[KVEvent], timestamp: float) -> bytes:
    return msgpack.packb([timestamp, [encode_event(e) for e in events]])


class KVEventPublisher:
    """A ZeroMQ PUB socket bound to ``endpoint``; ``publish`` sends one batch and never blocks the engine
    (a subscriber too slow to keep up loses batches: the sequence number shows the gap)."""

    def __init__(self, endpoint: str, topic: str = "") -> None:
        import zmq

        self._zmq = zmq
        self._socket: zmq.Socket = zmq.Context.instance().socket(zmq.PUB)
        self._socket.setsockopt(zmq.LINGER, 0)
        self._socket.bind(endpoint)
        self.endpoint: str = self._socket.getsockopt_string(zmq.LAST_ENDPOINT)
        self._topic = topic.encode()
        self._sequence = 0
        self.publish([AllBlocksCleared()])

    def publish(self, events: Sequence[KVEvent]) -> None:
        if not events:
            return
        frames = [self._topic, self._sequence.to_bytes(8, "big"), encode_batch(events, time.time())]
        self._sequence += 1
        try:
            self._socket.send_multipart(frames, flags=self._zmq.NOBLOCK)
        except self._zmq.Again:
            logger.debug("KV event batch %d dropped: no subscriber keeps up", self._sequence - 1)

    def close(self) -> None:
        self._socket.close()
