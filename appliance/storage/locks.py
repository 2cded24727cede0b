"""Asyncio locks for block storage: a shared/exclusive gate and block-range locks.

Both release synchronously (no await in ``finally``), so a cancelled holder
can never leave a lock taken. Waiters wake on an event that is replaced on
every change; there is no polling.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager


class _Signal:
    """Wake everyone waiting for "something changed"."""

    def __init__(self) -> None:
        self._event = asyncio.Event()

    async def wait(self) -> None:
        await self._event.wait()

    def notify(self) -> None:
        self._event.set()
        self._event = asyncio.Event()


class SharedExclusiveLock:
    """Many shared holders (I/O) or one exclusive holder (a change of structure).

    A waiting exclusive holder stops new shared holders, so a snapshot is not
    starved by a steady stream of I/O.
    """

    def __init__(self) -> None:
        self._shared = 0
        self._exclusive = False
        self._exclusive_waiting = 0
        self._changed = _Signal()

    @asynccontextmanager
    async def shared(self) -> AsyncIterator[None]:
        while self._exclusive or self._exclusive_waiting:
            await self._changed.wait()
        self._shared += 1
        try:
            yield
        finally:
            self._shared -= 1
            self._changed.notify()

    @asynccontextmanager
    async def exclusive(self) -> AsyncIterator[None]:
        self._exclusive_waiting += 1
        try:
            while self._exclusive or self._shared:
                await self._changed.wait()
        except BaseException:
            self._exclusive_waiting -= 1
            self._changed.notify()
            raise
        self._exclusive_waiting -= 1
        self._exclusive = True
        try:
            yield
        finally:
            self._exclusive = False
            self._changed.notify()


class BlockRangeLocks:
    """Exclusive locks on ranges of block indexes; a range is taken all at once.

    Taking the whole range in one step (rather than block by block) cannot
    deadlock, whatever order concurrent writers touch their blocks in.
    """

    def __init__(self) -> None:
        self._held: list[tuple[int, int]] = []
        self._changed = _Signal()

    def _overlaps(self, first: int, end: int) -> bool:
        return any(first < held_end and held_first < end for held_first, held_end in self._held)

    @asynccontextmanager
    async def hold(self, first: int, end: int) -> AsyncIterator[None]:
        while self._overlaps(first, end):
            await self._changed.wait()
        entry = (first, end)
        self._held.append(entry)
        try:
            yield
        finally:
            self._held.remove(entry)
            self._changed.notify()
