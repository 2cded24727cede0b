"""Clocks for tests that must not depend on how fast the machine is."""

from __future__ import annotations

import asyncio

from appliance.clock import FakeClock


class SteppingClock(FakeClock):
    """A fake clock that moves only when someone sleeps on it, by exactly that long.

    Work between sleeps (I/O in threads, a loaded machine) takes no time on it, so
    code paced by this clock does the same thing however slow the run is.
    """

    async def sleep(self, seconds: float) -> None:
        if seconds > 0:
            self.advance(seconds)
        await asyncio.sleep(0)
