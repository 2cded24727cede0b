"""Waiting for the first of several things: one helper instead of a hand-rolled race each time.

    await first_of(clock.sleep(delay), changed.wait())    # whichever comes first
    batch = await first_of(receive(), stop=stopping)      # None if stopping is set first

The losers are cancelled *and awaited* before :func:`first_of` returns (or
raises), so nothing it started outlives it, also when the caller itself is
cancelled.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

T = TypeVar("T")


async def first_of(*awaitables: Awaitable[T], stop: asyncio.Event | None = None) -> T | None:
    """The result of the first of ``awaitables`` to finish, or None if ``stop`` is set first.

    When several are done together, the earliest in argument order wins, and any
    of them beats ``stop``. The winner's exception, if it raised, propagates.
    """
    if not awaitables:
        raise ValueError("first_of needs at least one awaitable")
    tasks = [asyncio.ensure_future(awaitable) for awaitable in awaitables]
    everything = [*tasks, asyncio.ensure_future(stop.wait())] if stop is not None else tasks
    try:
        done, _ = await asyncio.wait(everything, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in everything:
            task.cancel()
        await asyncio.gather(*everything, return_exceptions=True)
    for task in tasks:
        if task in done:
            return task.result()
    return None
