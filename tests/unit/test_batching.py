"""Batcher: first item at once, later ones together, errors to the right caller."""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Sequence

import pytest

from appliance.batching import Batcher


class Sender:
    def __init__(self, fail: set[int] | None = None, boom: bool = False) -> None:
        self.batches: list[list[int]] = []
        self.gate = asyncio.Event()
        self.gate.set()
        self.called = asyncio.Event()
        self._fail = fail or set()
        self._boom = boom

    async def __call__(self, items: Sequence[int]) -> list[BaseException | None]:
        self.batches.append(list(items))
        self.called.set()
        await self.gate.wait()
        if self._boom:
            raise ConnectionError("queue service down")
        return [ValueError(f"item {i}") if i in self._fail else None for i in items]


async def test_a_lone_item_goes_out_at_once_and_a_crowd_is_batched() -> None:
    sender = Sender()
    batcher = Batcher(sender, size=3)
    await batcher.submit(0)
    assert sender.batches == [[0]]
    sender.gate.clear()
    first = asyncio.create_task(batcher.submit(1))
    await asyncio.sleep(0)
    rest = [asyncio.create_task(batcher.submit(n)) for n in range(2, 7)]
    await asyncio.sleep(0)
    sender.gate.set()
    await asyncio.gather(first, *rest)
    assert sender.batches == [[0], [1], [2, 3, 4], [5, 6]]


async def test_each_caller_gets_its_own_outcome() -> None:
    batcher = Batcher(Sender(fail={2}))
    results = await asyncio.gather(*(batcher.submit(n) for n in range(4)), return_exceptions=True)
    assert [type(r).__name__ for r in results] == ["NoneType", "NoneType", "ValueError", "NoneType"]


async def test_a_failed_request_fails_every_item_in_it() -> None:
    batcher = Batcher(Sender(boom=True))
    with pytest.raises(ConnectionError):
        await batcher.submit(1)
    results = await asyncio.gather(*(batcher.submit(n) for n in range(3)), return_exceptions=True)
    assert all(isinstance(r, ConnectionError) for r in results)


async def test_batches_respect_a_weight_budget() -> None:
    sender = Sender()
    sender.gate.clear()
    batcher = Batcher(sender, size=10, weight=lambda n: n, max_weight=10)
    tasks = [asyncio.create_task(batcher.submit(n)) for n in (1, 6, 5, 4, 9)]
    await asyncio.sleep(0)
    sender.gate.set()
    await asyncio.gather(*tasks)
    assert sender.batches == [[1, 6], [5, 4], [9]]


async def test_a_caller_cancelled_while_its_batch_fails_leaves_no_unretrieved_error() -> None:
    loop = asyncio.get_running_loop()
    reported: list[dict[str, object]] = []
    loop.set_exception_handler(lambda _loop, context: reported.append(context))
    sender = Sender(boom=True)
    sender.gate.clear()
    batcher = Batcher(sender)
    caller = asyncio.create_task(batcher.submit(1))
    await asyncio.wait_for(sender.called.wait(), 5)  # the batch is in flight
    caller.cancel()
    with pytest.raises(asyncio.CancelledError):
        await caller
    sender.gate.set()
    with pytest.raises(ConnectionError):  # the batcher still works, and fails the next item
        await batcher.submit(2)
    del caller
    gc.collect()
    assert reported == []
