"""Engine behaviour: prefix caching, seeded sampling, stops, n > 1, logprobs, abort and failures."""

from __future__ import annotations

import random

import pytest
import torch

from model.loader import load_model
from model.tokenizer import Tokenizer
from server.engine.config import EngineConfig
from server.engine.llm_engine import LLMEngine, RequestRejected
from server.engine.sampling_params import SamplingParams
from tests.support.engine import hf_greedy, run_engine, tokens_of


@pytest.fixture(scope="module")
def parts(engine_checkpoint):
    directory, hf = engine_checkpoint
    return load_model(directory, dtype="float32"), Tokenizer.from_dir(directory), hf


def make_engine(parts, **overrides) -> LLMEngine:
    model, tokenizer, _ = parts
    settings = dict(model="unused", block_size=4, num_kv_blocks=256, max_model_len=200)
    settings.update(overrides)
    return LLMEngine(EngineConfig(**settings), model, tokenizer)


def prompt_of(length: int, seed: int, vocab: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, vocab) for _ in range(length)]


def assert_idle(engine: LLMEngine) -> None:
    assert engine.blocks.num_free_blocks == engine.blocks.num_blocks
    assert not engine.has_unfinished()


def test_shared_prefix_hits_cache_with_identical_outputs(parts) -> None:
    _, _, hf = parts
    vocab = hf.config.vocab_size
    system = prompt_of(40, 1, vocab)
    prompts = [system + prompt_of(n, 10 + n, vocab) for n in (3, 7, 11)]
    greedy = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    engine = make_engine(parts)
    engine.add_request("first", prompts[0], greedy)
    first = run_engine(engine)
    for i, prompt in enumerate(prompts[1:]):
        engine.add_request(f"later-{i}", prompt, greedy)
    later = run_engine(engine)
    stats = engine.stats()
    assert stats.prefix_cache_hits >= 2 * 40 and stats.prefix_cache_queries == sum(map(len, prompts))
    assert later[("later-0", 0)][0].num_cached_tokens == 40
    for key, prompt in zip([("first", 0), ("later-0", 0), ("later-1", 0)], prompts):
        expected, trusted = hf_greedy(hf, prompt, 8)
        got = tokens_of({**first, **later}[key])
        assert got[:trusted] == expected[:trusted]
    assert_idle(engine)


def test_seeded_sampling_is_batch_independent(parts) -> None:
    vocab = parts[2].config.vocab_size
    seeded = SamplingParams(temperature=0.9, top_p=0.95, top_k=50, seed=1234, max_tokens=12, ignore_eos=True)
    prompt = prompt_of(9, 2, vocab)
    alone_engine = make_engine(parts)
    alone_engine.add_request("alone", prompt, seeded)
    alone = tokens_of(run_engine(alone_engine)[("alone", 0)])
    engine = make_engine(parts)
    engine.add_request("noise-0", prompt_of(30, 3, vocab), SamplingParams(temperature=1.0, max_tokens=20))
    engine.add_request("noise-1", prompt_of(5, 4, vocab), SamplingParams(temperature=0, max_tokens=3))
    engine.add_request("target", prompt, seeded)
    engine.add_request(
        "noise-2", prompt_of(12, 5, vocab), SamplingParams(temperature=0.5, seed=9, max_tokens=15)
    )
    batched = tokens_of(run_engine(engine)[("target", 0)])
    assert batched == alone
    other = make_engine(parts)
    other.add_request("other-seed", prompt, SamplingParams(**{**seeded.__dict__, "seed": 4321}))
    assert tokens_of(run_engine(other)[("other-seed", 0)]) != alone


def test_n_samples_share_prompt_blocks_and_differ(parts) -> None:
    vocab = parts[2].config.vocab_size
    engine = make_engine(parts)
    prompt = prompt_of(21, 6, vocab)
    engine.add_request(
        "multi", prompt, SamplingParams(n=3, temperature=1.0, seed=5, max_tokens=10, ignore_eos=True)
    )
    engine.step()
    tables = [r.block_ids for r in engine.scheduler.running]
    assert len(tables) == 3
    assert tables[0][:5] == tables[1][:5] == tables[2][:5]  # 20 prompt tokens in shared full blocks
    outputs = run_engine(engine)
    samples = {tuple(tokens_of(outputs[("multi", i)])) for i in range(3)}
    assert len(samples) == 3 and all(len(s) == 9 for s in samples)  # plus the token of the first step
    assert_idle(engine)


def test_stop_string_token_id_and_eos(parts) -> None:
    model, tokenizer, hf = parts
    for seed in range(50):  # a prompt whose greedy continuation has a fresh token after a few steps
        prompt = prompt_of(10, seed, hf.config.vocab_size)
        expected, trusted = hf_greedy(hf, prompt, 12)
        fresh = [i for i in range(2, min(trusted, 8)) if expected[i] not in expected[:i]]
        if fresh:
            break
    cut = fresh[0]
    engine = make_engine(parts)
    engine.add_request(
        "tok", prompt, SamplingParams(temperature=0, max_tokens=12, stop_token_ids=[expected[cut]])
    )
    out = run_engine(engine)[("tok", 0)]
    assert tokens_of(out) == expected[: cut + 1] and out[-1].finish_reason == "stop"
    full_text = tokenizer.decode(prompt + expected[:6])[len(tokenizer.decode(prompt)) :]
    stop = full_text[-3:].strip() or full_text[-1]
    engine.add_request("str", prompt, SamplingParams(temperature=0, max_tokens=12, stop=[stop]))
    out = run_engine(engine)[("str", 0)]
    text = "".join(d.new_text for d in out)
    assert out[-1].finish_reason == "stop" and stop not in text and full_text.startswith(text)
    bias = SamplingParams(temperature=0, max_tokens=12, logit_bias={tokenizer.eos_token_id: 100.0})
    engine.add_request("eos", prompt, bias)
    out = run_engine(engine)[("eos", 0)]
    assert tokens_of(out) == [tokenizer.eos_token_id] and out[-1].finish_reason == "stop"
    assert_idle(engine)


def test_logprobs_and_prompt_logprobs_match_transformers(parts) -> None:
    _, _, hf = parts
    prompt = prompt_of(14, 8, hf.config.vocab_size)
    engine = make_engine(parts, max_num_batched_tokens=5)  # prompt logprobs across prefill chunks
    engine.add_request(
        "lp", prompt, SamplingParams(temperature=0, max_tokens=3, logprobs=2, prompt_logprobs=3)
    )
    out = run_engine(engine)[("lp", 0)]
    tokens = tokens_of(out)
    with torch.no_grad():
        ref = torch.log_softmax(hf(torch.tensor([prompt + tokens])).logits[0], dim=-1)  # [L, V]
    prompt_lps = out[0].prompt_logprobs
    assert prompt_lps[0] is None and len(prompt_lps) == len(prompt)
    for pos, entry in enumerate(prompt_lps[1:], start=1):
        assert entry.token_id == prompt[pos]
        assert abs(entry.logprob - ref[pos - 1, prompt[pos]].item()) < 1e-4
        assert [t for t, _ in entry.top] == ref[pos - 1].topk(3).indices.tolist()
    lps = [lp for d in out for lp in d.logprobs]
    for i, entry in enumerate(lps):
        row = ref[len(prompt) - 1 + i]
        assert entry.token_id == tokens[i] and abs(entry.logprob - row[tokens[i]].item()) < 1e-4
        assert [t for t, _ in entry.top] == row.topk(2).indices.tolist()


def test_abort_mid_generation_frees_blocks(parts) -> None:
    engine = make_engine(parts)
    vocab = parts[2].config.vocab_size
    for i in range(4):
        engine.add_request(f"a{i}", prompt_of(30, i, vocab), SamplingParams(max_tokens=50, ignore_eos=True))
    for _ in range(3):
        engine.step()
    assert engine.blocks.num_used_blocks > 0
    for i in range(4):
        engine.abort(f"a{i}")
    assert_idle(engine)


def test_failed_step_fails_its_requests_and_engine_recovers(parts, monkeypatch) -> None:
    engine = make_engine(parts)
    vocab = parts[2].config.vocab_size
    engine.add_request("doomed", prompt_of(12, 1, vocab), SamplingParams(max_tokens=5))
    original = engine.runner.execute
    monkeypatch.setattr(engine.runner, "execute", lambda step: (_ for _ in ()).throw(RuntimeError("boom")))
    outputs = engine.step()
    assert [o.error for o in outputs] == ["RuntimeError: boom"] and outputs[0].finish_reason == "error"
    assert_idle(engine)
    monkeypatch.setattr(engine.runner, "execute", original)
    engine.add_request("fine", prompt_of(12, 1, vocab), SamplingParams(max_tokens=5, ignore_eos=True))
    assert len(tokens_of(run_engine(engine)[("fine", 0)])) == 5


def test_detokenizer_failure_fails_only_that_request(parts, monkeypatch) -> None:
    engine = make_engine(parts)
    vocab = parts[2].config.vocab_size
    engine.add_request("ok", prompt_of(8, 2, vocab), SamplingParams(max_tokens=4, ignore_eos=True))
    engine.add_request("bad", prompt_of(8, 3, vocab), SamplingParams(max_tokens=4, ignore_eos=True))
    monkeypatch.setattr(
        engine.outputs.detokenizer_of(("bad", 0)), "add_tokens",
        lambda ids: (_ for _ in ()).throw(ValueError("bad bytes")),
    )
    outputs = run_engine(engine)
    assert outputs[("bad", 0)][-1].error == "ValueError: bad bytes"
    assert len(tokens_of(outputs[("ok", 0)])) == 4 and outputs[("ok", 0)][-1].finish_reason == "length"
    assert_idle(engine)


def test_requests_that_cannot_fit_are_rejected(parts) -> None:
    engine = make_engine(parts)
    with pytest.raises(RequestRejected) as info:
        engine.add_request("long", list(range(3, 190)), SamplingParams(max_tokens=20))
    assert info.value.code == "context_length_exceeded" and "200" in str(info.value)
    with pytest.raises(RequestRejected, match="empty"):
        engine.add_request("empty", [], SamplingParams())
    with pytest.raises(RequestRejected, match="token ids"):
        engine.add_request("oov", [10**6], SamplingParams())
    with pytest.raises(ValueError, match="fewer than max_model_len"):
        make_engine(parts, num_kv_blocks=10, max_model_len=100)
    assert_idle(engine)
