"""The engine's side of speculation: which sequences propose how many tokens, and what came of it.

A sequence in the decode state (one known token left to compute) proposes up to ``num_speculative_tokens``
tokens, never so many that accepting all of them plus the model's next token would pass ``max_tokens`` or
``max_model_len``. How many it proposes adapts to how its proposals fared (``DraftLength``): from a decayed
estimate of the chance ``a`` that a proposed token is accepted (given the ones before it were), it proposes
the tokens whose chance of being kept, ``a ** j`` for the ``j``-th, is worth the work of verifying them
(``MIN_KEEP``); and after a proposal of which nothing was accepted it pauses, twice as long after each further
miss, so a sequence with nothing to copy soon stops costing anything. Proposals are a string search over
each sequence's own tokens on the host, so no sequence waits for another's, and the ones without proposals
take their one token in the same step as the others.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

from server.engine.request import Request
from server.engine.spec.config import SpeculativeConfig
from server.engine.spec.ngram import NgramProposer

logger = logging.getLogger(__name__)
MAX_PAUSE_TOKENS = 64  # a sequence that keeps missing proposes again at least this often
# A proposed token is worth verifying while its chance of being kept is at least this: a verified token costs
# a fraction of a step (on CPU about 0.2 of a one-sequence decode step for the first, less for the next ones).
MIN_KEEP = 0.25
DECAY = 0.75  # weight of the past in the acceptance estimate, per verified proposal
PRIOR = (1.5, 1.0)  # (accepted, rejected) a sequence starts from: an estimate of 0.6
LOG_INTERVAL_S = 60.0
MAX_TOKEN_ID = 0x10FFFF  # the n-gram proposer keeps token ids as characters


class Proposer(Protocol):
    """Where proposals come from: up to ``num_tokens`` ids to follow a sequence's tokens."""

    def propose(self, request: Request, num_tokens: int) -> list[int]: ...

    def drop(self, key: tuple[str, int]) -> None: ...


@dataclass
class DraftLength:
    """How many tokens one sequence proposes next, from how its proposals fared."""

    limit: int
    accepted: float = PRIOR[0]  # decayed count of accepted proposed tokens
    rejected: float = PRIOR[1]  # decayed count of proposals cut short by a rejection
    misses: int = 0  # proposals in a row of which nothing was accepted
    resume_at: int = 0  # the sequence proposes again once it holds this many tokens

    @property
    def acceptance(self) -> float:
        """Estimated chance that a proposed token is kept, given that those before it were."""
        return self.accepted / (self.accepted + self.rejected)

    def allowed(self, num_tokens: int) -> int:
        if num_tokens < self.resume_at:
            return 0
        rate = self.acceptance
        if rate >= 1.0:
            return self.limit
        if rate <= MIN_KEEP:
            return 1  # a probe: the sequence may have started repeating itself
        return max(1, min(self.limit, int(math.log(MIN_KEEP) / math.log(rate))))

    def update(self, num_tokens: int, proposed: int, accepted: int) -> None:
        """Record a verified proposal; ``num_tokens``: the sequence's length when it was made."""
        self.accepted = self.accepted * DECAY + accepted
        self.rejected = self.rejected * DECAY + (1 if accepted < proposed else 0)
        if accepted:
            self.misses = 0
            return
        self.misses += 1
        self.resume_at = num_tokens + min(2 ** (self.misses - 1) - 1, MAX_PAUSE_TOKENS)


@dataclass(frozen=True)
class SpecCounters:
    """Totals since the engine started (vLLM's ``spec_decode_num_*`` counters).

    Acceptance rate = accepted_tokens / draft_tokens; mean accepted length = 1 + accepted_tokens / drafts
    (tokens per verifying step of a sequence, the model's own next token included).
    """

    drafts: int = 0
    draft_tokens: int = 0
    accepted_tokens: int = 0

    def plus(self, proposed: int, accepted: int) -> SpecCounters:
        return SpecCounters(self.drafts + 1, self.draft_tokens + proposed, self.accepted_tokens + accepted)

    def minus(self, other: SpecCounters) -> SpecCounters:
        return SpecCounters(self.drafts - other.drafts, self.draft_tokens - other.draft_tokens,
                            self.accepted_tokens - other.accepted_tokens)

    def describe(self) -> str:
        rate = self.accepted_tokens / self.draft_tokens if self.draft_tokens else 0.0
        mean = 1 + self.accepted_tokens / self.drafts if self.drafts else 0.0
        return (f"{self.drafts} drafts, {self.draft_tokens} draft tokens, {self.accepted_tokens} accepted "
                f"(acceptance rate {rate:.1%}, mean accepted length {mean:.2f})")


class SpecDecoder:
    """Per-sequence proposals and their adaptive lengths, the counters, and a log line per minute."""

    def __init__(self, config: SpeculativeConfig, max_model_len: int, vocab_size: int) -> None:
        if vocab_size - 1 > MAX_TOKEN_ID:
            raise ValueError(f"n-gram speculation handles token ids up to {MAX_TOKEN_ID}, the vocabulary has "
                             f"{vocab_size}")
        self.config = config
        self.max_model_len = max_model_len
        self.proposer: Proposer = NgramProposer(config.prompt_lookup_min, config.prompt_lookup_max)
        self.counters = SpecCounters()
        self._lengths: dict[tuple[str, int], DraftLength] = {}
        self._logged = SpecCounters()
        self._last_log = time.monotonic()

    def propose(self, requests: Iterable[Request]) -> dict[tuple[str, int], list[int]]:
        """Proposals of the running sequences that are decoding (others get none)."""
        drafts: dict[tuple[str, int], list[int]] = {}
        for request in requests:
            room = self._room(request)
            if room > 0:
                draft = self.proposer.propose(request, room)[:room]
                if draft:
                    drafts[request.key] = draft
        return drafts

    def record(self, request: Request, proposed: int, accepted: int) -> None:
        """A proposal of ``proposed`` tokens was verified and its first ``accepted`` kept."""
        self.counters = self.counters.plus(proposed, accepted)
        self._length(request).update(request.num_tokens, proposed, accepted)
        self.maybe_log()

    def drop(self, request: Request) -> None:
        """Forget a sequence that ended."""
        self._lengths.pop(request.key, None)
        self.proposer.drop(request.key)

    def maybe_log(self, now: float | None = None) -> None:
        """One info line per ``LOG_INTERVAL_S`` with the figures of that interval, while proposals run."""
        now = time.monotonic() if now is None else now
        if now - self._last_log < LOG_INTERVAL_S:
            return
        interval = self.counters.minus(self._logged)
        if interval.drafts:
            logger.info("speculative decoding: %s", interval.describe())
        self._logged, self._last_log = self.counters, now

    def _room(self, request: Request) -> int:
        if request.num_tokens - request.num_computed_tokens != 1:
            return 0  # a prefill or recompute: nothing is proposed until it decodes
        allowed = self._length(request).allowed(request.num_tokens)
        # Accepting every proposed token plus the model's next one must stay within both limits.
        by_length = request.params.max_tokens - len(request.output_ids) - 1
        by_context = self.max_model_len - request.num_tokens - 1
        return min(allowed, by_length, by_context)

    def _length(self, request: Request) -> DraftLength:
        state = self._lengths.get(request.key)
        if state is None:
            state = self._lengths[request.key] = DraftLength(limit=self.config.num_speculative_tokens)
        return state
