"""Sampling under speculation: the same distribution as without it (chi-square over thousands of draws),
seeded requests identical alone, batched and without speculation, and stops, lengths, logprobs, n, penalties
and prefix caching unchanged."""

from __future__ import annotations

import random
from collections import Counter

import pytest
import torch

from model.loader import load_model
from model.tokenizer import Tokenizer
from server.engine.config import EngineConfig
from server.engine.llm_engine import LLMEngine
from server.engine.sampling_params import SamplingParams
from server.engine.spec import SpeculativeConfig
from tests.support.chi_square import two_samples
from tests.support.engine import run_engine, tokens_of
from tests.support.proposers import ReferenceProposer


@pytest.fixture(scope="module")
def parts(engine_checkpoint):
    directory, _ = engine_checkpoint
    return load_model(directory, dtype="float32"), Tokenizer.from_dir(directory)


def make_engine(parts, k: int | None = 3, **overrides) -> LLMEngine:
    model, tokenizer = parts
    spec = SpeculativeConfig(k, prompt_lookup_min=1, prompt_lookup_max=3) if k else None
    settings = dict(model="unused", block_size=4, num_kv_blocks=512, max_model_len=200, speculative_config=spec)
    settings.update(overrides)
    return LLMEngine(EngineConfig(**settings), model, tokenizer)


def looping_prompt(length: int, seed: int, vocab: int) -> list[int]:
    """A short random span repeated: n-grams to copy."""
    rng = random.Random(seed)
    span = [rng.randrange(3, vocab) for _ in range(rng.randint(3, 8))]
    return (span * length)[:length]


def run(engine: LLMEngine, requests: dict[str, tuple[list[int], SamplingParams]]):
    for rid, (prompt, params) in requests.items():
        engine.add_request(rid, prompt, params)
    outputs = run_engine(engine)
    assert engine.blocks.num_free_blocks == engine.blocks.num_blocks
    return outputs


class GreedyTree:
    """Proposes the greedy continuation of each sequence's own output so far (looked up in a table of every
    output prefix top-k sampling can reach), so that proposals are kept about as often as the argmax is drawn."""

    def __init__(self, hf, prompt: list[int], top_k: int, depth: int) -> None:
        self.next: dict[tuple[int, ...], int] = {}
        frontier: list[tuple[int, ...]] = [()]
        with torch.no_grad():
            for _ in range(depth):
                grown = []
                for prefix in frontier:
                    logits = hf(torch.tensor([prompt + list(prefix)])).logits[0, -1]  # [V]
                    self.next[prefix] = int(logits.argmax())
                    grown += [prefix + (int(t),) for t in logits.topk(top_k).indices]
                frontier = grown

    def propose(self, request, num_tokens: int) -> list[int]:
        prefix, draft = tuple(request.output_ids), []
        while len(draft) < num_tokens and prefix in self.next:
            draft.append(self.next[prefix])
            prefix += (draft[-1],)
        return draft

    def drop(self, key) -> None:
        """Nothing is kept per sequence."""


def test_sampled_outputs_follow_the_same_distribution_with_and_without_speculation(parts, engine_checkpoint) -> None:
    """3000 samples of 4 tokens (top-k 3, so few outcomes) with proposals of the greedy continuation, kept
    often but not always, against 3000 without speculation: one distribution by a chi-square test."""
    vocab = parts[0].config.vocab_size
    prompt = looping_prompt(12, 1, vocab)
    params = SamplingParams(n=100, temperature=1.0, top_k=3, max_tokens=4, ignore_eos=True)
    tree = GreedyTree(engine_checkpoint[1], prompt, 3, 3)
    samples = {}
    for arm, k in (("plain", None), ("spec", 3)):
        torch.manual_seed(11)
        engine = make_engine(parts, k, max_num_seqs=256, num_kv_blocks=1024)
        if k:
            engine.core.spec.proposer = tree
        outputs = run(engine, {f"r{i}": (prompt, params) for i in range(30)})
        samples[arm] = Counter(tuple(tokens_of(deltas)) for deltas in outputs.values())
        assert sum(samples[arm].values()) == 3000
    stats = engine.stats()
    assert 0.3 * stats.spec_decode_num_draft_tokens < stats.spec_decode_num_accepted_tokens
    assert stats.spec_decode_num_accepted_tokens < 0.9 * stats.spec_decode_num_draft_tokens
    assert len(samples["plain"]) > 5
    assert two_samples(samples["plain"], samples["spec"]) > 1e-3


SEEDED = {
    "a": SamplingParams(temperature=0.8, top_p=0.9, seed=1, max_tokens=24, ignore_eos=True),
    "b": SamplingParams(temperature=1.0, top_k=20, presence_penalty=0.5, seed=2, max_tokens=20, ignore_eos=True),
    "c": SamplingParams(temperature=0.6, min_p=0.05, seed=3, n=2, max_tokens=16, ignore_eos=True),
}


def seeded_requests(vocab: int) -> dict[str, tuple[list[int], SamplingParams]]:
    return {rid: (looping_prompt(10 + 7 * i, 20 + i, vocab), params) for i, (rid, params) in enumerate(SEEDED.items())}


def noise(vocab: int) -> dict[str, tuple[list[int], SamplingParams]]:
    return {"noise-0": (looping_prompt(30, 3, vocab), SamplingParams(temperature=1.0, max_tokens=20)),
            "noise-1": (looping_prompt(5, 4, vocab), SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)),
            "noise-2": (looping_prompt(12, 5, vocab), SamplingParams(temperature=0.5, seed=9, max_tokens=15))}


def test_seeded_requests_are_the_same_alone_batched_and_without_speculation(parts) -> None:
    vocab = parts[0].config.vocab_size
    requests = seeded_requests(vocab)
    plain = {}
    for rid, request in requests.items():
        plain.update({key: tokens_of(d) for key, d in run(make_engine(parts, None), {rid: request}).items()})
    for rid, request in requests.items():  # alone, n-gram proposals
        alone = run(make_engine(parts, 5), {rid: request})
        assert {key: tokens_of(d) for key, d in alone.items()} == {k: v for k, v in plain.items() if k[0] == rid}
    for proposer in ("ngram", "reference"):  # in a batch with others
        engine = make_engine(parts, 4)
        if proposer == "reference":
            engine.core.spec.proposer = ReferenceProposer(plain, vocab)
        batched = run(engine, {**noise(vocab), **requests})
        assert {key: tokens_of(batched[key]) for key in plain} == plain, proposer
        stats = engine.stats()
        assert stats.spec_decode_num_draft_tokens > stats.spec_decode_num_accepted_tokens > 0


def features(free: list[int], tokenizer: Tokenizer) -> dict[str, SamplingParams]:
    """Requests whose ends fall inside proposals: a stop token, a stop string, max_tokens, min_tokens."""
    stop_text = tokenizer.decode(free[4:6])
    return {
        "stop-id": SamplingParams(temperature=0, max_tokens=30, stop_token_ids=[free[5]], logprobs=3),
        "stop-str": SamplingParams(temperature=0, max_tokens=30, stop=[stop_text] if stop_text.strip() else None),
        "stop-str-kept": SamplingParams(temperature=0, max_tokens=30, stop=[stop_text] if stop_text.strip() else None,
                                        include_stop_str_in_output=True),
        "short": SamplingParams(temperature=0, max_tokens=3, ignore_eos=True),
        "min-tokens": SamplingParams(temperature=0, max_tokens=30, min_tokens=6, stop_token_ids=[free[1]]),
        "penalised": SamplingParams(temperature=0, max_tokens=25, frequency_penalty=0.7, ignore_eos=True),
        "biased": SamplingParams(temperature=0, max_tokens=20, logit_bias={free[2]: 3.0}, ignore_eos=True),
        "n-seeded": SamplingParams(temperature=1.0, n=3, seed=5, max_tokens=18, logprobs=2, ignore_eos=True),
    }


def summary(outputs) -> dict:
    result = {}
    for key, deltas in outputs.items():
        lps = [(lp.token_id, round(lp.logprob, 4), [t for t, _ in lp.top]) for d in deltas for lp in d.logprobs or []]
        result[key] = (tokens_of(deltas), "".join(d.new_text for d in deltas), deltas[-1].finish_reason,
                       deltas[-1].stop_reason, lps, deltas[0].num_cached_tokens)
    return result


def test_stops_lengths_logprobs_n_and_prefix_caching_keep_their_meaning(parts) -> None:
    model, tokenizer = parts
    vocab = model.config.vocab_size
    prompt = looping_prompt(40, 8, vocab)
    free = tokens_of(run(make_engine(parts, None), {"free": (prompt, SamplingParams(temperature=0, max_tokens=30,
                                                                                    ignore_eos=True))})[("free", 0)])
    requests = {rid: (prompt, params) for rid, params in features(free, tokenizer).items()}
    plain = summary(run(make_engine(parts, None), requests))
    assert plain[("stop-id", 0)][2] == "stop" and plain[("stop-id", 0)][3] == free[5]
    assert len(plain[("min-tokens", 0)][0]) >= 6 and plain[("short", 0)][2] == "length"
    assert plain[("stop-str", 0)][2] == "stop" and plain[("stop-str-kept", 0)][2] == "stop"
    assert any(row[5] > 0 for row in plain.values())  # the shared prompt came from the prefix cache
    for proposer in ("ngram", "reference"):
        engine = make_engine(parts, 5)
        if proposer == "reference":
            engine.core.spec.proposer = ReferenceProposer({k: v[0] for k, v in plain.items()}, vocab)
        got = summary(run(engine, requests))
        assert got == plain, proposer
        assert engine.stats().spec_decode_num_accepted_tokens > 0
