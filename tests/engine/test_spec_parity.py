"""Greedy speculation gives exactly transformers' greedy tokens: 32 concurrent requests, prompts of 1..200
tokens, k of 1, 3 and 5, preempted (small KV pool) and chunked (small token budget); proposals from n-grams,
from transformers' own continuation with wrong tokens in it, and ones that are never right. After each run
every block is free, and no step wrote over the K/V of a token already in the cache."""

from __future__ import annotations

import random

import pytest

from model.loader import load_model
from model.tokenizer import Tokenizer
from server.engine.config import EngineConfig
from server.engine.llm_engine import LLMEngine
from server.engine.request import Request
from server.engine.sampling_params import SamplingParams
from server.engine.spec import SpeculativeConfig
from server.engine.worker.decode_graphs import graph_batch_sizes
from tests.support.engine import assert_all_blocks_free, assert_matches, hf_greedy, run_engine
from tests.support.proposers import ReferenceProposer

NUM_REQUESTS = 32


@pytest.fixture(scope="module")
def workload(engine_checkpoint):
    """Odd requests repeat a short span (n-grams to copy), even ones are random (nothing to copy)."""
    directory, hf = engine_checkpoint
    rng = random.Random(7)
    vocab = hf.config.vocab_size
    lengths = [1, 200, 2, 17, 64, 120, 5, 33] + [rng.randint(1, 200) for _ in range(NUM_REQUESTS - 8)]
    requests = []
    for i, length in enumerate(lengths):
        span = [rng.randrange(3, vocab) for _ in range(rng.randint(3, 12) if i % 2 else length)]
        prompt = (span * (length // len(span) + 1))[:length]
        max_tokens = rng.randint(8, 24)
        expected, trusted = hf_greedy(hf, prompt, max_tokens)
        requests.append((f"req-{i}", prompt, max_tokens, expected, trusted))
    model = load_model(directory, dtype="float32", device="cpu")
    return model, Tokenizer.from_dir(directory), requests


def make_engine(workload, k: int, **overrides) -> LLMEngine:
    model, tokenizer, _ = workload
    settings = dict(model="unused", block_size=4, num_kv_blocks=512, max_model_len=256, max_num_seqs=32,
                    speculative_config=SpeculativeConfig(k, prompt_lookup_min=1, prompt_lookup_max=3))
    settings.update(overrides)
    return LLMEngine(EngineConfig(**settings), model, tokenizer)


def submit_in_waves(engine: LLMEngine, requests, wave: int = 8, every: int = 3):
    arrivals = {}
    for start in range(0, len(requests), wave):
        def add(batch=requests[start : start + wave]) -> None:
            for rid, prompt, max_tokens, _, _ in batch:
                engine.add_request(rid, prompt, SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True))

        arrivals[(start // wave) * every] = add
    return arrivals


class KVWriteCheck:
    """Watches every step: its cache slots are distinct and none holds K/V a live sequence has computed; and
    between steps each running sequence holds just the blocks its computed tokens fill (none for rejected ones)."""

    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self.steps = 0
        forward, schedule = engine.runner._forward, engine.scheduler.schedule

        def checked_forward(inputs):
            self.check(inputs)
            return forward(inputs)

        def checked_schedule(*args):
            for request in engine.scheduler.running:
                assert len(request.block_ids) == engine.blocks.blocks_for(request.num_computed_tokens)
            return schedule(*args)

        engine.runner._forward = checked_forward  # type: ignore[method-assign]
        engine.scheduler.schedule = checked_schedule  # type: ignore[method-assign]

    def check(self, inputs) -> None:
        size = self.engine.blocks.block_size
        written = []
        for q, c, table in zip(inputs.query_lens, inputs.context_lens, inputs.block_tables):
            written += [table[p // size] * size + p % size for p in range(c - q, c)]
        assert len(written) == len(set(written)), "a slot is written twice in one step"
        computed = set()
        for request in self.engine.scheduler.running:
            computed |= {self._slot(request, p) for p in range(request.num_computed_tokens)}
        assert not computed & set(written), "a step overwrote K/V already in the cache"
        self.steps += 1

    def _slot(self, request: Request, position: int) -> int:
        size = self.engine.blocks.block_size
        return request.block_ids[position // size] * size + position % size


@pytest.mark.parametrize(("k", "overrides"), [
    (1, {"num_kv_blocks": 80}),  # 320 tokens for 32 requests of up to 224: preempted and recomputed
    (3, {"max_num_batched_tokens": 16}),  # prefills chunked, proposals squeezed into what is left
    (5, {"num_kv_blocks": 96, "max_num_batched_tokens": 40}),
])
def test_ngram_speculation_matches_transformers(workload, k, overrides) -> None:
    engine = make_engine(workload, k, **overrides)
    kv = KVWriteCheck(engine)
    outputs = run_engine(engine, submit_in_waves(engine, workload[2]))
    assert_matches(outputs, workload[2])
    assert_all_blocks_free(engine)
    stats = engine.stats()
    assert stats.spec_decode_num_accepted_tokens > 0 and stats.spec_decode_num_drafts > 0
    assert stats.spec_decode_num_draft_tokens > stats.spec_decode_num_accepted_tokens  # some were rejected
    if "num_kv_blocks" in overrides:
        assert stats.num_preemptions > 0
    assert kv.steps > 0
    assert not engine.core.spec._lengths and not engine.core.spec.proposer._texts  # nothing kept per ended sequence


def test_verification_steps_run_eagerly_beside_the_static_decode_path(workload) -> None:
    """Decode graphs are for one-token decode steps: a step that verifies proposals runs eagerly (on CPU the
    static decode path runs uncaptured, through the same dispatch)."""
    engine = make_engine(workload, 3)
    engine.runner.enable_decode_graphs(graph_batch_sizes(32), engine.max_model_len, capture=False)
    graphs, schedule = engine.runner.decode_graphs, engine.scheduler.schedule
    replayed, verifying = [], []
    run = graphs.run

    def counting_run(token_ids, context_lens, block_tables):
        replayed.append(len(token_ids))
        return run(token_ids, context_lens, block_tables)

    def counting_schedule(*args):
        step = schedule(*args)
        verifying.append(any(s.draft_token_ids for s in step.scheduled))
        return step

    graphs.run = counting_run  # type: ignore[method-assign]
    engine.scheduler.schedule = counting_schedule  # type: ignore[method-assign]
    outputs = run_engine(engine, submit_in_waves(engine, workload[2]))
    assert_matches(outputs, workload[2])
    assert replayed and sum(verifying) > 0
    assert len(replayed) <= verifying.count(False)  # no step with proposals went through the static path


def test_partly_wrong_proposals_are_accepted_as_far_as_they_are_right(workload) -> None:
    """Proposals of transformers' own tokens with one wrong: kept up to the wrong one, which the model's own
    token replaces; every block is free afterwards although many proposals ended in rejections."""
    engine = make_engine(workload, 4, num_kv_blocks=80)
    references = {(rid, 0): expected[:trusted] for rid, _, _, expected, trusted in workload[2]}
    proposer = engine.core.spec.proposer = ReferenceProposer(references, engine.vocab_size)
    kv = KVWriteCheck(engine)
    outputs = run_engine(engine, submit_in_waves(engine, workload[2]))
    assert_matches(outputs, workload[2])
    assert_all_blocks_free(engine)
    stats = engine.stats()
    assert proposer.proposed >= stats.spec_decode_num_draft_tokens > 200
    rate = stats.spec_decode_num_accepted_tokens / stats.spec_decode_num_draft_tokens
    assert 0.3 < rate < 0.9, rate
    assert stats.num_preemptions > 0 and kv.steps > 0


class NeverRight:
    """Proposes tokens one off transformers' own: never accepted."""

    def __init__(self, references, vocab_size: int) -> None:
        self.references, self.vocab_size = references, vocab_size

    def propose(self, request: Request, num_tokens: int) -> list[int]:
        done = len(request.output_ids)
        return [(t + 1) % self.vocab_size for t in self.references.get(request.key, ())[done : done + num_tokens]]

    def drop(self, key) -> None:
        """Nothing is kept per sequence."""


def test_proposals_that_are_never_right_change_nothing_and_fade_out(workload) -> None:
    engine = make_engine(workload, 5, max_num_batched_tokens=24)
    references = {(rid, 0): expected[:trusted] for rid, _, _, expected, trusted in workload[2]}
    engine.core.spec.proposer = NeverRight(references, engine.vocab_size)
    outputs = run_engine(engine, submit_in_waves(engine, workload[2]))
    assert_matches(outputs, workload[2])
    assert_all_blocks_free(engine)
    stats = engine.stats()
    assert stats.spec_decode_num_accepted_tokens == 0 and stats.spec_decode_num_drafts > 0
    generated = sum(m for _, _, m, _, _ in workload[2])
    assert stats.spec_decode_num_drafts < generated / 3  # backed off: most steps proposed nothing
    # After its first miss a sequence proposes one token at a time.
    assert stats.spec_decode_num_draft_tokens <= stats.spec_decode_num_drafts + 4 * NUM_REQUESTS


def test_aborting_mid_proposal_frees_everything(workload) -> None:
    engine = make_engine(workload, 5)
    for rid, prompt, max_tokens, _, _ in workload[2][:8]:
        engine.add_request(rid, prompt, SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True))
    for _ in range(6):
        engine.step()
    assert engine.core.spec._lengths and engine.stats().spec_decode_num_drafts > 0
    for rid, *_ in workload[2][:8]:
        engine.abort(rid)
    assert_all_blocks_free(engine)
    assert not engine.core.spec._lengths and not engine.core.spec.proposer._texts
