"""Token bucket and queue-depth limiter, driven by a fake clock."""

from __future__ import annotations

import asyncio

import pytest

from appliance.clock import FakeClock
from appliance.datapath.throttle import WAN_300_MBIT, QueueDepthLimiter, TokenBucket


async def settle() -> None:
    """Let every ready task run until the loop is idle."""
    for _ in range(20):
        await asyncio.sleep(0)


async def run_until_done(clock: FakeClock, task: asyncio.Task[None], step: float) -> float:
    """Advance the fake clock in ``step``s until ``task`` finishes; returns the time taken."""
    start = clock.monotonic()
    await settle()
    while not task.done():
        clock.advance(step)
        await settle()
    await task
    return clock.monotonic() - start


def test_preset_is_300_megabit() -> None:
    assert WAN_300_MBIT * 8 == 300_000_000


async def test_unlimited_never_waits() -> None:
    bucket = TokenBucket(clock=FakeClock())
    await asyncio.wait_for(bucket.acquire(10**12), timeout=1)
    assert bucket.rate is None


async def test_waits_for_tokens_at_the_rate() -> None:
    clock = FakeClock()
    bucket = TokenBucket(1000, burst=1000, clock=clock)
    task = asyncio.create_task(bucket.acquire(500))
    await settle()
    clock.advance(0.4)
    await settle()
    assert not task.done()
    clock.advance(0.1)
    await settle()
    assert task.done()


async def test_long_term_rate_holds_with_requests_larger_than_the_burst() -> None:
    clock = FakeClock()
    bucket = TokenBucket(1000, burst=200, clock=clock)

    async def send() -> None:
        for _ in range(10):
            await bucket.acquire(1000)

    elapsed = await run_until_done(clock, asyncio.create_task(send()), 0.05)
    # 10 kB at 1 kB/s: the first request goes once the burst is full, the debt paces the rest.
    assert 9.0 <= elapsed <= 10.5


async def test_lifting_the_cap_wakes_a_waiter_at_once() -> None:
    clock = FakeClock()
    bucket = TokenBucket(10, clock=clock)
    task = asyncio.create_task(bucket.acquire(1 << 20))
    await settle()
    assert not task.done()
    bucket.set_rate(None)
    await settle()
    assert task.done()
    assert clock.monotonic() == 0


async def test_raising_the_rate_shortens_the_wait() -> None:
    clock = FakeClock()
    bucket = TokenBucket(100, burst=1000, clock=clock)
    task = asyncio.create_task(bucket.acquire(1000))  # 10 s at the old rate
    await settle()
    clock.advance(1.0)
    await settle()
    bucket.set_rate(10_000)
    elapsed = await run_until_done(clock, task, 0.01)
    assert elapsed <= 0.2


def test_rejects_a_non_positive_rate() -> None:
    with pytest.raises(ValueError, match="positive"):
        TokenBucket(0, clock=FakeClock())


async def test_queue_depth_caps_concurrent_holders() -> None:
    limiter = QueueDepthLimiter()
    assert limiter.limit == 4
    release = asyncio.Event()
    peak = 0

    async def hold() -> None:
        nonlocal peak
        async with limiter.slot():
            peak = max(peak, limiter.in_use)
            await release.wait()

    tasks = [asyncio.create_task(hold()) for _ in range(10)]
    await settle()
    assert limiter.in_use == 4
    release.set()
    await asyncio.gather(*tasks)
    assert peak == 4
    assert limiter.in_use == 0


async def test_queue_depth_adjusts_while_held() -> None:
    limiter = QueueDepthLimiter(2)
    release = asyncio.Event()

    async def hold() -> None:
        async with limiter.slot():
            await release.wait()

    tasks = [asyncio.create_task(hold()) for _ in range(6)]
    await settle()
    assert limiter.in_use == 2
    limiter.set_limit(5)
    await settle()
    assert limiter.in_use == 5
    limiter.set_limit(1)  # holders keep their slots; nobody new gets in
    await settle()
    assert limiter.in_use == 5
    release.set()
    await asyncio.gather(*tasks)
    assert limiter.in_use == 0


async def test_a_cancelled_waiter_leaks_no_slot() -> None:
    limiter = QueueDepthLimiter(1)
    await limiter.acquire()
    waiter = asyncio.create_task(limiter.acquire())
    await settle()
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    limiter.release()
    assert limiter.in_use == 0
    await asyncio.wait_for(limiter.acquire(), timeout=1)
    assert limiter.in_use == 1


def test_queue_depth_rejects_zero() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        QueueDepthLimiter(0)
