"""Caps on the data path, adjustable while a transfer runs.

* :class:`TokenBucket` caps bytes per second sent to the target. Unlimited by
  default; :data:`WAN_300_MBIT` is the preset for a 300 Mbit/s link. A request
  larger than the bucket may take it into debt (the next caller waits longer),
  so chunks bigger than the burst still pass and the long-term rate holds.
  Waiters are served in arrival order and re-evaluate at once when the rate
  changes, so lifting a cap takes effect without waiting out an old sleep.
* :class:`QueueDepthLimiter` caps how many source reads are in flight
  (default 4): a semaphore whose size can change while tasks hold it.

Both take a :class:`~appliance.clock.Clock` so tests drive them with a fake one.
One instance may be shared by several transfers (one cap for a whole WAN link).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import AsyncIterator

from appliance.clock import Clock, SystemClock
from appliance.waiting import first_of

MBIT = 1_000_000 // 8
WAN_300_MBIT = 300 * MBIT
"""The 300 Mbit/s preset, in bytes per second."""

DEFAULT_SOURCE_QUEUE_DEPTH = 4


class TokenBucket:
    """Bytes per second with a burst allowance; ``rate=None`` means unlimited."""

    def __init__(
        self,
        rate: float | None = None,
        *,
        burst: float | None = None,
        clock: Clock | None = None,
    ) -> None:
        self._clock = clock or SystemClock()
        self._rate: float | None = None
        self._burst = 0.0
        self._fixed_burst = burst
        self._tokens = 0.0
        self._stamp = self._clock.monotonic()
        self._turn = asyncio.Lock()
        self._changed = asyncio.Event()
        self.set_rate(rate)

    @property
    def rate(self) -> float | None:
        return self._rate

    def set_rate(self, rate: float | None) -> None:
        """Change the cap now; ``None`` lifts it. Current waiters re-plan immediately."""
        if rate is not None and rate <= 0:
            raise ValueError(f"rate must be positive or None, got {rate}")
        self._refill()
        self._rate = rate
        # Default burst: a quarter second of traffic, at least one 1 MiB chunk.
        self._burst = self._fixed_burst or (max(rate / 4, 1 << 20) if rate else 0.0)
        self._tokens = min(self._tokens, self._burst) if rate else 0.0
        self._changed.set()
        self._changed = asyncio.Event()

    def _refill(self) -> None:
        now = self._clock.monotonic()
        if self._rate is not None:
            self._tokens = min(self._burst, self._tokens + (now - self._stamp) * self._rate)
        self._stamp = now

    async def acquire(self, amount: int) -> None:
        """Wait until ``amount`` bytes may be sent, then take them."""
        if amount <= 0:
            return
        async with self._turn:
            while self._rate is not None:
                self._refill()
                needed = min(float(amount), self._burst)
                if self._tokens >= needed:
                    self._tokens -= amount
                    return
                delay = (needed - self._tokens) / self._rate
                await first_of(self._clock.sleep(delay), self._changed.wait())


class QueueDepthLimiter:
    """At most ``limit`` holders at a time; the limit may change while slots are held.

    Lowering the limit lets current holders finish; raising it admits waiters
    at once. Waiters are served in arrival order.
    """

    def __init__(self, limit: int = DEFAULT_SOURCE_QUEUE_DEPTH) -> None:
        self._check(limit)
        self._limit = limit
        self._in_use = 0
        self._waiters: deque[asyncio.Future[None]] = deque()

    @staticmethod
    def _check(limit: int) -> None:
        if limit < 1:
            raise ValueError(f"queue depth must be at least 1, got {limit}")

    @property
    def limit(self) -> int:
        return self._limit

    @property
    def in_use(self) -> int:
        return self._in_use

    def set_limit(self, limit: int) -> None:
        self._check(limit)
        self._limit = limit
        self._admit()

    def _admit(self) -> None:
        while self._waiters and self._in_use < self._limit:
            waiter = self._waiters.popleft()
            if not waiter.done():
                self._in_use += 1  # handed over before the waiter runs again
                waiter.set_result(None)

    async def acquire(self) -> None:
        if self._in_use < self._limit and not self._waiters:
            self._in_use += 1
            return
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self.release()  # the slot was handed over just as we were cancelled
            else:
                self._waiters.remove(waiter)
            raise

    def release(self) -> None:
        self._in_use -= 1
        self._admit()

    @contextlib.asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        await self.acquire()
        try:
            yield
        finally:
            self.release()
