"""Validation and normalisation of SamplingParams."""

from __future__ import annotations

import dataclasses
import math

import pytest

from server.engine.sampling_params import SamplingParams, SamplingParamsError


def test_defaults_are_valid_and_match_openai() -> None:
    params = SamplingParams()
    assert (params.n, params.max_tokens, params.temperature, params.top_p, params.top_k) == (
        1,
        16,
        1.0,
        1.0,
        0,
    )
    assert params.min_p == 0.0 and params.repetition_penalty == 1.0
    assert params.logit_bias == () and params.stop == () and params.stop_token_ids == ()
    assert params.seed is None and params.logprobs is None and params.prompt_logprobs is None
    assert params.skip_special_tokens and not params.ignore_eos
    assert not params.greedy and not params.uses_penalties


INVALID = [
    ({"n": 0}, "n"),
    ({"n": 129}, "n"),
    ({"n": 1.5}, "n"),
    ({"n": True}, "n"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": "16"}, "max_tokens"),
    ({"temperature": -0.1}, "temperature"),
    ({"temperature": 2.01}, "temperature"),
    ({"temperature": math.nan}, "temperature"),
    ({"temperature": math.inf}, "temperature"),
    ({"temperature": "hot"}, "temperature"),
    ({"top_p": 0.0}, "top_p"),
    ({"top_p": 1.01}, "top_p"),
    ({"top_p": math.nan}, "top_p"),
    ({"top_k": -2}, "top_k"),
    ({"top_k": 2.0}, "top_k"),
    ({"min_p": -0.01}, "min_p"),
    ({"min_p": 1.01}, "min_p"),
    ({"min_p": math.nan}, "min_p"),
    ({"presence_penalty": 2.5}, "presence_penalty"),
    ({"presence_penalty": -2.5}, "presence_penalty"),
    ({"presence_penalty": -math.inf}, "presence_penalty"),
    ({"frequency_penalty": 2.01}, "frequency_penalty"),
    ({"frequency_penalty": math.nan}, "frequency_penalty"),
    ({"repetition_penalty": 0.0}, "repetition_penalty"),
    ({"repetition_penalty": -1.0}, "repetition_penalty"),
    ({"repetition_penalty": math.inf}, "repetition_penalty"),
    ({"repetition_penalty": math.nan}, "repetition_penalty"),
    ({"logit_bias": {5: 100.5}}, "logit_bias"),
    ({"logit_bias": {5: -101}}, "logit_bias"),
    ({"logit_bias": {5: math.nan}}, "logit_bias"),
    ({"logit_bias": {-1: 1.0}}, "logit_bias"),
    ({"logit_bias": {"abc": 1.0}}, "logit_bias"),
    ({"logit_bias": [(1, 2, 3)]}, "logit_bias"),
    ({"logit_bias": "5"}, "logit_bias"),
    ({"seed": 1.5}, "seed"),
    ({"seed": 2**64}, "seed"),
    ({"stop": [""]}, "stop"),
    ({"stop": ""}, "stop"),
    ({"stop": [1]}, "stop"),
    ({"stop": [f"s{i}" for i in range(17)]}, "stop"),
    ({"stop_token_ids": [-1]}, "stop_token_ids"),
    ({"stop_token_ids": [1.0]}, "stop_token_ids"),
    ({"stop_token_ids": 3}, "stop_token_ids"),
    ({"ignore_eos": 1}, "ignore_eos"),
    ({"skip_special_tokens": None}, "skip_special_tokens"),
    ({"logprobs": -1}, "logprobs"),
    ({"logprobs": 21}, "logprobs"),
    ({"prompt_logprobs": -1}, "prompt_logprobs"),
    ({"prompt_logprobs": 21}, "prompt_logprobs"),
]


@pytest.mark.parametrize(("kwargs", "param"), INVALID, ids=[f"{p}-{i}" for i, (_, p) in enumerate(INVALID)])
def test_invalid_value_names_the_param(kwargs: dict, param: str) -> None:
    with pytest.raises(SamplingParamsError) as info:
        SamplingParams(**kwargs)
    assert info.value.param == param
    assert isinstance(info.value, ValueError)
    assert param in info.value.message


@pytest.mark.parametrize(
    "kwargs",
    [
        {"n": 128, "temperature": 0.0},
        {"temperature": 2.0, "top_p": 1e-6, "top_k": -1},
        {"top_k": 1, "min_p": 1.0},
        {"presence_penalty": -2, "frequency_penalty": 2, "repetition_penalty": 1.3},
        {"logit_bias": {0: -100, 7: 100}},
        {"logprobs": 0, "prompt_logprobs": 20},
        {"stop": [f"s{i}" for i in range(16)]},
        {"seed": -1},
    ],
)
def test_boundary_values_are_accepted(kwargs: dict) -> None:
    SamplingParams(**kwargs)


def test_containers_are_normalised_to_tuples_and_hashable() -> None:
    params = SamplingParams(stop=["a", "bc"], stop_token_ids=[2, 7], logit_bias={"9": 1, 3: -2.5})
    assert params.stop == ("a", "bc")
    assert params.stop_token_ids == (2, 7)
    assert params.logit_bias == ((3, -2.5), (9, 1.0))
    assert all(isinstance(v, float) for _, v in params.logit_bias)
    same = SamplingParams(stop=("a", "bc"), stop_token_ids=(2, 7), logit_bias=[(9, 1.0), (3, -2.5)])
    assert params == same and hash(params) == hash(same)
    assert {params: 1}[same] == 1


def test_single_stop_string_and_numbers_are_normalised() -> None:
    params = SamplingParams(stop="###", temperature=1, top_p=1, presence_penalty=1)
    assert params.stop == ("###",)
    assert isinstance(params.temperature, float) and isinstance(params.top_p, float)
    assert isinstance(params.presence_penalty, float)


def test_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        SamplingParams().temperature = 0.5  # type: ignore[misc]


@pytest.mark.parametrize(
    ("kwargs", "greedy"),
    [
        ({"temperature": 0.0}, True),
        ({"temperature": 1e-7}, True),
        ({"top_k": 1}, True),
        ({"temperature": 0.7, "top_k": 1}, True),
        ({"temperature": 0.01}, False),
        ({"top_k": -1}, False),
        ({"top_k": 2}, False),
    ],
)
def test_greedy(kwargs: dict, greedy: bool) -> None:
    assert SamplingParams(**kwargs).greedy is greedy


def test_uses_penalties() -> None:
    assert SamplingParams(repetition_penalty=1.1).uses_penalties
    assert SamplingParams(frequency_penalty=-0.1).uses_penalties
    assert SamplingParams(presence_penalty=0.1).uses_penalties


def test_with_overrides_replaces_and_revalidates() -> None:
    base = SamplingParams(temperature=0.5, stop=["x"])
    changed = base.with_overrides(max_tokens=3, stop=["y", "z"])
    assert changed.max_tokens == 3 and changed.stop == ("y", "z") and changed.temperature == 0.5
    assert base.max_tokens == 16
    with pytest.raises(SamplingParamsError) as info:
        base.with_overrides(top_p=0)
    assert info.value.param == "top_p"


def test_validate_vocab() -> None:
    SamplingParams(logit_bias={99: 1.0}, stop_token_ids=[99]).validate_vocab(100)
    with pytest.raises(SamplingParamsError) as info:
        SamplingParams(logit_bias={100: 1.0}).validate_vocab(100)
    assert info.value.param == "logit_bias"
    with pytest.raises(SamplingParamsError) as info:
        SamplingParams(stop_token_ids=[5, 100]).validate_vocab(100)
    assert info.value.param == "stop_token_ids"
