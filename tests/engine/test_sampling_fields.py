"""min_tokens, allowed_token_ids, bad_words, include_stop_str_in_output and stop_reason in the sampler and engine."""

from __future__ import annotations

import pytest
import torch

from model.loader import load_model
from model.tokenizer import Tokenizer
from server.engine.config import EngineConfig
from server.engine.llm_engine import LLMEngine
from server.engine.logit_masks import apply_token_masks, bad_words_token_ids
from server.engine.sampler import Sampler, SamplingRow
from server.engine.sampling_params import SamplingParams, SamplingParamsError
from tests.support.engine import hf_greedy, run_engine, tokens_of


@pytest.fixture(scope="module")
def parts(engine_checkpoint):
    directory, hf = engine_checkpoint
    return load_model(directory, dtype="float32"), Tokenizer.from_dir(directory), hf


def make_engine(parts) -> LLMEngine:
    model, tokenizer, _ = parts
    config = EngineConfig(model="unused", block_size=4, num_kv_blocks=256, max_model_len=200)
    return LLMEngine(config, model, tokenizer)


def run_one(engine: LLMEngine, prompt: list[int], params: SamplingParams):
    engine.add_request("r", prompt, params)
    deltas = run_engine(engine)[("r", 0)]
    return tokens_of(deltas), "".join(d.new_text for d in deltas), deltas[-1]


# ---- sampler masks ----


def test_masks_are_one_batched_fill() -> None:
    logits = torch.zeros(3, 10)  # [B, V]
    rows = [
        SamplingRow(SamplingParams(allowed_token_ids=[2, 7]), [1], []),
        SamplingRow(SamplingParams(min_tokens=2, max_tokens=4), [1], [5], min_tokens_blocked=(0, 9)),
        SamplingRow(SamplingParams(), [1], [4, 5], bad_words=((3,), (5, 6), (4, 8))),
    ]
    masked = apply_token_masks(logits, rows)
    assert torch.isfinite(masked[0]).nonzero().flatten().tolist() == [2, 7]
    assert torch.isinf(masked[1]).nonzero().flatten().tolist() == [0, 9]
    assert torch.isinf(masked[2]).nonzero().flatten().tolist() == [3, 6]  # (4, 8) does not end the output
    done = SamplingRow(SamplingParams(min_tokens=1), [1], [5], min_tokens_blocked=(0,))
    assert apply_token_masks(logits[:1], [done]) is logits[:1] or torch.equal(apply_token_masks(logits[:1], [done]),
                                                                             logits[:1])


def test_masks_beat_logit_bias_and_greedy_choice() -> None:
    logits = torch.tensor([[0.0, 5.0, 1.0, 2.0]])  # [1, V]
    params = SamplingParams(temperature=0, allowed_token_ids=[2, 3], logit_bias={1: 100.0})
    assert Sampler()(logits, [SamplingRow(params, [0], [])]).token_ids == [3]
    sampled = SamplingParams(temperature=1.0, seed=3, allowed_token_ids=[0, 2])
    draws = {Sampler()(logits, [SamplingRow(sampled, [0], [])]).token_ids[0] for _ in range(20)}
    assert draws <= {0, 2}


def test_validation_names_the_field() -> None:
    for kwargs, field in [({"min_tokens": -1}, "min_tokens"), ({"min_tokens": 5, "max_tokens": 4}, "min_tokens"),
                          ({"allowed_token_ids": []}, "allowed_token_ids"),
                          ({"allowed_token_ids": [-1]}, "allowed_token_ids"), ({"bad_words": [" "]}, "bad_words"),
                          ({"include_stop_str_in_output": 1}, "include_stop_str_in_output")]:
        with pytest.raises(SamplingParamsError) as info:
            SamplingParams(**kwargs)
        assert info.value.param == field
    with pytest.raises(SamplingParamsError) as info:
        SamplingParams(allowed_token_ids=[10]).validate_vocab(10)
    assert info.value.param == "allowed_token_ids"


# ---- engine ----


def test_min_tokens_holds_back_forced_eos(parts) -> None:
    _, tokenizer, _ = parts
    eos = tokenizer.eos_token_id
    engine = make_engine(parts)
    prompt = tokenizer.encode("def main():")
    forced = SamplingParams(temperature=0, max_tokens=20, logit_bias={eos: 100.0})
    assert run_one(engine, prompt, forced)[0] == [eos]
    tokens, _, last = run_one(engine, prompt, forced.with_overrides(min_tokens=5))
    assert len(tokens) == 6 and tokens[-1] == eos and eos not in tokens[:5]
    assert last.finish_reason == "stop" and last.stop_reason is None
    stop_id = tokens[0]
    tokens, _, last = run_one(engine, prompt, SamplingParams(temperature=0, max_tokens=20, min_tokens=3,
                                                             stop_token_ids=[stop_id], logit_bias={stop_id: 100.0}))
    assert tokens[:3].count(stop_id) == 0 and tokens[3] == stop_id and last.stop_reason == stop_id


def test_allowed_token_ids_and_bad_words_keep_greedy_order(parts) -> None:
    _, tokenizer, hf = parts
    engine = make_engine(parts)
    prompt = tokenizer.encode("import os")
    reference, trusted = hf_greedy(hf, prompt, 12)
    assert trusted >= 6
    greedy = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    assert run_one(engine, prompt, greedy)[0] == reference[:6]
    allowed = sorted(set(reference[:6]))[:3] + [5]
    tokens, _, _ = run_one(engine, prompt, greedy.with_overrides(allowed_token_ids=allowed))
    assert set(tokens) <= set(allowed)
    # a greedy token that is a word of its own: banning the word bans exactly that token from then on
    j, word = next((j, w) for j, t in enumerate(reference[:6])
                   if (w := tokenizer.decode([t]).strip()) and (t,) in bad_words_token_ids(tokenizer, [w]))
    tokens, _, _ = run_one(engine, prompt, greedy.with_overrides(bad_words=[word]))
    assert tokens[:j] == reference[:j] and reference[j] not in tokens
    pair = tuple(reference[:2])
    tokens, _, _ = run_one(engine, prompt, greedy.with_overrides(bad_words=[tokenizer.decode(list(pair))]))
    banned = bad_words_token_ids(tokenizer, [tokenizer.decode(list(pair))])
    for sequence in banned:
        assert not any(tuple(tokens[i : i + len(sequence)]) == sequence for i in range(len(tokens)))


def test_stop_string_reason_and_include_in_output(parts) -> None:
    _, tokenizer, hf = parts
    engine = make_engine(parts)
    prompt = tokenizer.encode("class Foo:")
    _, text, _ = run_one(engine, prompt, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))
    stop = text[3:5]
    cut = text.find(stop)
    _, cut_text, last = run_one(engine, prompt, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True,
                                                               stop=[stop]))
    assert (cut_text, last.finish_reason, last.stop_reason) == (text[:cut], "stop", stop)
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, stop=[stop], include_stop_str_in_output=True)
    assert run_one(engine, prompt, params)[1] == text[: cut + len(stop)]
