"""Natural batching: calls that arrive while the work is busy go together in the next round.

A use case that costs one database transaction per call, whatever its size (the risk gate, for
one), spends most of a small call on round trips. `Coalescer` lets at most `concurrency` rounds run
at once; a submission that finds them all busy waits in a queue, and the next free round takes
every waiting submission (up to `max_items` items) as one call. Nothing waits on a timer: an idle
service runs each call at once, exactly as without the coalescer, and a loaded one answers each
call within about two rounds however many callers there are.

A submission is never split, and each caller gets back exactly its own results. When a merged
round fails as a whole, each submission in it runs again on its own, so one caller's bad luck is
not another's error. A call that finds a slot free runs in its own task; a round of waiting calls
runs in a task of its own, in the context (trace, principal) of its first submission, and is not
cancelled when one of its callers gives up.
"""

from __future__ import annotations

import asyncio
import contextvars
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

Item = TypeVar("Item")
Result = TypeVar("Result")


@dataclass
class _Submission(Generic[Item, Result]):
    items: Sequence[Item]
    future: asyncio.Future[list[Result]]
    context: contextvars.Context = field(default_factory=contextvars.copy_context)


class Coalescer(Generic[Item, Result]):
    def __init__(self, run: Callable[[Sequence[Item]], Awaitable[Sequence[Result]]], *,
                 concurrency: int = 2, max_items: int = 1_000) -> None:
        if concurrency < 1 or max_items < 1:
            raise ValueError("concurrency and max_items must be at least 1")
        self._run = run
        self._concurrency = concurrency
        self._max_items = max_items
        self._waiting: deque[_Submission[Item, Result]] = deque()
        self._rounds = 0
        self._tasks: set[asyncio.Task[None]] = set()  # the loop keeps only weak references to tasks
        self.merged_rounds = 0  # rounds that took more than one submission (observability, tests)

    @property
    def rounds_running(self) -> int:
        return self._rounds

    async def submit(self, items: Sequence[Item]) -> list[Result]:
        """`items`' results, in order, once the round that took them is done."""
        if self._rounds < self._concurrency and not self._waiting:
            # A free slot and nobody waiting: the round is this call alone, run in the caller's own
            # task (no hand-off to another task and back, which is most of an idle call's overhead).
            self._rounds += 1
            try:
                return list(await self._run(items))
            finally:
                self._release_slot()
        submission: _Submission[Item, Result] = _Submission(items, asyncio.get_running_loop().create_future())
        self._waiting.append(submission)
        if self._rounds < self._concurrency:
            self._rounds += 1
            self._start_round()
        # A cancelled caller does not cancel the round: the others in it still want their answers.
        return await asyncio.shield(submission.future)

    def _start_round(self) -> None:
        taken = [self._waiting.popleft()]
        count = len(taken[0].items)
        while self._waiting and count + len(self._waiting[0].items) <= self._max_items:
            count += len(self._waiting[0].items)
            taken.append(self._waiting.popleft())
        if len(taken) > 1:
            self.merged_rounds += 1
        # The round is a task in its first submission's context, so its spans join that trace.
        task = asyncio.get_running_loop().create_task(self._round(taken), context=taken[0].context)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _round(self, taken: list[_Submission[Item, Result]]) -> None:
        try:
            if len(taken) == 1:
                await _settle(taken[0], self._run(taken[0].items))
            else:
                await self._merged(taken)
        except BaseException:
            for submission in taken:  # cancelled (shutting down): nobody is left waiting forever
                if not submission.future.done():
                    submission.future.cancel()
            raise
        finally:
            self._release_slot()

    def _release_slot(self) -> None:
        if self._waiting:
            self._start_round()  # the round slot passes straight to the waiting submissions
        else:
            self._rounds -= 1

    async def _merged(self, taken: list[_Submission[Item, Result]]) -> None:
        items = [item for submission in taken for item in submission.items]
        try:
            results = list(await self._run(items))
        except Exception:
            loop = asyncio.get_running_loop()
            for submission in taken:
                await loop.create_task(_settle(submission, self._run(submission.items)), context=submission.context)
            return
        start = 0
        for submission in taken:
            end = start + len(submission.items)
            if not submission.future.done():
                submission.future.set_result(results[start:end])
            start = end


async def _settle(submission: _Submission[Item, Result], call: Awaitable[Sequence[Result]]) -> None:
    try:
        results = list(await call)
    except Exception as exc:
        if not submission.future.done():
            submission.future.set_exception(exc)
        return
    if not submission.future.done():
        submission.future.set_result(results)
