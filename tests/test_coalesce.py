"""libs.coalesce: calls arriving while the rounds are busy share the next round; each caller gets
exactly its own results or its own error."""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Sequence

import pytest

from libs.coalesce import Coalescer

caller: contextvars.ContextVar[str] = contextvars.ContextVar("caller", default="")


class Work:
    """A round that takes `delay` seconds, records what it was given and in whose context it ran."""

    def __init__(self, delay: float = 0.02, fail_on: int | None = None) -> None:
        self.delay = delay
        self.fail_on = fail_on
        self.rounds: list[list[int]] = []
        self.contexts: list[str] = []
        self.running = 0
        self.most_running = 0

    async def __call__(self, items: Sequence[int]) -> list[str]:
        self.rounds.append(list(items))
        self.contexts.append(caller.get())
        self.running += 1
        self.most_running = max(self.most_running, self.running)
        try:
            await asyncio.sleep(self.delay)
            if self.fail_on is not None and self.fail_on in items:
                raise ValueError(f"item {self.fail_on} is bad")
            return [f"r{i}" for i in items]
        finally:
            self.running -= 1


async def submit_as(coalescer: Coalescer[int, str], name: str, items: list[int]) -> list[str]:
    caller.set(name)
    return await coalescer.submit(items)


async def test_an_idle_coalescer_runs_a_call_at_once_on_its_own() -> None:
    work = Work()
    coalescer = Coalescer(work, concurrency=2)
    assert await coalescer.submit([1, 2]) == ["r1", "r2"]
    assert work.rounds == [[1, 2]]
    assert coalescer.merged_rounds == 0
    assert coalescer.rounds_running == 0


async def test_calls_arriving_while_busy_share_the_next_round_and_get_their_own_results() -> None:
    work = Work()
    coalescer = Coalescer(work, concurrency=1)
    results = await asyncio.gather(*(submit_as(coalescer, f"c{n}", [n * 10, n * 10 + 1]) for n in range(6)))
    assert results == [[f"r{n * 10}", f"r{n * 10 + 1}"] for n in range(6)]
    # The first runs alone; the five that queued behind it go together, in arrival order.
    assert work.rounds == [[0, 1], [10, 11, 20, 21, 30, 31, 40, 41, 50, 51]]
    assert work.contexts == ["c0", "c1"]  # each round in its first submission's context
    assert coalescer.merged_rounds == 1
    assert work.most_running == 1
    assert coalescer.rounds_running == 0


async def test_no_more_rounds_run_at_once_than_allowed_and_a_submission_is_never_split() -> None:
    work = Work()
    coalescer = Coalescer(work, concurrency=2, max_items=5)
    sizes = [3, 3, 2, 2, 4, 1, 5]
    submissions = []
    start = 0
    for size in sizes:
        submissions.append(list(range(start, start + size)))
        start += size
    results = await asyncio.gather(*(coalescer.submit(items) for items in submissions))
    assert results == [[f"r{i}" for i in items] for items in submissions]
    assert work.most_running == 2
    assert all(len(r) <= 5 for r in work.rounds)
    assert sorted(i for r in work.rounds for i in r) == list(range(start))
    for items in submissions:  # each submission's items all went in one round
        assert any(r[r.index(items[0]):r.index(items[0]) + len(items)] == items for r in work.rounds if items[0] in r)


async def test_a_submission_larger_than_the_cap_still_runs_whole() -> None:
    work = Work()
    coalescer = Coalescer(work, concurrency=1, max_items=3)
    assert await coalescer.submit([1, 2, 3, 4, 5]) == ["r1", "r2", "r3", "r4", "r5"]


async def test_a_failed_merged_round_is_run_again_per_submission_so_only_the_bad_one_fails() -> None:
    work = Work(fail_on=21)
    coalescer = Coalescer(work, concurrency=1)
    results = await asyncio.gather(*(submit_as(coalescer, f"c{n}", [n * 10, n * 10 + 1]) for n in range(4)),
                                   return_exceptions=True)
    assert results[0] == ["r0", "r1"]
    assert results[1] == ["r10", "r11"]
    assert isinstance(results[2], ValueError) and "21" in str(results[2])
    assert results[3] == ["r30", "r31"]
    # The merged round [10..31] failed; each of its submissions then ran alone, in its own context.
    assert work.rounds[1] == [10, 11, 20, 21, 30, 31]
    assert work.rounds[2:] == [[10, 11], [20, 21], [30, 31]]
    assert work.contexts[2:] == ["c1", "c2", "c3"]


async def test_an_error_alone_reaches_its_caller_and_the_coalescer_goes_on() -> None:
    work = Work(fail_on=7)
    coalescer = Coalescer(work, concurrency=1)
    with pytest.raises(ValueError, match="item 7"):
        await coalescer.submit([7])
    assert await coalescer.submit([8]) == ["r8"]
    assert coalescer.rounds_running == 0


async def started(coalescer: Coalescer[int, str], *submissions: list[int]) -> list[asyncio.Task[list[str]]]:
    """The submissions under way: the first running alone, the others waiting behind it."""
    first = asyncio.ensure_future(coalescer.submit(submissions[0]))
    await asyncio.sleep(0.01)
    futures = [first, *(asyncio.ensure_future(coalescer.submit(items)) for items in submissions[1:])]
    await asyncio.sleep(0)
    return futures


async def test_a_cancelled_caller_does_not_cancel_the_round_of_the_others() -> None:
    work = Work(delay=0.05)
    coalescer = Coalescer(work, concurrency=1)
    first, second, third = await started(coalescer, [1], [2], [3])
    second.cancel()
    assert await first == ["r1"]
    assert await third == ["r3"]
    assert second.cancelled()
    assert work.rounds == [[1], [2, 3]]  # the round ran for the caller still waiting


def test_bad_limits_are_refused() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        Coalescer(Work(), concurrency=0)
    with pytest.raises(ValueError, match="at least 1"):
        Coalescer(Work(), max_items=0)


async def test_a_caller_cancelled_while_running_alone_frees_its_slot_for_the_waiting() -> None:
    coalescer = Coalescer(Work(delay=0.05), concurrency=1)
    alone, waiting = await started(coalescer, [1], [2])
    alone.cancel()
    assert await waiting == ["r2"]
    assert alone.cancelled()
    assert coalescer.rounds_running == 0
    assert await coalescer.submit([3]) == ["r3"]
