"""Many concurrent requests through the engine give exactly transformers' greedy tokens."""

from __future__ import annotations

import random

import pytest

from model.loader import load_model
from model.tokenizer import Tokenizer
from server.engine.config import EngineConfig
from server.engine.llm_engine import LLMEngine
from server.engine.sampling_params import SamplingParams
from tests.support.engine import assert_all_blocks_free, assert_matches, hf_greedy, run_engine

NUM_REQUESTS = 32


@pytest.fixture(scope="module")
def workload(engine_checkpoint):
    directory, hf = engine_checkpoint
    rng = random.Random(11)
    vocab = hf.config.vocab_size
    lengths = [1, 200, 2, 17, 64, 120, 5, 33] + [rng.randint(1, 200) for _ in range(NUM_REQUESTS - 8)]
    requests = []
    for i, length in enumerate(lengths):
        prompt = [rng.randrange(3, vocab) for _ in range(length)]
        max_tokens = rng.randint(4, 24)
        expected, trusted = hf_greedy(hf, prompt, max_tokens)
        requests.append((f"req-{i}", prompt, max_tokens, expected, trusted))
    model = load_model(directory, dtype="float32", device="cpu")
    return model, Tokenizer.from_dir(directory), requests


def make_engine(workload, **overrides) -> LLMEngine:
    model, tokenizer, _ = workload
    settings = dict(model="unused", block_size=4, num_kv_blocks=512, max_model_len=256, max_num_seqs=32)
    settings.update(overrides)
    return LLMEngine(EngineConfig(**settings), model, tokenizer)


def submit_in_waves(engine: LLMEngine, requests, wave: int = 8, every: int = 3):
    """Requests arrive in waves of ``wave`` every ``every`` steps, while earlier ones are running."""
    arrivals = {}
    for start in range(0, len(requests), wave):
        batch = requests[start : start + wave]

        def add(batch=batch) -> None:
            for rid, prompt, max_tokens, _, _ in batch:
                engine.add_request(
                    rid, prompt, SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
                )

        arrivals[(start // wave) * every] = add
    return arrivals


def test_concurrent_greedy_matches_transformers(workload) -> None:
    engine = make_engine(workload)
    outputs = run_engine(engine, submit_in_waves(engine, workload[2]))
    assert_matches(outputs, workload[2])
    assert_all_blocks_free(engine)


def test_small_kv_pool_preempts_and_still_matches(workload) -> None:
    engine = make_engine(workload, num_kv_blocks=80)  # 320 tokens for 32 requests of up to 224 tokens
    outputs = run_engine(engine, submit_in_waves(engine, workload[2]))
    assert engine.scheduler.num_preemptions > 0
    assert_matches(outputs, workload[2])
    assert_all_blocks_free(engine)


def test_tiny_token_budget_chunks_prefills_and_still_matches(workload) -> None:
    engine = make_engine(workload, max_num_batched_tokens=16)
    chunked = []
    schedule = engine.scheduler.schedule

    def spy():
        out = schedule()
        assert out.num_tokens <= 16
        chunked.extend(s for s in out.scheduled if s.num_new_tokens > 1 and not s.completes)
        return out

    engine.scheduler.schedule = spy
    outputs = run_engine(engine, submit_in_waves(engine, workload[2]))
    assert chunked, "no prefill was chunked"
    assert_matches(outputs, workload[2])
    assert_all_blocks_free(engine)
