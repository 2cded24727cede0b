"""Coalescing single calls into batch calls (SQS takes up to ten messages per request).

A :class:`Batcher` never waits to fill a batch: the first item goes out at
once, and whatever arrives while that request is in flight goes out together
in the next one. Under light load nothing is delayed; under heavy load the
number of requests falls by up to the batch size.

No error is left unretrieved: an item whose submitter was cancelled while its
batch was in flight still has its outcome read, and the draining task's own
failure (a defect) fails every pending item instead of vanishing.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

T = TypeVar("T")
Flush = Callable[[Sequence[T]], Awaitable[Sequence[BaseException | None]]]
"""Sends one batch; returns, per item, None (done) or the error that item met."""


class Batcher(Generic[T]):
    def __init__(
        self,
        flush: Flush[T],
        *,
        size: int = 10,
        weight: Callable[[T], int] = lambda _item: 0,
        max_weight: int = 0,
    ) -> None:
        self._flush = flush
        self._size = size
        self._weight = weight
        self._max_weight = max_weight
        self._pending: list[tuple[T, asyncio.Future[None]]] = []
        self._draining: asyncio.Task[None] | None = None

    async def submit(self, item: T) -> None:
        """Send ``item`` in the next batch; raises the error it met, if any."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        future.add_done_callback(_retrieve)
        self._pending.append((item, future))
        if self._draining is None or self._draining.done():
            self._draining = asyncio.create_task(self._drain())
            self._draining.add_done_callback(self._drained)
        await asyncio.shield(future)

    def _drained(self, task: asyncio.Task[None]) -> None:
        error = None if task.cancelled() else task.exception()
        if task.cancelled() or error is not None:
            pending, self._pending = self._pending, []
            for _, future in pending:
                if future.done():
                    continue
                if error is None:
                    future.cancel()
                else:
                    future.set_exception(error)

    def _take(self) -> list[tuple[T, asyncio.Future[None]]]:
        batch: list[tuple[T, asyncio.Future[None]]] = []
        weight = 0
        while self._pending and len(batch) < self._size:
            item_weight = self._weight(self._pending[0][0])
            if batch and self._max_weight and weight + item_weight > self._max_weight:
                break
            batch.append(self._pending.pop(0))
            weight += item_weight
        return batch

    async def _drain(self) -> None:
        while self._pending:
            batch = self._take()
            try:
                outcomes = await self._flush([item for item, _ in batch])
            except BaseException as error:
                for _, future in batch:
                    if not future.done():
                        future.set_exception(error)
                if isinstance(error, asyncio.CancelledError):
                    raise
                continue
            for (_, future), outcome in zip(batch, outcomes, strict=True):
                if future.done():
                    continue
                if outcome is None:
                    future.set_result(None)
                else:
                    future.set_exception(outcome)


def _retrieve(future: asyncio.Future[None]) -> None:
    """Read the outcome so that asyncio never reports it as "never retrieved"."""
    if not future.cancelled():
        future.exception()
