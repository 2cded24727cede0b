"""A gate a test controls: whoever reaches it waits until the test opens it.

Timing-sensitive setups hold the work they depend on here instead of hoping a
sleep or a small bandwidth cap is long enough:

    gate = Gate()
    ...                          # code under test calls ``await gate.passage()``
    await gate.reached(5)        # five callers are now held (or went through)
    ...                          # assert on the state they are held in
    gate.open()                  # let them (and every later caller) through
"""

from __future__ import annotations

import asyncio


class Gate:
    def __init__(self) -> None:
        self._open = asyncio.Event()
        self._arrivals = asyncio.Condition()
        self.arrived = 0  # callers that reached the gate, held or let through
        self.held = 0  # callers waiting at the gate now

    @property
    def is_open(self) -> bool:
        return self._open.is_set()

    async def passage(self) -> None:
        """Wait here until the gate is open."""
        async with self._arrivals:
            self.arrived += 1
            self.held += 1
            self._arrivals.notify_all()
        try:
            await self._open.wait()
        finally:
            self.held -= 1

    async def reached(self, count: int, within_s: float = 60) -> None:
        """Return once ``count`` callers in all have reached the gate."""
        async with asyncio.timeout(within_s), self._arrivals:
            await self._arrivals.wait_for(lambda: self.arrived >= count)

    def open(self) -> None:
        self._open.set()
