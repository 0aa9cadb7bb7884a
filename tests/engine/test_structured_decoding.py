"""Grammar-constrained decoding in the engine: constrained and free requests share batches without changing
each other's tokens; seeds, ``n``, chunked prefill and preemption; compilation off the step loop, cached."""

from __future__ import annotations

import json
import threading
from concurrent.futures import Future

import jsonschema_rs
import pytest
import torch

from model.bundled import BUNDLED_MODEL_DIR
from server.engine.config import EngineConfig
from server.engine.llm_engine import LLMEngine
from server.engine.sampler import Sampler, SamplingRow
from server.engine.sampling_params import SamplingParams
from server.engine.structured import StructuredSpec
from server.engine.structured.matcher import GrammarState
from tests.support.engine import run_engine, tokens_of

SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 10},
    "score": {"type": "integer", "minimum": 0, "maximum": 99},
    "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3}},
    "required": ["name", "score", "tags"], "additionalProperties": False}
JSON_SPEC = StructuredSpec.json_schema(SCHEMA)


def make_engine(**overrides) -> LLMEngine:
    settings = {"model": str(BUNDLED_MODEL_DIR), "device": "cpu", "dtype": "float32", "num_kv_blocks": 256,
                "max_model_len": 512, **overrides}
    return LLMEngine.from_config(EngineConfig(**settings))


@pytest.fixture(scope="module")
def engine() -> LLMEngine:
    return make_engine()


def _prompts(engine: LLMEngine, count: int) -> list[list[int]]:
    words = ["def", "class Stack:", "import os", "for i in range(10):", "return", "# parse the", "x = [", "if"]
    return [engine.tokenizer.encode(f"{words[i % len(words)]} {i}") for i in range(count)]


def _texts(outputs) -> dict[str, str]:
    return {f"{key[0]}/{key[1]}": "".join(d.new_text for d in deltas)
            for key, deltas in outputs.items()}


def _solo(engine: LLMEngine, prompt: list[int], params: SamplingParams) -> list[int]:
    engine.add_request("solo", prompt, params)
    return tokens_of(run_engine(engine)[("solo", 0)])


def test_half_constrained_batch_leaves_the_free_requests_unchanged(engine) -> None:
    prompts = _prompts(engine, 16)
    free = SamplingParams(max_tokens=24, temperature=0)
    constrained = SamplingParams(max_tokens=200, temperature=0, structured=JSON_SPEC)
    for i, prompt in enumerate(prompts):
        engine.add_request(f"r{i}", prompt, constrained if i % 2 else free)
    outputs = run_engine(engine)
    for i, prompt in enumerate(prompts):
        deltas = outputs[(f"r{i}", 0)]
        if i % 2:
            assert deltas[-1].finish_reason == "stop"
            jsonschema_rs.validate(SCHEMA, json.loads("".join(d.new_text for d in deltas)))
        else:
            assert tokens_of(deltas) == _solo(engine, prompt, free)


def test_constrained_output_is_the_same_alone_in_a_batch_chunked_and_preempted() -> None:
    """Greedy and seeded samples of constrained requests, n > 1, with free requests around them."""
    params = [SamplingParams(max_tokens=120, temperature=0, structured=JSON_SPEC),
              SamplingParams(max_tokens=120, temperature=1.0, seed=7, n=3, structured=JSON_SPEC),
              SamplingParams(max_tokens=40, temperature=0, structured=StructuredSpec("regex", r"[a-z]{4,30}")),
              SamplingParams(max_tokens=60, temperature=0.8, seed=1)]
    alone: dict[str, str] = {}
    reference = make_engine()
    prompts = _prompts(reference, len(params))
    for i, (prompt, p) in enumerate(zip(prompts, params)):
        reference.add_request(f"r{i}", prompt, p)
        alone.update(_texts(run_engine(reference)))
    # 40 blocks of 4 tokens cannot hold every sequence: requests are preempted and recomputed.
    small_pool = {"num_kv_blocks": 40, "block_size": 4, "max_model_len": 160}
    for overrides in ({}, {"max_num_batched_tokens": 8}, small_pool):
        engine = make_engine(**overrides)
        for i, (prompt, p) in enumerate(zip(prompts, params)):
            engine.add_request(f"r{i}", prompt, p)
        assert _texts(run_engine(engine)) == alone, overrides
        if "num_kv_blocks" in overrides:
            assert engine.stats().num_preemptions > 0
    for key in ("r0/0", "r1/0", "r1/1", "r1/2"):
        jsonschema_rs.validate(SCHEMA, json.loads(alone[key]))
    assert len({alone["r1/0"], alone["r1/1"], alone["r1/2"]}) > 1  # each sample its own seed


def test_a_compiling_grammar_does_not_stall_the_batch(engine, monkeypatch) -> None:
    gate: Future = Future()
    real_submit = engine.grammars.submit
    slow_spec = StructuredSpec("regex", "[0-9]{3}")

    def submit(spec):
        if spec != slow_spec:
            return real_submit(spec)
        return gate

    monkeypatch.setattr(engine.grammars, "submit", submit)
    prompt = _prompts(engine, 1)[0]
    engine.add_request("slow", prompt, SamplingParams(max_tokens=8, temperature=0, structured=slow_spec))
    engine.add_request("free", prompt, SamplingParams(max_tokens=6, temperature=0))
    seen: list[str] = []
    for _ in range(6):
        seen += [o.request_id for o in engine.step()]
    assert seen == ["free"] * 6  # the free request ran to its end while the grammar was "compiling"
    threading.Thread(target=lambda: gate.set_result(real_submit(slow_spec).result())).start()
    outputs = run_engine(engine)
    text = "".join(d.new_text for d in outputs[("slow", 0)])
    assert len(text) == 3 and text.isdigit() and outputs[("slow", 0)][-1].finish_reason == "stop"


def test_grammars_compile_once_per_distinct_spec() -> None:
    engine = make_engine()
    prompt = _prompts(engine, 1)[0]
    for i in range(4):
        spec = StructuredSpec.json_schema(dict(SCHEMA), param=f"p{i}")  # equal schemas, other field names
        engine.add_request(f"r{i}", prompt, SamplingParams(max_tokens=100, temperature=0, structured=spec))
    run_engine(engine)
    assert [r.kind for r in engine.grammars.records] == ["json"]
    assert engine.grammars.submit(JSON_SPEC).done()


def test_a_grammar_that_fails_to_compile_fails_only_its_request() -> None:
    engine = make_engine()
    prompt = _prompts(engine, 1)[0]
    engine.add_request("bad", prompt, SamplingParams(structured=StructuredSpec("regex", "(")))
    engine.add_request("good", prompt, SamplingParams(max_tokens=4, temperature=0))
    outputs = run_engine(engine)
    assert outputs[("bad", 0)][-1].finish_reason == "error" and "regex" in outputs[("bad", 0)][-1].error
    assert outputs[("good", 0)][-1].finish_reason == "length"


def test_ignore_eos_still_ends_a_completed_grammar(engine) -> None:
    prompt = _prompts(engine, 1)[0]
    spec = StructuredSpec.choice(["yes", "no"])
    engine.add_request("c", prompt, SamplingParams(max_tokens=30, temperature=0, ignore_eos=True, structured=spec))
    deltas = run_engine(engine)[("c", 0)]
    assert "".join(d.new_text for d in deltas) in ("yes", "no") and deltas[-1].finish_reason == "stop"


def test_bitmask_comes_after_logit_bias_and_touches_only_constrained_rows(engine) -> None:
    grammar = engine.grammars.compile(StructuredSpec.choice(["yes"]))
    vocab = engine.model.config.vocab_size
    logits = torch.randn(3, vocab)  # [3, V]
    banned = 7
    biased = SamplingParams(temperature=0, logit_bias={banned: 100.0})
    rows = [SamplingRow(biased, [1], [], grammar=GrammarState(grammar)), SamplingRow(biased, [1], []),
            SamplingRow(SamplingParams(temperature=0), [1], [])]
    out = Sampler()(logits, rows).token_ids
    allowed = engine.tokenizer.encode("yes", add_special_tokens=False)[0]
    state = GrammarState(grammar)
    assert state.accept(out[0]) and out[0] != banned
    assert out[1] == banned and out[2] == int(logits[2].argmax())
    assert engine.tokenizer.decode([out[0]]) in "yes" and allowed is not None


def test_replay_rebuilds_the_state(engine) -> None:
    grammar = engine.grammars.compile(StructuredSpec("regex", "ab+c"))
    ids = engine.tokenizer.hf.convert_tokens_to_ids(list("abbbc"))  # one piece per character
    state = GrammarState(grammar)
    assert all(state.accept(t) for t in ids) and state.num_accepted == len(ids)
    assert state.replay(ids[:2]) and state.num_accepted == 2
    assert state.replay(ids) and state.accept(engine.tokenizer.eos_token_id) and state.is_terminated
    assert not GrammarState(grammar).replay(engine.tokenizer.hf.convert_tokens_to_ids(["x"]))
