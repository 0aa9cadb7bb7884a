"""Prefix hashes of request bodies and the replica order of ``PrefixTable`` (no Ray needed)."""

from __future__ import annotations

import json

import pytest

from server.distributed.prefix import CHUNK_CHARS, PrefixTable, request_prefix, text_hashes, token_hashes

LONG = "def handler(request):\n    return request.json()\n" * 10


def _body(payload: object) -> bytes:
    return json.dumps(payload).encode()


def test_shared_text_prefixes_share_exactly_their_whole_chunks() -> None:
    a, b = text_hashes(LONG + "first"), text_hashes(LONG + "second ending")
    whole = len(LONG) // CHUNK_CHARS
    assert a[:whole] == b[:whole] and a[whole] != b[whole]
    assert text_hashes(LONG) == text_hashes(LONG)
    assert text_hashes("x" + LONG)[0] != text_hashes(LONG)[0]
    assert len(text_hashes("a" * (CHUNK_CHARS * 3 + 1))) == 4 and text_hashes("") == ()


def test_token_prompts_chain_by_blocks_and_stop_at_a_bad_id() -> None:
    ids = list(range(100))
    assert token_hashes(ids)[:6] == token_hashes(ids[:96] + [7, 7])[:6]
    assert token_hashes(ids + [-1, 5]) == token_hashes(ids)
    assert token_hashes(ids)[0] != text_hashes("".join(map(chr, range(16))))[0]


def test_request_prefix_reads_completions_and_chats() -> None:
    completion = request_prefix("/v1/completions", _body({"prompt": LONG}))
    assert completion == text_hashes(LONG)
    assert request_prefix("/v1/completions", _body({"prompt": [LONG, "other"]})) == completion
    assert request_prefix("/v1/completions", _body({"prompt": [[1, 2, 3]]})) == token_hashes([1, 2, 3])
    chat = {"messages": [{"role": "system", "content": LONG}, {"role": "user", "content": "hi"}]}
    longer = {"messages": [*chat["messages"], {"role": "assistant", "content": "hello"},
                           {"role": "user", "content": "more"}]}
    first, second = request_prefix("/v1/chat/completions", _body(chat)), \
        request_prefix("/v1/chat/completions", _body(longer))
    assert len(first) > 5 and first[:-1] == second[:len(first) - 1]
    with_tools = request_prefix("/v1/chat/completions", _body({**chat, "tools": [{"type": "function"}]}))
    assert with_tools[0] != first[0]  # tools are rendered before the messages


@pytest.mark.parametrize("path,body", [("/v1/models", b""), ("/v1/completions", b"not json"),
                                       ("/v1/completions", b"[1, 2]"), ("/v1/completions", b'{"prompt": 3}'),
                                       ("/v1/chat/completions", b'{"messages": "x"}')])
def test_no_prefix_for_other_paths_and_bodies_the_api_rejects(path: str, body: bytes) -> None:
    assert request_prefix(path, body) == ()


def test_order_prefers_the_longest_known_prefix_then_the_least_loaded() -> None:
    table: PrefixTable[str] = PrefixTable()
    a, b = text_hashes(LONG + "a"), text_hashes("import os\n" * 30)
    assert table.order(["r1", "r2", "r3"], a) == ["r1", "r2", "r3"]
    table.record("r1", a)
    # A new prefix goes to a replica holding nothing (and not to the one just chosen).
    assert table.order(["r1", "r2", "r3"], b)[0] == "r2"
    table.record("r2", b)
    assert table.order(["r1", "r2", "r3"], text_hashes(LONG + "other"))[0] == "r1"
    assert table.order(["r1", "r2", "r3"], b)[0] == "r2"
    assert table.order(["r1", "r2", "r3"], text_hashes("fresh" * 40))[0] == "r3"
    # Among replicas holding the same prefix the least loaded comes first; load never beats a longer match.
    table.record("r3", a[:3])
    assert table.order(["r1", "r3"], a, load={"r1": 5})[0] == "r1"
    table.record("r3", a)
    assert table.order(["r1", "r3"], a, load={"r1": 5}) == ["r3", "r1"]
    # No prefix at all: the least loaded.
    assert table.order(["r1", "r2", "r3"], (), load={"r1": 2, "r2": 1, "r3": 3})[0] == "r2"


def test_table_is_bounded_and_forgets_replicas() -> None:
    table: PrefixTable[str] = PrefixTable(chunks_per_replica=8)
    first, second = text_hashes("a" * 64 * 6), text_hashes("b" * 64 * 6)
    table.record("r1", first)
    table.record("r1", second)
    assert table.held("r1") == 8 and table.matched("r1", second) == 6 and table.matched("r1", first) == 0
    table.keep_only(["r2"])
    assert table.held("r1") == 0 and table.matched("r1", second) == 0
    with pytest.raises(ValueError):
        PrefixTable(chunks_per_replica=0)
