"""KV-cache events over ZeroMQ in vLLM's format: a subscriber sees the blocks the engine cached for a known
prompt (hashes, parent hashes, token ids) and their removal once they are evicted."""

from __future__ import annotations

import time

import msgpack
import pytest
import zmq

from model.loader import load_model
from model.tokenizer import Tokenizer
from server.engine.block_manager import BlockManager
from server.engine.config import EngineConfig
from server.engine.kv_events import AllBlocksCleared, BlockRemoved, BlockStored, encode_batch
from server.engine.llm_engine import LLMEngine
from server.engine.sampling_params import SamplingParams
from tests.support.engine import make_request, run_engine

BLOCK = 4
TOPIC = "kv@pod-0@tiny"


def test_events_encode_as_vllm_tagged_arrays() -> None:
    events = [BlockStored([11, 12], None, [1, 2, 3, 4, 5, 6, 7, 8], 4), BlockRemoved([11]), AllBlocksCleared()]
    batch = msgpack.unpackb(encode_batch(events, 12.5))
    assert batch == [12.5, [["BlockStored", [11, 12], None, [1, 2, 3, 4, 5, 6, 7, 8], 4, None, None],
                            ["BlockRemoved", [11], None], ["AllBlocksCleared"]]]


def test_the_block_pool_records_stores_evictions_and_resets() -> None:
    blocks = BlockManager(num_blocks=3, block_size=2, record_events=True)
    assert blocks.take_events() == [AllBlocksCleared()]
    first = make_request([5, 6, 7, 8, 9], rid="first")
    assert blocks.allocate(first, 5)
    blocks.cache_full_blocks(first, 5)
    h1, h2 = first.block_hashes
    assert blocks.take_events() == [BlockStored([h1], None, [5, 6], 2), BlockStored([h2], h1, [7, 8], 2)]
    blocks.free(first)
    other = make_request([1, 1, 1, 1, 1, 1], rid="other")
    assert blocks.allocate(other, 6)  # reuses all three blocks: both cached keys are evicted
    assert sorted(e.block_hashes[0] for e in blocks.take_events()) == sorted([h1, h2])
    blocks.reset_prefix_cache()
    assert blocks.take_events() == [AllBlocksCleared()]
    assert BlockManager(num_blocks=2, block_size=2).take_events() == []  # off by default


@pytest.fixture()
def publishing_engine(engine_checkpoint):
    directory, _ = engine_checkpoint
    config = EngineConfig(model=str(directory), device="cpu", dtype="float32", block_size=BLOCK,
                          num_kv_blocks=24, max_model_len=96, kv_events_endpoint="tcp://127.0.0.1:*",
                          kv_events_topic=TOPIC)
    engine = LLMEngine(config, load_model(directory, dtype="float32", device="cpu"), Tokenizer.from_dir(directory))
    yield engine
    engine.core.kv_events.close()


def receive_all(sub: zmq.Socket, wait: float = 1.0) -> list[tuple[int, list]]:
    """(sequence number, events) of every batch that arrives within ``wait`` seconds of the last one."""
    batches = []
    while sub.poll(int(wait * 1000)):
        topic, seq, payload = sub.recv_multipart()
        assert topic == TOPIC.encode()
        _, events = msgpack.unpackb(payload)
        batches.append((int.from_bytes(seq, "big"), events))
    return batches


def test_a_subscriber_sees_the_cached_blocks_of_a_prompt_and_their_eviction(publishing_engine) -> None:
    engine = publishing_engine
    sub = zmq.Context.instance().socket(zmq.SUB)
    sub.setsockopt_string(zmq.SUBSCRIBE, TOPIC)
    sub.connect(engine.core.kv_events.endpoint)
    time.sleep(0.3)  # a PUB socket drops what it sends before the subscriber has joined
    try:
        prompt = list(range(10, 31))  # 21 tokens: 5 full blocks once the prompt is in the cache
        engine.add_request("known", prompt, SamplingParams(temperature=0, max_tokens=2, ignore_eos=True))
        run_engine(engine)
        stored = [e for _, events in receive_all(sub) for e in events if e[0] == "BlockStored"]
        assert [e[3] for e in stored[:5]] == [prompt[i : i + BLOCK] for i in range(0, 20, BLOCK)]
        assert all(e[4] == BLOCK and e[5] is None and e[6] is None for e in stored)
        keys = [e[1][0] for e in stored]
        assert [e[2] for e in stored] == [None, *keys[:-1]]  # each block names its parent
        assert len(set(keys)) == len(keys) == 5
        # A prompt that needs all 24 blocks: every cached one is evicted and reported removed.
        engine.add_request("evictor", list(range(200, 295)), SamplingParams(temperature=0, max_tokens=1))
        run_engine(engine)
        batches = receive_all(sub)
        removed = {h for _, events in batches for e in events if e[0] == "BlockRemoved" for h in e[1]}
        assert set(keys) <= removed
        sequences = [seq for seq, _ in batches]
        assert sequences == sorted(sequences) and len(set(sequences)) == len(sequences)
    finally:
        sub.close()
