"""Speculation's parts on their own: the config, the n-gram lookup, adaptive proposal lengths, the scheduler's
budget for proposed tokens, block trimming after rejections, and the periodic log line."""

from __future__ import annotations

import logging
import math

import pytest

from server.cli import parse_args
from server.engine.block_manager import BlockManager
from server.engine.request import Request, RequestStatus
from server.engine.sampling_params import SamplingParams
from server.engine.scheduler import Scheduler, SchedulerConfig
from server.engine.spec import SpeculativeConfig
from server.engine.spec.decoder import LOG_INTERVAL_S, MAX_PAUSE_TOKENS, MIN_KEEP, DraftLength, SpecDecoder
from server.engine.spec.ngram import NgramProposer, ngram_lookup


def text(*tokens: int) -> str:
    return "".join(map(chr, tokens))


# --- config --------------------------------------------------------------------------------------------------


def test_config_takes_vllms_keys_and_defaults() -> None:
    both = SpeculativeConfig.from_dict({"method": "ngram", "num_speculative_tokens": 3})
    assert (both.prompt_lookup_min, both.prompt_lookup_max) == (5, 5)
    only_max = SpeculativeConfig.from_json('{"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_max": 4}')
    assert (only_max.prompt_lookup_min, only_max.prompt_lookup_max, only_max.num_speculative_tokens) == (4, 4, 2)
    only_min = SpeculativeConfig.from_dict({"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_min": 2})
    assert (only_min.prompt_lookup_min, only_min.prompt_lookup_max) == (2, 2)


@pytest.mark.parametrize(("values", "message"), [
    ({"method": "ngram", "num_speculative_tokens": 3, "model": "x"}, "unknown speculative config key(s) 'model'"),
    ({"method": "eagle", "num_speculative_tokens": 3}, "method 'eagle' is not supported"),
    ({"num_speculative_tokens": 3}, "needs a method"),
    ({"method": "ngram"}, "needs num_speculative_tokens"),
    ({"method": "ngram", "num_speculative_tokens": 0}, "must be a positive integer"),
    ({"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_min": 4, "prompt_lookup_max": 2},
     "must not exceed"),
])
def test_config_errors_say_what_is_wrong(values, message) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        SpeculativeConfig.from_dict(values)


def test_the_flag_reaches_the_engine_config_and_bad_values_exit(capsys) -> None:
    flag = '{"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 1, "prompt_lookup_max": 3}'
    _, _, config = parse_args(["--speculative-config", flag], environ={})
    assert config.speculative_config == SpeculativeConfig(4, 1, 3)
    assert parse_args([], environ={})[2].speculative_config is None
    with pytest.raises(SystemExit) as exit_info:
        parse_args(["--speculative-config", '{"method": "ngram", "num_speculative_tokens": 4, "k": 1}'], environ={})
    assert exit_info.value.code == 2
    assert "unknown speculative config key(s) 'k'" in capsys.readouterr().err


# --- n-gram lookup -------------------------------------------------------------------------------------------


def test_lookup_copies_what_followed_the_suffix() -> None:
    assert ngram_lookup(text(1, 2, 3, 4, 5, 1, 2, 3), 2, 1, 3) == [4, 5]


def test_the_longest_n_wins_over_a_more_recent_shorter_match() -> None:
    tokens = text(5, 1, 2, 9, 7, 2, 8, 1, 2)  # (1, 2) at 1 -> 9; the 1-gram (2) most recently at 5 -> 8
    assert ngram_lookup(tokens, 2, 1, 2) == [9, 7]
    assert ngram_lookup(tokens, 2, 1, 1) == [8, 1]


def test_the_most_recent_match_of_equal_length_wins() -> None:
    assert ngram_lookup(text(1, 2, 3, 1, 2, 4, 1, 2), 2, 2, 2) == [4, 1]


def test_a_loop_is_continued_through_the_proposal() -> None:
    assert ngram_lookup(text(7, 7, 7), 4, 1, 2) == [7, 7, 7, 7]
    assert ngram_lookup(text(9, 1, 2, 3, 1, 2, 3), 5, 3, 3) == [1, 2, 3, 1, 2]


def test_no_match_or_too_short_proposes_nothing() -> None:
    assert ngram_lookup(text(1, 2, 3, 4), 3, 1, 3) == []
    assert ngram_lookup(text(1, 2, 1, 2), 3, 4, 5) == []
    assert ngram_lookup(text(1, 1), 0, 1, 1) == []


def test_the_proposer_follows_a_growing_output() -> None:
    request = Request("r", 0, [4, 5, 6, 9, 4, 5], SamplingParams(max_tokens=10))
    proposer = NgramProposer(1, 2)
    assert proposer.propose(request, 3) == [6, 9, 4]
    request.output_ids += [6, 8]  # (6, 8) was never seen; 8 neither
    assert proposer.propose(request, 3) == []
    request.output_ids += [4]
    assert proposer.propose(request, 2) == [5, 6]
    proposer.drop(request.key)
    assert proposer.propose(request, 2) == [5, 6]


# --- adaptive proposal lengths --------------------------------------------------------------------------------


def test_a_sequence_that_keeps_missing_proposes_ever_more_rarely() -> None:
    state = DraftLength(limit=5)
    proposals = []
    for num_tokens in range(1, 1001):
        if state.allowed(num_tokens):
            proposals.append(state.allowed(num_tokens))
            state.update(num_tokens + 1, proposals[-1], 0)
            last = num_tokens
    assert len(proposals) < 30 and set(proposals[3:]) == {1}  # soon single-token probes, ever more rarely
    assert last + 1 + MAX_PAUSE_TOKENS > 1000
    state.update(2000, 1, 1)  # a hit: it proposes again at once
    assert state.allowed(2000) >= 1 and state.misses == 0


def test_proposal_length_follows_the_acceptance_estimate() -> None:
    state = DraftLength(limit=6)
    assert 1 < state.allowed(0) < 6  # an even start
    for _ in range(4):
        state.update(10, 6, 6)
    assert state.acceptance > 0.9 and state.allowed(10) == 6
    for _ in range(8):
        state.update(12, 2, 1)
    assert 0.5 < state.acceptance < 0.9 and 1 < state.allowed(12) < 6
    assert int(math.log(MIN_KEEP) / math.log(state.acceptance)) == state.allowed(12)


def decode_state(tokens: list[int], max_tokens: int = 100, rid: str = "r") -> Request:
    request = Request(rid, 0, tokens[:1], SamplingParams(max_tokens=max_tokens))
    request.output_ids = tokens[1:]
    request.num_computed_tokens = request.num_tokens - 1
    return request


def test_proposals_never_pass_max_tokens_or_the_context() -> None:
    spec = SpecDecoder(SpeculativeConfig(5, 1, 1), max_model_len=100, vocab_size=100)
    assert spec.propose([decode_state([1, 2, 1, 2, 1])])[("r", 0)] == [2, 1]  # the first proposals: 2 tokens
    short = SpecDecoder(SpeculativeConfig(5, 1, 1), max_model_len=7, vocab_size=100)
    assert short.propose([decode_state([1, 2, 1, 2, 1])])[("r", 0)] == [2]  # 5 + 1 + 1 = 7 tokens
    assert spec.propose([decode_state([1, 2, 1, 2, 1], max_tokens=6)])[("r", 0)] == [2]  # 4 + 1 + 1 = 6 outputs
    assert spec.propose([decode_state([1, 2, 1, 2, 1], max_tokens=5)]) == {}
    prefill = decode_state([1, 2, 1, 2, 1])
    prefill.num_computed_tokens = 2
    assert spec.propose([prefill]) == {}


def test_a_log_line_per_interval_while_proposals_run(caplog) -> None:
    spec = SpecDecoder(SpeculativeConfig(3, 1, 1), max_model_len=100, vocab_size=100)
    start = spec._last_log
    with caplog.at_level(logging.INFO, logger="server.engine.spec.decoder"):
        spec.record(decode_state([1, 2]), 3, 2)
        spec.record(decode_state([1, 2]), 2, 0)
        spec.maybe_log(start + LOG_INTERVAL_S / 2)
        assert not caplog.records
        spec.maybe_log(start + LOG_INTERVAL_S + 1)
        spec.maybe_log(start + 2 * LOG_INTERVAL_S + 2)  # nothing proposed since: no line
    assert [r.getMessage() for r in caplog.records] == [
        "speculative decoding: 2 drafts, 5 draft tokens, 2 accepted (acceptance rate 40.0%, "
        "mean accepted length 2.00)"]


# --- scheduling and blocks ------------------------------------------------------------------------------------


def running(blocks: BlockManager, sched: Scheduler, tokens: list[int], rid: str) -> Request:
    """A request admitted and decoding: its known tokens but the last are computed and hold blocks."""
    request = decode_state(tokens, rid=rid)
    request.num_computed_tokens = 0
    assert blocks.allocate(request, request.num_tokens - 1)
    request.num_computed_tokens = request.num_tokens - 1
    request.status = RequestStatus.RUNNING
    sched.running.append(request)
    return request


def test_proposed_tokens_use_what_the_running_requests_leave_of_the_budget() -> None:
    blocks = BlockManager(64, 4)
    sched = Scheduler(SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=6), blocks)
    a, b, c = (running(blocks, sched, [1, 2, 3, 4, 5], rid) for rid in "abc")
    sched.add(Request("w", 0, [7] * 9, SamplingParams()))
    step = sched.schedule({a.key: [9, 9, 9], b.key: [8, 8], c.key: [6]})
    granted = {s.request.request_id: s.draft_token_ids for s in step.scheduled}
    assert granted == {"a": (9, 9, 9), "b": (), "c": ()}  # 3 decodes, then 3 proposed tokens fill the budget
    assert step.num_tokens == 6 and len(a.block_ids) == 2  # 8 tokens: a second block for the proposals
    assert [r.request_id for r in sched.waiting] == ["w"]


def test_proposed_tokens_never_preempt_and_take_no_block_that_is_not_free() -> None:
    blocks = BlockManager(4, 4)
    sched = Scheduler(SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=64), blocks)
    a = running(blocks, sched, [1] * 6, "a")  # 2 blocks, 5 computed: its own blocks hold 2 proposed tokens
    b = running(blocks, sched, [2] * 8, "b")  # 2 blocks, 7 computed: full after its next token
    step = sched.schedule({a.key: [5, 5, 5, 5, 5], b.key: [6, 6]})
    assert not step.preempted and sched.num_preemptions == 0 and blocks.num_free_blocks == 0
    assert {s.request.request_id: s.draft_token_ids for s in step.scheduled} == {"a": (5, 5), "b": ()}


def test_trimming_frees_the_blocks_of_rejected_tokens_only() -> None:
    blocks = BlockManager(8, 4)
    request = Request("r", 0, list(range(10, 19)), SamplingParams())  # 9 tokens
    assert blocks.allocate(request, 9 + 6)  # the prompt and 6 proposed tokens: 4 blocks
    blocks.cache_full_blocks(request, 9)
    request.num_computed_tokens = 9 + 1  # one proposed token accepted
    blocks.trim(request)
    assert len(request.block_ids) == 3 and blocks.num_free_blocks == 5 and len(request.block_hashes) == 2
    blocks.free(request)
    assert blocks.num_free_blocks == 8
