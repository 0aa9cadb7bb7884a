"""AsyncEngine: concurrent streams, merging, abort on early exit, failures and a dead loop."""

from __future__ import annotations

import asyncio
import random
import time

import pytest

from model.loader import load_model
from model.tokenizer import Tokenizer
from server.engine.async_engine import AsyncEngine, EngineDeadError, RequestFailedError, merge_outputs
from server.engine.config import EngineConfig
from server.engine.llm_engine import LLMEngine, RequestRejected
from server.engine.request import RequestOutput
from server.engine.sampling_params import SamplingParams
from tests.support.engine import run_engine, tokens_of


@pytest.fixture(scope="module")
def parts(engine_checkpoint):
    directory, _ = engine_checkpoint
    return load_model(directory, dtype="float32"), Tokenizer.from_dir(directory)


@pytest.fixture
def engine(parts):
    model, tokenizer = parts
    config = EngineConfig(model="unused", block_size=4, num_kv_blocks=256, max_model_len=128)
    async_engine = AsyncEngine(LLMEngine(config, model, tokenizer))
    async_engine.start()
    yield async_engine
    async_engine.shutdown()


def prompts(count: int, vocab: int) -> list[list[int]]:
    rng = random.Random(4)
    return [[rng.randrange(3, vocab) for _ in range(rng.randint(1, 40))] for _ in range(count)]


async def collect(engine: AsyncEngine, prompt: list[int], params: SamplingParams, rid: str):
    return [out async for out in engine.generate(prompt, params, rid)]


def wait_until(predicate, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.01)


def test_concurrent_generate_equals_sync_engine(engine: AsyncEngine, parts) -> None:
    model, tokenizer = parts
    batch = prompts(12, model.config.vocab_size)
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)

    async def main():
        return await asyncio.gather(*(collect(engine, p, params, f"r{i}") for i, p in enumerate(batch)))

    results = asyncio.run(main())
    sync = LLMEngine(engine.engine.config, model, tokenizer)
    for i, p in enumerate(batch):
        sync.add_request(f"r{i}", p, params)
    expected = run_engine(sync)
    for i, deltas in enumerate(results):
        assert tokens_of(deltas) == tokens_of(expected[(f"r{i}", 0)])
        assert deltas[-1].finished and deltas[-1].finish_reason == "length"
        assert "".join(d.new_text for d in deltas) == "".join(d.new_text for d in expected[(f"r{i}", 0)])
    wait_until(lambda: engine.stats().kv_cache_usage == 0.0)


def test_leaving_the_stream_early_aborts_and_frees(engine: AsyncEngine, parts) -> None:
    vocab = parts[0].config.vocab_size

    async def main():
        stream = engine.generate(
            prompts(1, vocab)[0], SamplingParams(max_tokens=100, ignore_eos=True), "early"
        )
        async for _ in stream:
            break
        await stream.aclose()

    asyncio.run(main())
    wait_until(lambda: engine.engine.blocks.num_free_blocks == engine.engine.blocks.num_blocks)
    wait_until(lambda: engine.stats().num_running == 0 and engine.num_unfinished == 0)


def test_invalid_request_raises_before_streaming(engine: AsyncEngine) -> None:
    async def main():
        await collect(engine, list(range(3, 130)), SamplingParams(max_tokens=10), "too-long")

    with pytest.raises(RequestRejected):
        asyncio.run(main())


def test_failed_request_raises_and_engine_keeps_serving(engine: AsyncEngine, parts, monkeypatch) -> None:
    runner = engine.engine.runner
    original = runner.execute
    calls = {"n": 0}

    def flaky(step):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("injected")
        return original(step)

    monkeypatch.setattr(runner, "execute", flaky)
    params = SamplingParams(max_tokens=4, ignore_eos=True)
    with pytest.raises(RequestFailedError, match="injected"):
        asyncio.run(collect(engine, [5, 6, 7], params, "fails"))
    assert len(tokens_of(asyncio.run(collect(engine, [5, 6, 7], params, "works")))) == 4
    assert engine.is_alive


def test_dead_loop_fails_waiting_streams_and_reports_unhealthy(engine: AsyncEngine, monkeypatch) -> None:
    def crash():
        raise SystemError("loop crashed")

    monkeypatch.setattr(engine.engine, "step", crash)
    with pytest.raises(EngineDeadError):
        asyncio.run(collect(engine, [5, 6, 7], SamplingParams(max_tokens=4), "dead"))
    wait_until(lambda: not engine.is_alive)
    with pytest.raises(EngineDeadError):
        asyncio.run(collect(engine, [5, 6, 7], SamplingParams(max_tokens=4), "after"))


def _delta(index: int, text: str, tokens: list[int], error: str | None = None) -> RequestOutput:
    return RequestOutput("r", index, tokens, text, error is not None, "error" if error else None, 3,
                         len(tokens), error=error)


def test_merged_deltas_keep_the_text_produced_before_an_error() -> None:
    merged = merge_outputs([_delta(0, "He", [5]), _delta(1, "x", [9]), _delta(0, "llo", [6]),
                            _delta(0, "", [], error="boom")])
    assert [(m.index, m.new_text, m.new_token_ids, m.error) for m in merged] == [
        (0, "Hello", [5, 6], None), (1, "x", [9], None), (0, "", [], "boom")]
