"""A cold migration pauses while a component it needs is down, and resumes from its checkpoint.

What a cold run needs, by its name on the health board: the state store, the bus, its
source and target site drivers (``site:<name>``), and the WAN link its data copy
crosses (``wan_link``). A step is run under :class:`Pausing`:

* when one of them turns *failed* while the step runs (a blackholed link hangs the
  copy rather than failing it), the step is stopped;
* when the step fails while one of them is not ok (failed, or degraded: the WAN link
  down for less than its threshold), the failure is not the migration's: its retries
  were spent on an outage;

either way the run *pauses*: the record says why (``extra.paused_reason``, shown as
state ``paused`` with ``pause_reason``), an event ``migration_paused`` is written, and
the run waits, holding its slot and its lease, until every component it needs is ok
again; then ``migration_resumed``, and the step runs again. Steps are idempotent and
the copy resumes from its transfer checkpoint, so what was copied is not copied again.
A cancel while paused rolls back as usual. A step that fails while everything it needs
is ok fails as before.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Coroutine
from enum import StrEnum
from typing import Any

from appliance.errors import (
    LeaseLost,
    MigrationCancelled,
    SiteError,
    StateStoreUnavailable,
    TransferCancelled,
    TransferFailed,
    TransientError,
)
from appliance.health import ComponentHealth, HealthBoard
from appliance.logs import get_logger
from appliance.orchestrator.context import Deps
from appliance.orchestrator.journal import Journal
from appliance.orchestrator.record import PAUSED_REASON, MigrationRecord
from messages.events import ComponentState

log = get_logger(__name__)

WAN_LINK = "wan_link"
SETTLE_S = 3.0
"""After a failed step with everything ok: how long the board may take to notice a
component that went down with it (the WAN probe runs every second or so)."""


Step = Callable[[MigrationRecord], Coroutine[Any, Any, MigrationRecord]]


OUTAGE_LIKE = (TransientError, OSError, TimeoutError, TransferFailed, SiteError)
"""Failures an outage of a needed component can cause (the board may notice it a moment
later); anything else with everything ok fails at once."""


class PauseEvent(StrEnum):
    """The event kinds of a paused cold run, as written to its event log."""

    PAUSED = "migration_paused"
    RESUMED = "migration_resumed"


def needed_by(deps: Deps, record: MigrationRecord, board: HealthBoard) -> tuple[str, ...]:
    """The board's names of what the run needs (those the board knows)."""
    wanted = (
        "state_store",
        "bus",
        f"site:{deps.site(record.site).name}",
        f"site:{deps.site(record.target_site).name}",
        WAN_LINK,
    )
    known = set(board.names())
    return tuple(name for name in dict.fromkeys(wanted) if name in known)


def is_paused(record: MigrationRecord) -> bool:
    return bool(record.extra.get(PAUSED_REASON))


class _Failed(Exception):
    """A needed component failed while the step ran (the step was stopped)."""


class Pausing:
    """Runs one cold step, pausing while what it needs is down (see the module doc)."""

    def __init__(
        self,
        deps: Deps,
        journal: Journal,
        board: HealthBoard,
        cancel: asyncio.Event,
    ) -> None:
        self._deps = deps
        self._journal = journal
        self._board = board
        self._cancel = cancel

    async def run(
        self,
        record: MigrationRecord,
        step: Step,
    ) -> MigrationRecord:
        names = needed_by(self._deps, record, self._board)
        while True:
            if is_paused(record):
                record = await self._resume(record, names)
            try:
                return await self._attempt(record, step, names)
            except (LeaseLost, MigrationCancelled, StateStoreUnavailable, TransferCancelled):
                raise
            except Exception as error:
                down = await self._down_after(error, names)
                if down:
                    record = await self._pause(record, down, error)
                elif not isinstance(error, _Failed):
                    raise
                # else: stopped for a component that is back already: the step runs again

    async def _attempt(
        self,
        record: MigrationRecord,
        step: Step,
        names: tuple[str, ...],
    ) -> MigrationRecord:
        """The step, stopped if a needed component fails meanwhile."""
        failed = asyncio.Event()

        def changed(before: ComponentHealth, after: ComponentHealth) -> None:
            if after.name in names and after.state is ComponentState.FAILED:
                failed.set()

        self._board.subscribe(changed)
        task: asyncio.Task[MigrationRecord] = asyncio.create_task(step(record))
        watch = asyncio.create_task(failed.wait())
        try:
            if any(self._board.is_failed(n) for n in names):
                failed.set()
            await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
            if task.done():
                return task.result()
            task.cancel()
            await asyncio.wait({task})  # our own cancellation is not swallowed here
            if not task.cancelled() and task.exception() is None:
                return task.result()  # it finished as it was stopped
            raise _Failed()
        finally:
            self._board.unsubscribe(changed)
            watch.cancel()
            if not task.done():
                task.cancel()
                await asyncio.wait({task})

    async def _down_after(self, error: BaseException, names: tuple[str, ...]) -> list[str]:
        """The needed components not ok now, or within ``SETTLE_S`` of a failed step."""
        down = [n for n in names if not self._board.is_ok(n)]
        if down or not isinstance(error, OUTAGE_LIKE):
            return down
        went_down = asyncio.Event()

        def changed(before: ComponentHealth, after: ComponentHealth) -> None:
            if after.name in names and after.state is not ComponentState.OK:
                went_down.set()

        self._board.subscribe(changed)
        try:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(SETTLE_S):
                    await went_down.wait()
        finally:
            self._board.unsubscribe(changed)
        return [n for n in names if not self._board.is_ok(n)]

    async def _all_ok(self, names: tuple[str, ...]) -> None:
        for name in names:
            await self._board.wait_ok(name)

    def _reason(self, down: list[str]) -> str:
        states = {c.name: c for c in self._board.statuses() if c.name in down}
        parts = [
            f"{name} {states[name].state.value}: {states[name].detail}" if name in states else name
            for name in down
        ]
        return "waiting for " + "; ".join(parts)

    async def _pause(
        self, record: MigrationRecord, down: list[str], error: BaseException
    ) -> MigrationRecord:
        reason = self._reason(down)
        cause = "" if isinstance(error, _Failed) else f"{type(error).__name__}: {error}"
        log.warning("cold run paused", migration_id=record.migration_id, reason=reason, error=cause)
        # The step saved its progress as it went: the stored record, not the one it began with.
        record = await self._journal.reload(record)
        record = await self._journal.update(record, extra={**record.extra, PAUSED_REASON: reason})
        await self._deps.events.append(
            PauseEvent.PAUSED.value,
            self._deps.clock.now().isoformat(),
            migration_id=record.migration_id,
            step=record.step.value,
            components=",".join(down),
            reason=reason,
            error=cause,
            bytes_done=record.bytes_done,
        )
        await self._deps.reporter.publish(record)
        return record

    async def _resume(self, record: MigrationRecord, names: tuple[str, ...]) -> MigrationRecord:
        """Wait until every needed component is ok (or a cancel), then clear the pause."""
        while not all(self._board.is_ok(n) for n in names):
            back = asyncio.create_task(self._all_ok(names))
            cancelled = asyncio.create_task(self._cancel.wait())
            try:
                await asyncio.wait({back, cancelled}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                back.cancel()
                cancelled.cancel()
            if self._cancel.is_set():
                raise MigrationCancelled(record.migration_id)
        record = await self._journal.reload(record)
        extra = {k: v for k, v in record.extra.items() if k != PAUSED_REASON}
        record = await self._journal.update(record, extra=extra)
        log.info("cold run resumed", migration_id=record.migration_id)
        await self._deps.events.append(
            PauseEvent.RESUMED.value,
            self._deps.clock.now().isoformat(),
            migration_id=record.migration_id,
            step=record.step.value,
            bytes_done=record.bytes_done,
        )
        await self._deps.reporter.publish(record)
        return record
