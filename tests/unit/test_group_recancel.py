"""A recovery asked of a resting group ends its drive even when a cancel is lost.

Python 3.11's ``wait_for`` drops a cancel that races its inner future finishing; the group's
watcher then cancels again (``_cancel_until_done``) instead of leaving the drive resting
forever with the recovery asked and no run to do it.
"""

from __future__ import annotations

import asyncio

import pytest

from appliance.orchestrator import group


async def test_a_drive_that_loses_the_first_cancel_is_cancelled_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    losses = 0
    resting = asyncio.Event()

    async def drive() -> None:  # a resting drive: never ends by itself
        nonlocal losses
        while True:
            try:
                resting.set()
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                if losses == 0:  # the cancel lost, as wait_for does in 3.11
                    losses += 1
                    current = asyncio.current_task()
                    assert current is not None
                    current.uncancel()
                    continue
                raise

    task = asyncio.create_task(drive())
    await resting.wait()
    monkeypatch.setattr(group, "RECANCEL_S", 0.05)
    async with asyncio.timeout(10):
        await group._cancel_until_done(task)
    assert task.cancelled()
    assert losses == 1
