"""The batched sampler: greedy, bias, logprobs, penalties, filters and seeded reproducibility."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch

from server.engine.sampler import (
    Sampler,
    SamplerOutput,
    SamplingRow,
    apply_penalties,
    make_generator,
)
from server.engine.sampling_params import SamplingParams

GREEDY = SamplingParams(temperature=0.0)
# Six tokens with known probabilities, deliberately not in sorted order.
PROBS = {0: 0.12, 1: 0.30, 2: 0.05, 3: 0.25, 4: 0.08, 5: 0.20}


def row(
    params: SamplingParams,
    output_ids: list[int] | None = None,
    prompt_ids: list[int] | None = None,
    generator: torch.Generator | None = None,
) -> SamplingRow:
    return SamplingRow(
        params=params, prompt_ids=prompt_ids or [], output_ids=output_ids or [], generator=generator
    )


def random_logits(batch: int, vocab: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, vocab, generator=torch.Generator().manual_seed(seed)) * 3  # [B, V]


def known_logits() -> torch.Tensor:
    return torch.tensor(
        [math.log(PROBS[t]) + 1.7 for t in range(len(PROBS))]
    )  # [V], shifted: softmax-invariant


# ---------------------------------------------------------------- greedy, bias, logprobs


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_greedy_is_argmax(dtype: torch.dtype) -> None:
    logits = random_logits(5, 40).to(dtype)  # [B, V]
    rows = [
        row(GREEDY),
        row(SamplingParams(top_k=1)),
        row(GREEDY),
        row(SamplingParams(temperature=0.0, seed=3)),
        row(GREEDY),
    ]
    out = Sampler()(logits, rows)
    assert out.token_ids == logits.float().argmax(dim=-1).tolist()
    assert out.logprobs is None and out.top_logprobs is None


def test_input_logits_are_not_modified() -> None:
    logits = random_logits(2, 16)
    before = logits.clone()
    params = SamplingParams(
        temperature=0.7,
        top_k=3,
        top_p=0.8,
        min_p=0.1,
        repetition_penalty=1.5,
        frequency_penalty=0.5,
        presence_penalty=0.5,
        logit_bias={3: 5.0},
    )
    Sampler()(
        logits, [row(params, [1, 2, 3], [4, 5]), row(GREEDY.with_overrides(repetition_penalty=2.0), [3])]
    )
    assert torch.equal(logits, before)


@pytest.mark.parametrize("params", [GREEDY, SamplingParams(temperature=1.5, top_p=0.9, seed=1)])
def test_logit_bias_forces_a_token(params: SamplingParams) -> None:
    logits = random_logits(3, 30)
    forced = int(logits[1].argmin())
    rows = [
        row(GREEDY),
        row(params.with_overrides(logit_bias={forced: 100.0}), generator=make_generator(1, "cpu")),
        row(GREEDY),
    ]
    out = Sampler()(logits, rows)
    assert out.token_ids[1] == forced
    assert out.token_ids[0] == int(logits[0].argmax()) and out.token_ids[2] == int(logits[2].argmax())


def test_negative_logit_bias_bans_the_argmax() -> None:
    logits = random_logits(1, 30)
    top2 = logits[0].topk(2).indices.tolist()
    out = Sampler()(logits, [row(GREEDY.with_overrides(logit_bias={top2[0]: -100.0}))])
    assert out.token_ids == [top2[1]]


def test_logprobs_match_log_softmax_and_top_n_is_sorted() -> None:
    logits = random_logits(4, 50, seed=7)
    rows = [
        row(GREEDY.with_overrides(logprobs=5)),
        row(GREEDY),
        row(GREEDY.with_overrides(logprobs=0)),
        row(GREEDY.with_overrides(logprobs=20)),
    ]
    out = Sampler()(logits, rows)
    reference = torch.log_softmax(logits.double(), dim=-1)  # [B, V]
    assert isinstance(out, SamplerOutput) and out.logprobs is not None and out.top_logprobs is not None
    for i, token in enumerate(out.token_ids):
        assert out.logprobs[i] == pytest.approx(reference[i, token].item(), abs=1e-5)
    assert [len(top) for top in out.top_logprobs] == [5, 0, 0, 20]
    for i, top in enumerate(out.top_logprobs):
        expected = reference[i].topk(len(top)).indices.tolist() if top else []
        assert [t for t, _ in top] == expected
        assert [lp for _, lp in top] == sorted((lp for _, lp in top), reverse=True)
        for token, lp in top:
            assert isinstance(token, int)
            assert lp == pytest.approx(reference[i, token].item(), abs=1e-5)
    assert out.top_logprobs[0][0][0] == out.token_ids[0]  # greedy: the chosen token is the top one


def test_chosen_logprob_is_from_the_raw_distribution() -> None:
    logits = random_logits(2, 20, seed=3)
    params = SamplingParams(temperature=0.3, top_k=4, logprobs=2, repetition_penalty=1.8, logit_bias={1: 2.0})
    generators = [make_generator(11, "cpu"), make_generator(12, "cpu")]
    out = Sampler()(logits, [row(params, [1, 2], generator=g) for g in generators])
    reference = torch.log_softmax(logits, dim=-1)  # [B, V]
    assert out.logprobs is not None and out.top_logprobs is not None
    for i, token in enumerate(out.token_ids):
        assert out.logprobs[i] == pytest.approx(reference[i, token].item(), abs=1e-6)
        assert out.top_logprobs[i][0][1] == pytest.approx(reference[i].max().item(), abs=1e-6)


def test_rows_must_match_logits() -> None:
    with pytest.raises(ValueError):
        Sampler()(random_logits(2, 8), [row(GREEDY)])


# ---------------------------------------------------------------- penalties


def test_penalties_match_hand_computation() -> None:
    logits = torch.tensor(
        [
            [1.0, -2.0, 3.0, 0.5, -0.5, 2.0, -1.0, 0.0],
            [0.2, 1.5, -3.0, 2.5, 1.0, -0.7, 0.3, 4.0],
        ]
    )  # [2, 8]
    rows = [
        row(
            SamplingParams(repetition_penalty=2.0, frequency_penalty=0.1),
            output_ids=[1, 6, 6],
            prompt_ids=[0, 2],
        ),
        row(
            SamplingParams(frequency_penalty=0.5, presence_penalty=0.25),
            output_ids=[2, 2, 5, 7, 2],
            prompt_ids=[3],
        ),
    ]
    expected = logits.clone()
    # Row 0: tokens 0, 2 (prompt) and 1, 6 (output) get the repetition penalty; then frequency on outputs.
    expected[0, 0] = 1.0 / 2.0
    expected[0, 2] = 3.0 / 2.0
    expected[0, 1] = -2.0 * 2.0 - 0.1 * 1
    expected[0, 6] = -1.0 * 2.0 - 0.1 * 2
    # Row 1: outputs only (the prompt token 3 is untouched); counts 2 -> 3, 5 -> 1, 7 -> 1.
    expected[1, 2] = -3.0 - 0.5 * 3 - 0.25
    expected[1, 5] = -0.7 - 0.5 * 1 - 0.25
    expected[1, 7] = 4.0 - 0.5 * 1 - 0.25
    torch.testing.assert_close(apply_penalties(logits, rows), expected)


def test_no_penalties_returns_the_same_tensor() -> None:
    logits = random_logits(2, 8)
    assert apply_penalties(logits, [row(GREEDY, [1, 2]), row(SamplingParams(), [3])]) is logits


def test_penalty_changes_greedy_choice() -> None:
    logits = torch.tensor([[0.0, 3.0, 2.9, -1.0], [0.0, 3.0, 2.9, -1.0]])  # [2, 4]
    rows = [row(GREEDY, output_ids=[1]), row(GREEDY.with_overrides(presence_penalty=0.5), output_ids=[1])]
    assert Sampler()(logits, rows).token_ids == [1, 2]


# ---------------------------------------------------------------- filters (statistical)


def draw(params: SamplingParams, draws: int = 2000, seed: int = 1234) -> Counter[int]:
    """Sample `draws` tokens from known_logits() in one batch whose rows share one seeded generator."""
    generator = make_generator(seed, "cpu")
    logits = known_logits().expand(draws, -1)  # [N, V]
    rows = [row(params, generator=generator) for _ in range(draws)]
    return Counter(Sampler()(logits, rows).token_ids)


def assert_frequencies(counts: Counter[int], allowed: dict[int, float], tol: float = 0.04) -> None:
    total = sum(counts.values())
    assert set(counts) <= set(allowed), (
        f"sampled outside the allowed set: {sorted(set(counts) - set(allowed))}"
    )
    mass = sum(allowed.values())
    for token, p in allowed.items():
        assert abs(counts[token] / total - p / mass) < tol, (token, counts[token] / total, p / mass)


def test_plain_sampling_follows_the_softmax() -> None:
    assert_frequencies(draw(SamplingParams()), PROBS)


def test_temperature_sharpens() -> None:
    assert_frequencies(draw(SamplingParams(temperature=0.5)), {t: p**2 for t, p in PROBS.items()})


def test_top_k() -> None:
    assert_frequencies(draw(SamplingParams(top_k=3)), {1: 0.30, 3: 0.25, 5: 0.20})


def test_top_k_disabled_by_minus_one_or_large() -> None:
    assert_frequencies(draw(SamplingParams(top_k=-1)), PROBS)
    assert_frequencies(draw(SamplingParams(top_k=100)), PROBS)


def test_top_p() -> None:
    # Sorted: 0.30, 0.25, 0.20, ... cumulative 0.30, 0.55, 0.75 -> top_p 0.7 keeps three tokens.
    assert_frequencies(draw(SamplingParams(top_p=0.7)), {1: 0.30, 3: 0.25, 5: 0.20})
    assert_frequencies(draw(SamplingParams(top_p=0.5)), {1: 0.30, 3: 0.25})


def test_tiny_top_p_keeps_the_top_token() -> None:
    assert draw(SamplingParams(top_p=1e-6), draws=200) == Counter({1: 200})


def test_min_p() -> None:
    # Threshold 0.3 * 0.30 = 0.09 drops tokens 2 (0.05) and 4 (0.08).
    assert_frequencies(draw(SamplingParams(min_p=0.3)), {0: 0.12, 1: 0.30, 3: 0.25, 5: 0.20})


def test_filters_compose_in_order() -> None:
    # top_k=4 keeps {1, 3, 5, 0}; renormalised 0.30/0.87 ... cumulative 0.345, 0.632, 0.862 -> top_p 0.8 keeps
    # {1, 3, 5}; min_p 0.7 then drops below 0.7 * 0.30 = 0.21 of the same scale, i.e. token 5 (0.20).
    assert_frequencies(draw(SamplingParams(top_k=4, top_p=0.8, min_p=0.7)), {1: 0.30, 3: 0.25})


def test_mixed_batch_applies_each_rows_filters() -> None:
    logits = known_logits().expand(600, -1)  # [N, V]
    kinds = [SamplingParams(top_k=2), GREEDY, SamplingParams(min_p=0.5), SamplingParams(top_p=0.2)]
    rows = [row(kinds[i % 4]) for i in range(600)]
    tokens = Sampler()(logits, rows).token_ids
    allowed = [{1, 3}, {1}, {1, 3, 5}, {1}]
    for i, token in enumerate(tokens):
        assert token in allowed[i % 4]


# ---------------------------------------------------------------- seeded reproducibility


TARGET = SamplingParams(temperature=0.9, top_p=0.95, seed=42)
VOCAB, STEPS = 64, 10


def step_logits(step: int) -> torch.Tensor:
    return random_logits(1, VOCAB, seed=100 + step)[0] * 0.3  # [V], flat enough for real randomness


def run_alone() -> list[int]:
    generator, sampler, tokens = make_generator(42, "cpu"), Sampler(), []
    for step in range(STEPS):
        out = sampler(step_logits(step).unsqueeze(0), [row(TARGET, list(tokens), [1, 2], generator)])
        tokens += out.token_ids
    return tokens


def run_batched() -> list[int]:
    target_gen, other_gen = make_generator(42, "cpu"), make_generator(7, "cpu")
    sampler, tokens = Sampler(), []
    for step in range(STEPS):
        others = [
            row(SamplingParams(seed=7, top_k=5), generator=other_gen),
            row(SamplingParams(temperature=1.3)),
            row(GREEDY.with_overrides(logprobs=3, frequency_penalty=1.0), [3, 3]),
            row(SamplingParams(min_p=0.2, repetition_penalty=1.2), [5], [6]),
        ][: 1 + step % 4]
        position = step % (len(others) + 1)
        rows = others[:position] + [row(TARGET, list(tokens), [1, 2], target_gen)] + others[position:]
        logits = random_logits(len(rows), VOCAB, seed=step)  # [B, V]
        logits[position] = step_logits(step)
        out = sampler(logits, rows)
        tokens.append(out.token_ids[position])
    return tokens


def test_seeded_row_is_independent_of_the_batch() -> None:
    alone = run_alone()
    assert alone == run_alone()
    assert len(set(alone)) > 3  # genuinely random, not a constant
    assert run_batched() == alone


def test_different_seed_gives_different_tokens() -> None:
    generator = make_generator(43, "cpu")
    tokens = []
    for step in range(STEPS):
        tokens += Sampler()(
            step_logits(step).unsqueeze(0), [row(TARGET, list(tokens), [1, 2], generator)]
        ).token_ids
    assert tokens != run_alone()


def test_each_step_draws_one_vector_per_seeded_row() -> None:
    generator = make_generator(5, "cpu")
    Sampler()(
        random_logits(3, VOCAB),
        [row(SamplingParams()), row(SamplingParams(seed=5), generator=generator), row(GREEDY)],
    )
    reference = make_generator(5, "cpu")
    torch.empty(VOCAB).exponential_(generator=reference)
    assert torch.equal(generator.get_state(), reference.get_state())


def test_greedy_row_does_not_consume_its_generator() -> None:
    generator = make_generator(5, "cpu")
    Sampler()(random_logits(1, VOCAB), [row(SamplingParams(seed=5, temperature=0.0), generator=generator)])
    assert torch.equal(generator.get_state(), make_generator(5, "cpu").get_state())
