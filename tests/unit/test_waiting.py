"""first_of: the first of several awaitables wins; the others are cancelled and awaited."""

from __future__ import annotations

import asyncio

import pytest

from appliance.waiting import first_of


class Pending:
    """An awaitable that finishes when told to, and records how it ended."""

    def __init__(self, result: str) -> None:
        self.result = result
        self.release = asyncio.Event()
        self.started = asyncio.Event()
        self.ended: str | None = None

    async def run(self) -> str:
        self.started.set()
        try:
            await self.release.wait()
        except asyncio.CancelledError:
            self.ended = "cancelled"
            raise
        self.ended = "finished"
        return self.result


async def test_the_first_to_finish_wins_and_the_rest_are_cancelled_before_it_returns() -> None:
    fast, slow = Pending("fast"), Pending("slow")
    fast.release.set()
    assert await first_of(slow.run(), fast.run()) == "fast"
    assert (fast.ended, slow.ended) == ("finished", "cancelled")


async def test_stop_set_first_returns_none_and_cancels_the_work() -> None:
    work, stop = Pending("work"), asyncio.Event()
    waiting = asyncio.create_task(first_of(work.run(), stop=stop))
    await work.started.wait()
    stop.set()
    assert await waiting is None
    assert work.ended == "cancelled"


async def test_work_done_together_with_stop_beats_it_and_earlier_arguments_win() -> None:
    stop = asyncio.Event()
    stop.set()
    done: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    done.set_result("work")
    assert await first_of(done, stop=stop) == "work"
    first, second = Pending("first"), Pending("second")
    first.release.set()
    second.release.set()
    assert await first_of(first.run(), second.run()) == "first"


async def test_the_winners_error_propagates() -> None:
    async def broken() -> str:
        raise ConnectionError("reset")

    other = Pending("other")
    with pytest.raises(ConnectionError, match="reset"):
        await first_of(broken(), other.run())
    assert other.ended in (None, "cancelled")


async def test_cancelling_the_caller_cancels_and_awaits_every_awaitable() -> None:
    one, two, stop = Pending("one"), Pending("two"), asyncio.Event()
    waiting = asyncio.create_task(first_of(one.run(), two.run(), stop=stop))
    await one.started.wait()
    await two.started.wait()
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert (one.ended, two.ended) == ("cancelled", "cancelled")


async def test_nothing_to_wait_for_is_an_error() -> None:
    with pytest.raises(ValueError, match="at least one"):
        await first_of()
