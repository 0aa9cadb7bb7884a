"""Verifying proposed tokens with crafted logits: greedy acceptance, rejection sampling against a known target
distribution, per-position sampling state, seeded draws as plain steps would make them, grammar walks."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch
import xgrammar as xgr

from model.config import JetMoeModelConfig
from server.engine.request import Request
from server.engine.sampler import Sampler, SamplingRow, apply_top_k_top_p, make_generator
from server.engine.sampling_params import SamplingParams
from server.engine.scheduler import ScheduledRequest, SchedulerOutput
from server.engine.spec.verify import accepted_length, grammar_masks
from server.engine.structured.matcher import GrammarState
from server.engine.worker.runner import ModelRunner
from tests.support.checkpoints import random_model
from tests.support.chi_square import goodness_of_fit

VOCAB = 16
EOS = 2
ALPHABET = ["<unk>", "<s>", "</s>", "a", "b", "c", "d", "e", "f", "g", "h", "i", "j", "k", "l", "m"]


@pytest.fixture
def runner() -> ModelRunner:
    config = JetMoeModelConfig(vocab_size=VOCAB, hidden_size=16, num_layers=1, num_kv_heads=1, head_dim=8,
                               intermediate_size=16, num_experts=2, top_k=1)
    return ModelRunner(random_model(config, torch.device("cpu"), torch.float32), num_blocks=8, block_size=4)


def decoding(params: SamplingParams, output: tuple[int, ...] = (), seed: int | None = None,
             rid: str = "r") -> Request:
    """A request in the decode state (every known token but the last computed)."""
    generator = make_generator(seed, "cpu") if seed is not None else None
    request = Request(rid, 0, [1, 3, 4], params, generator)
    request.output_ids = list(output)
    request.num_computed_tokens = request.num_tokens - 1
    return request


def verify(runner: ModelRunner, items: list[tuple[Request, tuple[int, ...]]], logits: torch.Tensor):
    """Run one step over ``items`` (request, proposal) whose model output is ``logits`` (``[N, V]``)."""
    runner._forward = lambda inputs: logits  # type: ignore[method-assign]
    step = SchedulerOutput(tuple(ScheduledRequest(r, 1, draft) for r, draft in items), ())
    return runner.execute(step)


def peaked(*tokens: int, margin: float = 4.0) -> torch.Tensor:
    """One logits row per token with that token on top by ``margin``: ``[len(tokens), V]``."""
    logits = torch.zeros(len(tokens), VOCAB)  # [R, V]
    for row, token in enumerate(tokens):
        logits[row, token] = margin
    return logits


GREEDY = SamplingParams(temperature=0, max_tokens=50)


@pytest.mark.parametrize(("argmaxes", "kept"), [
    ((5, 6, 7, 9), [5, 6, 7, 9]),  # all accepted, plus the model's next token
    ((5, 6, 8, 9), [5, 6, 8]),  # the third differs: it replaces it
    ((4, 6, 7, 9), [4]),  # nothing accepted: the one token a plain step gives
])
def test_greedy_keeps_the_agreeing_prefix_and_the_next_argmax(runner, argmaxes, kept) -> None:
    request = decoding(GREEDY)
    assert verify(runner, [(request, (5, 6, 7))], peaked(*argmaxes))[request.key].token_ids == kept
    assert accepted_length(argmaxes, (5, 6, 7)) == len(kept) - 1


def test_requests_with_and_without_proposals_share_a_step(runner) -> None:
    a, b, c = decoding(GREEDY, rid="a"), decoding(GREEDY, rid="b"), decoding(GREEDY, rid="c")
    out = verify(runner, [(a, (5, 6)), (b, ()), (c, (9,))], peaked(5, 7, 8, 11, 9, 12))
    assert [out[r.key].token_ids for r in (a, b, c)] == [[5, 7], [11], [9, 12]]


def test_logprobs_are_the_raw_distribution_of_each_kept_token(runner) -> None:
    logits = torch.randn(3, VOCAB, generator=torch.Generator().manual_seed(0))  # [3, V]
    logits[0, 5] = logits[1, 6] = logits[2, 9] = 10.0
    request = decoding(SamplingParams(temperature=0, logprobs=2, max_tokens=50))
    out = verify(runner, [(request, (5, 6))], logits)[request.key]
    expected = torch.log_softmax(logits, dim=-1)  # [3, V]
    assert out.token_ids == [5, 6, 9]
    assert out.logprobs == pytest.approx([expected[0, 5].item(), expected[1, 6].item(), expected[2, 9].item()])
    assert out.top_logprobs is not None and [top[0][0] for top in out.top_logprobs] == [5, 6, 9]


def test_each_row_sees_the_output_as_it_would_be_at_its_position(runner) -> None:
    # Presence penalty: the token proposed first is penalised at the next position, as a plain step would.
    flat = torch.zeros(3, VOCAB)
    flat[:, 5], flat[:, 6] = 3.0, 2.0
    penalised = decoding(SamplingParams(temperature=0, presence_penalty=2.0, max_tokens=50))
    assert verify(runner, [(penalised, (5, 5))], flat)[penalised.key].token_ids == [5, 6]
    # min_tokens: EOS is masked at the first two positions only.
    eos_first = torch.zeros(3, VOCAB)
    eos_first[:, EOS], eos_first[0, 7], eos_first[1, 8] = 5.0, 1.0, 1.0
    early = decoding(SamplingParams(temperature=0, min_tokens=2, max_tokens=50))
    early.min_tokens_blocked = (EOS,)
    assert verify(runner, [(early, (7, 8))], eos_first)[early.key].token_ids == [7, 8, EOS]
    # bad_words (7, 8): after the proposed 7, 8 is banned.
    banned = decoding(GREEDY)
    banned.bad_words = ((7, 8),)
    assert verify(runner, [(banned, (7, 8))], peaked(7, 8, 9) + peaked(3, 9, 3) * 0.5)[banned.key].token_ids == [7, 9]


def target_probs(logits: torch.Tensor, params: SamplingParams) -> list[float]:
    """The sampler's target distribution of one row: temperature, top-k, top-p."""
    filtered = apply_top_k_top_p(logits[None] / params.temperature, [params])  # [1, V]
    return filtered.softmax(dim=-1)[0].tolist()


@pytest.mark.parametrize("params", [SamplingParams(temperature=1.0, max_tokens=50),
                                    SamplingParams(temperature=0.7, top_k=6, top_p=0.9, max_tokens=50)])
def test_rejection_sampling_keeps_the_target_distribution(runner, params) -> None:
    """4000 sequences propose (x0, x1): the first token follows p0 (x0 kept with probability p0(x0), the rest
    from the residual), the second follows p1 given x0 kept, the third p2 given both kept."""
    torch.manual_seed(1234)
    rows = torch.randn(3, VOCAB, generator=torch.Generator().manual_seed(3)) * 1.5  # [3, V]
    draft = (int(rows[0].argsort()[-2]), int(rows[1].argmax()))  # x0 is likely but not the likeliest
    p = [target_probs(rows[j], params) for j in range(3)]
    n = 4000
    requests = [decoding(params, rid=f"r{i}") for i in range(n)]
    out = verify(runner, [(r, draft) for r in requests], rows.repeat(n, 1))
    tokens = [out[r.key].token_ids for r in requests]
    first = Counter(t[0] for t in tokens)
    assert goodness_of_fit(first, dict(enumerate(p[0]))) > 1e-3
    kept = [t for t in tokens if t[0] == draft[0]]
    assert abs(len(kept) / n - p[0][draft[0]]) < 4 * math.sqrt(p[0][draft[0]] / n)
    residual = {i: (0.0 if i == draft[0] else q / (1 - p[0][draft[0]])) for i, q in enumerate(p[0])}
    assert goodness_of_fit(Counter(t[0] for t in tokens if t[0] != draft[0]), residual) > 1e-3
    assert goodness_of_fit(Counter(t[1] for t in kept), dict(enumerate(p[1]))) > 1e-3
    both = [t for t in kept if t[1] == draft[1]]
    assert all(len(t) == 3 for t in both) and all(len(t) == 2 for t in kept if t[1] != draft[1])
    assert goodness_of_fit(Counter(t[2] for t in both), dict(enumerate(p[2]))) > 1e-3


def test_seeded_verification_makes_the_draws_of_plain_steps(runner) -> None:
    """For 40 seeds: the kept tokens are those plain one-token steps give, and the generator ends where theirs
    does (the draws of rows past a rejection are given back)."""
    params = SamplingParams(temperature=1.0, seed=0, max_tokens=50)
    rows = torch.randn(4, VOCAB, generator=torch.Generator().manual_seed(5))  # [4, V]
    draft = tuple(int(rows[j].argmax()) for j in range(3))
    lengths = Counter()
    for seed in range(40):
        request = decoding(params, seed=seed)
        kept = verify(runner, [(request, draft)], rows)[request.key].token_ids
        lengths[len(kept)] += 1
        plain, generator = [], make_generator(seed, "cpu")
        for j in range(len(kept)):
            row = SamplingRow(params, request.prompt_ids, plain.copy(), generator)
            plain.append(Sampler()(rows[j : j + 1], [row]).token_ids[0])
        assert kept == plain, seed
        assert request.generator is not None and torch.equal(request.generator.get_state(), generator.get_state())
    assert len(lengths) > 1, lengths  # some proposals were cut short, some kept further


def tiny_grammar(pattern: str) -> GrammarState:
    info = xgr.TokenizerInfo(ALPHABET, stop_token_ids=[EOS])
    return GrammarState(xgr.GrammarCompiler(info).compile_regex(pattern))


def allowed(masks, row: int) -> set[int]:
    bitmask = xgr.allocate_token_bitmask(1, VOCAB)  # [1, W]
    masks[row].fill(bitmask, 0)
    probe = torch.zeros(1, VOCAB)  # [1, V]; forbidden tokens become -inf
    xgr.apply_token_bitmask_inplace(probe, bitmask)
    return {i for i in range(VOCAB) if probe[0, i] == 0}


def test_grammar_walks_the_proposal_and_ends_where_it_began() -> None:
    a, b, c = ALPHABET.index("a"), ALPHABET.index("b"), ALPHABET.index("c")
    grammar = tiny_grammar("ab(ab)*")
    masks = grammar_masks(grammar, (a, b, c, a), VOCAB)
    assert allowed(masks, 0) == {a} and allowed(masks, 1) == {b} and allowed(masks, 2) == {a, EOS}
    assert allowed(masks, 3) == allowed(masks, 4) == {a, EOS}  # after the refused c: unused copies
    assert grammar.num_accepted == 0 and grammar.accept(a) and not grammar.accept(a)


def test_a_constrained_request_keeps_only_what_its_grammar_allows(runner) -> None:
    a, b, c = ALPHABET.index("a"), ALPHABET.index("b"), ALPHABET.index("c")
    request = decoding(GREEDY)
    request.grammar = tiny_grammar("ab(ab)*")
    logits = peaked(a, c, a) + peaked(a, b, a) * 0.5  # row 1 prefers c, which the grammar forbids after "a"
    assert verify(runner, [(request, (a, c))], logits)[request.key].token_ids == [a, b]
    assert request.grammar.num_accepted == 0  # the core advances it on the kept tokens
