"""Continuous-batching scheduler with a token budget, chunked prefill and preemption by recomputation.

Each request tracks ``num_computed_tokens`` against ``num_tokens``. A step hands out a token budget to close
that gap: running requests first (decodes and unfinished prefill chunks, in admission order), then waiting
requests FCFS, the last one chunked where the budget ends. When blocks run out, the most recently admitted
running request is preempted: its blocks are freed and it goes back to the front of the waiting queue with
zero computed tokens. Prefix-cache hits simply start ``num_computed_tokens`` higher.

Proposed (speculative) tokens of decoding requests come out of what the running requests leave of the budget,
before waiting requests are admitted; they get blocks only when the pool has them free (they never preempt),
and none are given in a step that preempted. They are not the request's tokens yet: only the known tokens'
blocks are registered in the prefix cache.
"""

from __future__ import annotations

import dataclasses
import time
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from server.engine.block_manager import BlockManager
from server.engine.request import Request, RequestStatus


@dataclass(frozen=True)
class SchedulerConfig:
    """Limits of one engine step."""

    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    max_model_len: int = 4096


@dataclass(frozen=True)
class ScheduledRequest:
    """A request's share of one step: ``num_new_tokens`` of its known tokens, then ``draft_token_ids``
    (proposed tokens to verify, only on a decode step)."""

    request: Request
    num_new_tokens: int
    draft_token_ids: tuple[int, ...] = ()

    @property
    def num_scheduled_tokens(self) -> int:
        """Tokens this step computes for the request, proposed ones included."""
        return self.num_new_tokens + len(self.draft_token_ids)

    @property
    def completes(self) -> bool:
        """Whether this step computes the request's last known token, so a new token is sampled."""
        return self.request.num_computed_tokens + self.num_new_tokens == self.request.num_tokens


@dataclass(frozen=True)
class SchedulerOutput:
    scheduled: tuple[ScheduledRequest, ...]
    preempted: tuple[Request, ...]

    @property
    def num_tokens(self) -> int:
        return sum(s.num_scheduled_tokens for s in self.scheduled)


class Scheduler:
    """Owns the waiting and running queues; the block manager owns the blocks."""

    def __init__(self, config: SchedulerConfig, blocks: BlockManager) -> None:
        self.config = config
        self.blocks = blocks
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions = 0

    def add(self, request: Request) -> None:
        self.waiting.append(request)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self, drafts: Mapping[tuple[str, int], Sequence[int]] | None = None) -> SchedulerOutput:
        """Pick this step's requests and how many tokens each computes; allocates their blocks.

        ``drafts``: proposed tokens per request key, granted as far as the budget and the free blocks go.
        """
        budget = self.config.max_num_batched_tokens
        scheduled: list[ScheduledRequest] = []
        preempted: list[Request] = []
        index = 0
        while index < len(self.running) and budget > 0:
            request = self.running[index]
            num_new = min(request.num_tokens - request.num_computed_tokens, budget)
            if not self._allocate_or_preempt(request, num_new, preempted):
                break
            scheduled.append(self._scheduled(request, num_new))
            budget -= num_new
            index += 1
        if drafts and not preempted:
            budget = self._grant_drafts(budget, scheduled, drafts)
        if not preempted:
            budget = self._admit_waiting(budget, scheduled)
        return SchedulerOutput(tuple(scheduled), tuple(preempted))

    def finish(self, request: Request, reason: str) -> None:
        """Mark a request finished (or aborted) and free its blocks at once."""
        if request.is_finished:
            return
        request.status = RequestStatus.FINISHED
        request.finish_reason = reason
        if request in self.running:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)
        self.blocks.free(request)

    def _grant_drafts(self, budget: int, scheduled: list[ScheduledRequest],
                      drafts: Mapping[tuple[str, int], Sequence[int]]) -> int:
        for i, item in enumerate(scheduled):
            draft = drafts.get(item.request.key)
            if budget <= 0 or not draft or item.num_new_tokens != 1 or not item.completes:
                continue
            request = item.request
            granted = tuple(draft[:budget])
            if not self.blocks.allocate(request, 1 + len(granted)):  # then what its own blocks still hold
                room = len(request.block_ids) * self.blocks.block_size - request.num_computed_tokens - 1
                granted = granted[: max(room, 0)]
            if granted:
                scheduled[i] = dataclasses.replace(item, draft_token_ids=granted)
                budget -= len(granted)
        return budget

    def _allocate_or_preempt(self, request: Request, num_new: int, preempted: list[Request]) -> bool:
        while not self.blocks.allocate(request, num_new):
            victim = self.running.pop()
            self._preempt(victim)
            preempted.append(victim)
            if victim is request:
                return False
        return True

    def _preempt(self, request: Request) -> None:
        self.blocks.free(request)
        request.num_computed_tokens = 0
        request.status = RequestStatus.WAITING
        request.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(request)

    def _admit_waiting(self, budget: int, scheduled: list[ScheduledRequest]) -> int:
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            request = self.waiting[0]
            cached = self.blocks.match_prefix(request)
            num_cached = len(cached) * self.blocks.block_size
            num_new = min(request.num_tokens - num_cached, budget)
            if not self.blocks.allocate(request, num_new, cached):
                break
            self.waiting.popleft()
            if request.num_preemptions == 0:
                request.num_cached_tokens = num_cached
            request.num_computed_tokens = num_cached
            request.status = RequestStatus.RUNNING
            if request.first_scheduled_time is None:
                request.first_scheduled_time = time.monotonic()
            self.running.append(request)
            scheduled.append(self._scheduled(request, num_new))
            budget -= num_new
        return budget

    def _scheduled(self, request: Request, num_new: int) -> ScheduledRequest:
        self.blocks.cache_full_blocks(request, request.num_computed_tokens + num_new)
        return ScheduledRequest(request, num_new)
