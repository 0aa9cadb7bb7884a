"""The scheduler driven directly, on a fake block pool whose capacity and prefix hits each test sets.

The policy pinned here (see ``server.engine.scheduler``): running requests first, in admission order, then
waiting requests first come first served, the last one chunked where the token budget ends; at most
``max_num_seqs`` running; when blocks run out the most recently admitted request is preempted, its blocks
freed, and it goes back to the front of the queue with nothing computed; a prefix-cache hit starts a request's
``num_computed_tokens`` at the cached length.
"""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from server.engine.request import Request, RequestStatus
from server.engine.scheduler import Scheduler, SchedulerConfig, SchedulerOutput
from tests.support.engine import make_request

BLOCK = 4


class FakeBlockPool:
    """``BlockManager``'s interface with a fixed number of blocks and prefix hits set per prompt."""

    block_size = BLOCK

    def __init__(self, num_blocks: int, hits: dict[tuple[int, ...], int] | None = None) -> None:
        self.free_blocks = num_blocks
        self.hits = hits or {}  # prompt -> cached full blocks
        self.freed: list[str] = []
        self.cached_up_to: dict[str, int] = {}

    def match_prefix(self, request: Request) -> list[int]:
        return list(range(self.hits.get(tuple(request.prompt_ids), 0)))

    def allocate(self, request: Request, num_new_tokens: int, cached: Sequence[int] = ()) -> bool:
        total = request.num_computed_tokens + len(cached) * BLOCK + num_new_tokens
        need = -(-total // BLOCK) - len(request.block_ids) - len(cached)
        if need > self.free_blocks:
            return False
        self.free_blocks -= max(need, 0)
        request.block_ids.extend([-1] * (len(cached) + max(need, 0)))
        return True

    def cache_full_blocks(self, request: Request, num_computed_tokens: int) -> None:
        self.cached_up_to[request.request_id] = num_computed_tokens

    def free(self, request: Request) -> None:
        self.free_blocks += len(request.block_ids)
        request.block_ids = []
        self.freed.append(request.request_id)


def scheduler(num_blocks: int = 100, budget: int = 16, max_seqs: int = 8) -> Scheduler:
    pool = FakeBlockPool(num_blocks)
    return Scheduler(SchedulerConfig(max_num_seqs=max_seqs, max_num_batched_tokens=budget), pool)  # type: ignore[arg-type]


def prompt(length: int, start: int = 10) -> list[int]:
    return list(range(start, start + length))


def commit(step: SchedulerOutput) -> None:
    """What the engine does after a step: the computed tokens advance; a completed request samples one."""
    for item in step.scheduled:
        completes = item.completes
        item.request.num_computed_tokens += item.num_new_tokens
        if completes:
            item.request.output_ids.append(7)


def plan(step: SchedulerOutput) -> list[tuple[str, int]]:
    return [(s.request.request_id, s.num_new_tokens) for s in step.scheduled]


def test_budget_goes_to_running_requests_first_then_waiting_fcfs_with_the_last_chunked() -> None:
    sched = scheduler(budget=16)
    a, b = make_request(prompt(3), "a"), make_request(prompt(4), "b")
    sched.add(a)
    sched.add(b)
    commit(sched.schedule())  # both prefilled: now running, one decode each
    c, d = make_request(prompt(9), "c"), make_request(prompt(9), "d")
    sched.add(c)
    sched.add(d)
    step = sched.schedule()
    assert plan(step) == [("a", 1), ("b", 1), ("c", 9), ("d", 5)]  # 16 tokens: d gets what is left
    assert step.num_tokens == 16 and step.preempted == ()
    assert [s.completes for s in step.scheduled] == [True, True, True, False]
    assert [r.request_id for r in sched.running] == ["a", "b", "c", "d"] and not sched.waiting


def test_a_long_prompt_is_chunked_across_steps() -> None:
    sched = scheduler(budget=8)
    long = make_request(prompt(21), "long")
    sched.add(long)
    chunks = []
    for _ in range(4):
        step = sched.schedule()
        chunks.append((step.scheduled[0].num_new_tokens, step.scheduled[0].completes))
        commit(step)
    assert chunks == [(8, False), (8, False), (5, True), (1, True)]  # then it decodes one token a step
    assert sched.blocks.cached_up_to["long"] == 22  # full blocks registered as each chunk is scheduled


def test_admission_is_first_come_first_served_even_when_a_later_request_would_fit() -> None:
    sched = scheduler(num_blocks=3, budget=64)
    big, small = make_request(prompt(20), "big"), make_request(prompt(2), "small")
    sched.add(big)
    sched.add(small)
    step = sched.schedule()
    assert plan(step) == []  # big needs 5 blocks of 3; small waits behind it
    assert [r.request_id for r in sched.waiting] == ["big", "small"]


def test_max_num_seqs_caps_the_running_batch() -> None:
    sched = scheduler(budget=64, max_seqs=2)
    for name in "abc":
        sched.add(make_request(prompt(2), name))
    step = sched.schedule()
    assert plan(step) == [("a", 2), ("b", 2)]
    assert [r.request_id for r in sched.waiting] == ["c"]
    commit(step)
    sched.finish(sched.running[0], "stop")
    assert plan(sched.schedule()) == [("b", 1), ("c", 2)]


def test_the_most_recently_admitted_request_is_preempted_and_requeued_first() -> None:
    sched = scheduler(num_blocks=3, budget=64)
    first, second = make_request(prompt(4), "first"), make_request(prompt(4), "second")
    late = make_request(prompt(1), "late")
    for request in (first, second):
        sched.add(request)
    commit(sched.schedule())  # 1 block each, one left
    sched.add(late)
    commit(sched.schedule())  # decodes need a 2nd block each: first takes the last one, second is preempted
    assert second.status is RequestStatus.WAITING and second.num_computed_tokens == 0
    assert second.num_preemptions == 1 and sched.num_preemptions == 1
    assert sched.blocks.freed == ["second"]
    assert [r.request_id for r in sched.waiting] == ["second", "late"]  # front of the queue, before late


def test_preemption_is_reported_and_nothing_is_admitted_in_that_step() -> None:
    sched = scheduler(num_blocks=2, budget=64)
    a, b = make_request(prompt(4), "a"), make_request(prompt(4), "b")
    sched.add(a)
    sched.add(b)
    commit(sched.schedule())
    sched.add(make_request(prompt(1), "c"))
    step = sched.schedule()
    assert [r.request_id for r in step.preempted] == ["b"]
    assert plan(step) == [("a", 1)] and [r.request_id for r in sched.waiting] == ["b", "c"]


def test_a_victim_that_is_the_request_itself_stops_the_running_pass() -> None:
    sched = scheduler(num_blocks=1, budget=64)
    only = make_request(prompt(4), "only")
    sched.add(only)
    commit(sched.schedule())
    step = sched.schedule()  # its decode needs a 2nd block: it preempts itself
    assert plan(step) == [] and [r.request_id for r in step.preempted] == ["only"]
    assert only.status is RequestStatus.WAITING


@pytest.mark.parametrize("hit_blocks", [1, 2])
def test_prefix_hits_start_the_computed_count_at_the_cached_length(hit_blocks: int) -> None:
    sched = scheduler(budget=64)
    sched.blocks.hits = {tuple(prompt(10)): hit_blocks}
    request = make_request(prompt(10), "hit")
    sched.add(request)
    step = sched.schedule()
    cached = hit_blocks * BLOCK
    assert plan(step) == [("hit", 10 - cached)]
    assert request.num_computed_tokens == cached and request.num_cached_tokens == cached


def test_a_recomputed_request_keeps_its_first_prefix_hit_count() -> None:
    sched = scheduler(num_blocks=100, budget=64)
    sched.blocks.hits = {tuple(prompt(10)): 1}
    request = make_request(prompt(10), "r")
    sched.add(request)
    commit(sched.schedule())
    sched._preempt(sched.running.pop())
    sched.blocks.hits = {tuple(prompt(10)): 2}  # after preemption more of it happens to be cached
    step = sched.schedule()
    assert plan(step) == [("r", 11 - 8)]  # prompt + the sampled token, minus the two cached blocks
    assert request.num_cached_tokens == 4  # usage reports the first admission's hit


def test_finish_frees_blocks_at_once_wherever_the_request_is() -> None:
    sched = scheduler(budget=4)
    running, waiting = make_request(prompt(3), "run"), make_request(prompt(3), "wait")
    sched.add(running)
    sched.add(waiting)
    commit(sched.schedule())  # "run" takes 3 of the 4 tokens, "wait" a chunk of 1
    sched.finish(running, "abort")
    sched.finish(waiting, "abort")
    assert not sched.has_work() and sched.blocks.free_blocks == 100
    assert running.finish_reason == "abort" and running.is_finished
