"""State of one sequence inside the engine, and the deltas the engine reports for it."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

import torch

from server.engine.sampling_params import SamplingParams
from server.engine.structured.matcher import GrammarState

# (token_id, logprob) pairs, most likely first.
TopLogprobs = list[tuple[int, float]]


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class TokenLogprob:
    """Log-probability of one token under the model, with the top alternatives at that position.

    ``rank``: 1 + how many tokens are more likely (filled for prompt tokens).
    """

    token_id: int
    logprob: float
    top: TopLogprobs
    rank: int | None = None


@dataclass
class Request:
    """One sequence: a prompt, its sampling parameters and everything generated so far.

    ``num_computed_tokens`` counts tokens whose K/V are in the cache; the scheduler closes the gap to
    ``num_tokens`` step by step. A preempted request drops back to zero and recomputes.
    """

    request_id: str
    index: int  # which of the ``n`` samples of its parent request
    prompt_ids: list[int]
    params: SamplingParams
    generator: torch.Generator | None = None
    arrival_time: float = field(default_factory=time.monotonic)
    output_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens served by the prefix cache at first admission
    status: RequestStatus = RequestStatus.WAITING
    finish_reason: str | None = None
    block_ids: list[int] = field(default_factory=list)
    block_hashes: list[int] = field(default_factory=list)
    num_preemptions: int = 0
    first_scheduled_time: float | None = None
    prompt_logprobs: list[TokenLogprob | None] = field(default_factory=list)
    bad_words: tuple[tuple[int, ...], ...] = ()  # token sequences of params.bad_words
    min_tokens_blocked: tuple[int, ...] = ()  # EOS (unless ignore_eos) and stop_token_ids
    grammar: GrammarState | None = None  # set once its constraint is compiled (params.structured)

    @property
    def key(self) -> tuple[str, int]:
        return (self.request_id, self.index)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    def token_slice(self, start: int, end: int) -> list[int]:
        """Token ids ``[start, end)`` of prompt + output."""
        prompt_len = len(self.prompt_ids)
        if end <= prompt_len:
            return self.prompt_ids[start:end]
        head = self.prompt_ids[start:] if start < prompt_len else []
        return head + self.output_ids[max(start - prompt_len, 0) : end - prompt_len]

    @property
    def wants_prompt_logprobs(self) -> bool:
        return self.params.prompt_logprobs is not None

    @property
    def is_finished(self) -> bool:
        return self.status is RequestStatus.FINISHED


@dataclass
class RequestOutput:
    """What one engine step produced for one sequence: a delta, not the whole text."""

    request_id: str
    index: int
    new_token_ids: list[int]
    new_text: str
    finished: bool
    finish_reason: str | None
    num_prompt_tokens: int
    num_output_tokens: int
    num_cached_tokens: int = 0
    logprobs: list[TokenLogprob] | None = None
    prompt_logprobs: list[TokenLogprob | None] | None = None
    queue_time: float | None = None  # seconds from arrival to first scheduling, on a sample's first delta
    error: str | None = None
    stop_reason: str | int | None = None  # the stop string or stop token id that finished it


@dataclass
class CoreOutput:
    """What one engine-core step produced for one sequence: token ids only (text is made by the output
    processor, ``server.engine.output_processor``).

    ``finish_reason`` is the core's own reason (``"stop"``: EOS, a stop token id or a completed grammar;
    ``"length"``; ``"error"``). ``stopped_by_token``: the last token ended the sequence itself (EOS or a stop
    token id), so its text is shown only with ``include_stop_str_in_output``.
    """

    request_id: str
    index: int
    new_token_ids: list[int]
    finish_reason: str | None = None
    stopped_by_token: bool = False
    stop_reason: int | None = None  # the stop token id that finished it
    num_cached_tokens: int = 0
    logprobs: list[TokenLogprob] | None = None
    prompt_logprobs: list[TokenLogprob | None] | None = None  # on a sample's first output only
    queue_time: float | None = None  # on a sample's first output only
    error: str | None = None

    @property
    def key(self) -> tuple[str, int]:
        return (self.request_id, self.index)
