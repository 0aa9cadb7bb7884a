"""Prompt prefixes as chained chunk hashes, and the table of which replica was sent which prefix.

The ingress reads a generation request's body once more (after the size limit, before forwarding) and turns
its prompt into a chain of hashes: the prompt text (a completion's ``prompt``; a chat's ``messages`` with the
fields that are rendered before them) is cut into chunks of ``CHUNK_CHARS`` characters, token-id prompts into
chunks of ``CHUNK_TOKENS`` ids, and each chunk's hash covers its parent's hash and its own content, like the
engine's prefix-cache keys (docs/architecture.md, "Prefix cache"). Two prompts share their first k hashes
exactly when they share their first k chunks, so the number of a prompt's leading hashes a replica was sent
is how much of its prefix that replica can be expected to hold in its KV cache.

``PrefixTable`` keeps, per replica, the hashes routed to it in LRU order (bounded, as the replica's cache is)
and orders replicas for a prompt: longest known prefix first, then the least loaded, then the one holding
the fewest chunks, then the one chosen longest ago. The router hands Ray Serve that order, one replica per
rank, and Serve sends the request to the first replica below its queue limit.
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections import OrderedDict
from collections.abc import Hashable, Iterable, Mapping, Sequence
from typing import Any, Generic, TypeVar

CHUNK_CHARS = 64
CHUNK_TOKENS = 16
MAX_CHUNKS = 4096  # 256K characters of prompt are enough to tell prefixes apart
CHUNKS_PER_REPLICA = 1 << 16
_TEXT_SEED = b"jetmoe-text"
_IDS_SEED = b"jetmoe-ids"
GENERATION_PATHS = frozenset({"/v1/completions", "/v1/chat/completions"})
Replica = TypeVar("Replica", bound=Hashable)


def chain_hashes(chunks: Iterable[bytes], seed: bytes) -> tuple[int, ...]:
    """One 64-bit hash per chunk, each over its parent's hash and the chunk."""
    parent = hashlib.blake2b(seed, digest_size=8).digest()
    hashes = []
    for chunk in chunks:
        parent = hashlib.blake2b(parent + chunk, digest_size=8).digest()
        hashes.append(int.from_bytes(parent, "big"))
    return tuple(hashes)


def text_hashes(text: str, chunk_chars: int = CHUNK_CHARS, max_chunks: int = MAX_CHUNKS) -> tuple[int, ...]:
    """Hashes of ``text``'s whole chunks and of its last partial one."""
    end = min(len(text), chunk_chars * max_chunks)
    chunks = (text[i:i + chunk_chars].encode("utf-8", "surrogatepass") for i in range(0, end, chunk_chars))
    return chain_hashes(chunks, _TEXT_SEED)


def token_hashes(ids: Sequence[int], chunk_tokens: int = CHUNK_TOKENS,
                 max_chunks: int = MAX_CHUNKS) -> tuple[int, ...]:
    """Hashes of ``ids`` in chunks of ``chunk_tokens`` (ids outside 0..2^32 cannot be a prompt: cut there)."""
    valid: list[int] = []
    for token in ids[: chunk_tokens * max_chunks]:
        if not isinstance(token, int) or isinstance(token, bool) or not 0 <= token < 1 << 32:
            break
        valid.append(token)
    chunks = (struct.pack(f"<{len(valid[i:i + chunk_tokens])}I", *valid[i:i + chunk_tokens])
              for i in range(0, len(valid), chunk_tokens))
    return chain_hashes(chunks, _IDS_SEED)


def request_prefix(path: str, body: bytes) -> tuple[int, ...]:
    """The prompt prefix of a generation request's body; empty for other paths or a body that is not a JSON
    object (the replica answers those with the API's own 400)."""
    if path not in GENERATION_PATHS:
        return ()
    try:
        payload = json.loads(body)
    except (ValueError, RecursionError):
        return ()
    if not isinstance(payload, dict):
        return ()
    if path == "/v1/completions":
        return _completion_prefix(payload.get("prompt"))
    return _chat_prefix(payload)


def _completion_prefix(prompt: Any) -> tuple[int, ...]:
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of prompts: the first one decides
    if isinstance(prompt, str):
        return text_hashes(prompt)
    if isinstance(prompt, list):
        return token_hashes(prompt)
    return ()


def _chat_prefix(payload: dict[str, Any]) -> tuple[int, ...]:
    messages = payload.get("messages")
    if not isinstance(messages, list):
        return ()
    # What is rendered before or around the messages changes every token after it.
    head = {key: payload[key] for key in ("tools", "chat_template", "chat_template_kwargs") if key in payload}
    parts = [_dumps(head)] if head else []
    for message in messages:
        if isinstance(message, dict):
            content = message.get("content")
            text = content if isinstance(content, str) else _dumps(content)
            extra = {k: v for k, v in message.items() if k not in ("role", "content")}
            parts.append(f"{message.get('role')}\x1f{text}\x1f{_dumps(extra) if extra else ''}\x1e")
        else:
            parts.append(_dumps(message))
    return text_hashes("".join(parts))


def _dumps(value: Any) -> str:
    return json.dumps(value, sort_keys=True, ensure_ascii=False, separators=(",", ":"), default=str)


class PrefixTable(Generic[Replica]):
    """Which prefix chunks were routed to which replica (``CHUNKS_PER_REPLICA`` per replica, LRU)."""

    def __init__(self, chunks_per_replica: int = CHUNKS_PER_REPLICA) -> None:
        if chunks_per_replica < 1:
            raise ValueError(f"chunks_per_replica must be positive, got {chunks_per_replica}")
        self.chunks_per_replica = chunks_per_replica
        self._chunks: dict[Replica, OrderedDict[int, None]] = {}
        self._last_chosen: dict[Replica, int] = {}
        self._clock = 0

    def matched(self, replica: Replica, prefix: Sequence[int]) -> int:
        """How many leading chunks of ``prefix`` were routed to ``replica``."""
        chunks = self._chunks.get(replica)
        if not chunks:
            return 0
        count = 0
        for chunk in prefix:
            if chunk not in chunks:
                break
            count += 1
        return count

    def held(self, replica: Replica) -> int:
        """Chunks recorded for ``replica``."""
        return len(self._chunks.get(replica, ()))

    def order(self, replicas: Iterable[Replica], prefix: Sequence[int],
              load: Mapping[Replica, int] | None = None) -> list[Replica]:
        """``replicas`` from the most to the least preferred for ``prefix``: the longest known prefix first;
        among equals the least loaded (``load``: requests in flight), then the one holding the fewest chunks,
        then the one chosen longest ago. A prefix known nowhere thus goes to the least-loaded replica, and
        of idle ones to the one with the most room, so new prefixes spread over the replicas."""
        load = load or {}

        def key(replica: Replica) -> tuple[int, int, int, int]:
            matched = self.matched(replica, prefix) if prefix else 0
            return -matched, load.get(replica, 0), self.held(replica), self._last_chosen.get(replica, -1)

        return sorted(replicas, key=key)

    def record(self, replica: Replica, prefix: Sequence[int]) -> None:
        """``prefix`` was routed to ``replica``: its chunks become the replica's most recent ones."""
        self._clock += 1
        self._last_chosen[replica] = self._clock
        chunks = self._chunks.setdefault(replica, OrderedDict())
        for chunk in prefix:
            chunks[chunk] = None
            chunks.move_to_end(chunk)
        while len(chunks) > self.chunks_per_replica:
            chunks.popitem(last=False)

    def forget(self, replica: Replica) -> None:
        """``replica`` is gone (its cache with it)."""
        self._chunks.pop(replica, None)
        self._last_chosen.pop(replica, None)

    def keep_only(self, replicas: Iterable[Replica]) -> None:
        """Forget every replica not in ``replicas``."""
        alive = set(replicas)
        for replica in [r for r in self._chunks if r not in alive]:
            self.forget(replica)
        for replica in [r for r in self._last_chosen if r not in alive]:
            self._last_chosen.pop(replica, None)
