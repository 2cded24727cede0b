"""The copy loop's skeleton: a bounded queue feeding a fixed number of workers.

Modelled on ovirt-imageio's copy loop. One producer walks the plan lazily
and blocks when the queue is full, so the plan is never materialised and at
most ``workers`` items are in hand at once. The first error in any worker or
in the producer cancels the others (a TaskGroup), and nothing outlives the
call. A ``stop`` event is checked between items: workers finish the item in
hand, take no more, and the call returns normally.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable
from typing import TypeVar

T = TypeVar("T")


class _End:
    """Queue sentinel: no more items."""


_END = _End()


async def run_bounded(
    items: Iterable[T],
    handle: Callable[[T], Awaitable[None]],
    *,
    workers: int,
    stop: asyncio.Event | None = None,
) -> None:
    if workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")
    queue: asyncio.Queue[T | _End] = asyncio.Queue(maxsize=workers)

    def stopped() -> bool:
        return stop is not None and stop.is_set()

    async def produce() -> None:
        for item in items:
            if stopped():
                break
            await queue.put(item)
        for _ in range(workers):
            await queue.put(_END)

    async def work() -> None:
        while not isinstance(item := await queue.get(), _End):
            if not stopped():
                await handle(item)

    async with asyncio.TaskGroup() as group:
        group.create_task(produce())
        for _ in range(workers):
            group.create_task(work())


def first_failure(error: BaseException) -> BaseException:
    """The first real error inside (possibly nested) exception groups."""
    while isinstance(error, BaseExceptionGroup):
        leaves = [e for e in error.exceptions if not isinstance(e, asyncio.CancelledError)]
        error = (leaves or list(error.exceptions))[0]
    return error
