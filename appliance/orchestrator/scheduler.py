"""Which groups run where: admission in order under the concurrency limit, and takeover.

Every appliance runs a scheduler. On each tick (every ``scheduler_tick_s``, or
sooner when woken by a new request or a finished group) it walks the active
groups in admission order:

* a group already admitted (some member past QUEUED) whose lease is free -
  its owner died or stopped - is taken over and resumed from its records;
* queued groups are admitted in order while they fit HDM's three limits (cold
  in progress, warm/tbc in progress per cache node, VMs resting in the cloud
  per cache node), each read from the policies on every tick (see ``limits``);
  a group that does not fit waits, and so does every later one needing the
  same limit. Admission happens under a short "admission" lease so two
  appliances never admit past a limit, and an admitted group's members are
  moved to PREPARING before its run starts.

A group's run holds the group's lease (renewed by a LeaseKeeper, which
cancels the run the moment renewal fails or a fenced write is refused); its
writes are fenced by it. A run leaves the running set only after its lease
is released, so no tick can start a second run under the same token.

A reset holds the scheduler (``held``): the local runs are stopped and no tick starts one
(neither a takeover nor an admission) until the reset is over, so the reset can take the
groups' leases itself without racing this process's own resumes.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Protocol

from appliance.errors import FerryError, LeaseLost, TransientError
from appliance.logs import get_logger
from appliance.orchestrator.context import Deps
from appliance.orchestrator.group import GroupRun
from appliance.orchestrator.journal import Journal
from appliance.orchestrator.limits import Room
from appliance.orchestrator.record import MigrationRecord, load
from appliance.orchestrator.states import RESTING, TERMINAL, Step
from appliance.state.leases import Lease, LeaseKeeper
from appliance.state.migrations import GroupInfo, StoredMigration
from appliance.waiting import first_of

log = get_logger(__name__)
STOP_RECANCEL_S = 1.0
ADMISSION = "admission"
PAUSED_RETRY_S = 10.0
"""Longest wait before a paused run (Redis away, a disk still held elsewhere) is retried."""
LOST_HOLD_S = 2 * PAUSED_RETRY_S
"""How long a process leaves alone a group it lost: longer than the new owner's retries."""


class Run(Protocol):
    async def run(self) -> None: ...


RunFactory = Callable[[Deps, Lease, GroupInfo, asyncio.Event], Run]
"""Builds a group's run (``GroupRun``; tests hand in runs they hold at a gate)."""


def group_lease(group_id: str) -> str:
    return f"group:{group_id}"


@dataclass(frozen=True, slots=True)
class GroupView:
    info: GroupInfo
    members: tuple[StoredMigration, ...]

    @property
    def steps(self) -> list[Step]:
        return [Step(m.step) for m in self.members]

    @property
    def finished(self) -> bool:
        return all(step in TERMINAL for step in self.steps)

    @property
    def queued(self) -> bool:
        return all(step is Step.QUEUED for step in self.steps)

    @property
    def cancel_requested(self) -> bool:
        return any(m.cancel_requested for m in self.members)

    @property
    def running_vms(self) -> int:
        """Members in progress: neither queued nor over, nor resting in the cloud (a resting
        VM holds no slot; the limits count it on its cache node, see ``limits``)."""
        return sum(
            1
            for step in self.steps
            if step is not Step.QUEUED and step not in TERMINAL and step not in RESTING
        )


class Scheduler:
    def __init__(
        self, deps: Deps, runs: RunFactory = GroupRun, resting: frozenset[Step] = RESTING
    ) -> None:
        self._deps = deps
        self._runs = runs
        self._resting = resting  # the steps that rest in the cloud (orchestrator/states.py)
        self._running: dict[str, asyncio.Task[None]] = {}
        self._cancels: dict[str, asyncio.Event] = {}
        self._wake = asyncio.Event()
        self._positions: dict[str, int] = {}
        self._not_before: dict[str, tuple[float, float]] = {}  # group -> (retry at, last delay)
        self._holds = 0  # resets at work: no run starts while above 0
        self._leases: dict[str, Lease] = {}  # the lease of each run in ``_running``

    def wake(self) -> None:
        self._wake.set()

    def cancel_here(self, group_id: str) -> None:
        """A cancel command reached this appliance: tell a local run at once."""
        event = self._cancels.get(group_id)
        if event is not None:
            event.set()

    @property
    def running_groups(self) -> list[str]:
        return sorted(self._running)

    async def run(self, stop: asyncio.Event) -> None:
        try:
            while not stop.is_set():
                try:
                    await self.tick()
                except TransientError as error:
                    log.warning("scheduler tick failed; retrying", error=str(error))
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(
                        first_of(self._wake.wait(), stop=stop),
                        timeout=self._deps.config.scheduler_tick_s,
                    )
        finally:
            await self.stop_all()

    async def stop_all(self) -> None:
        """Stop local runs (they resume from their checkpoints, here or elsewhere).

        A run still going a second after its cancel is cancelled again: a cancel can be
        lost (Python 3.11's ``wait_for`` drops one that races its inner future finishing),
        and a resting run, which never ends by itself, would then hold the stop forever."""
        tasks = list(self._running.values())
        pending = set(tasks)
        while pending:
            for task in pending:
                task.cancel()
            _, pending = await asyncio.wait(pending, timeout=STOP_RECANCEL_S)
            if pending:
                log.warning("runs still going after a cancel: cancelled again", runs=len(pending))
        await asyncio.gather(*tasks, return_exceptions=True)
        for group_id, task in list(self._running.items()):
            if task in tasks:  # cancelled before its first step: its ``finally`` never ran
                await self._forget(group_id)

    async def _forget(self, group_id: str) -> None:
        """What ``_supervise``'s ``finally`` does, for a run that never started."""
        lease = self._leases.pop(group_id, None)
        try:
            if lease is not None:
                with contextlib.suppress(TransientError):
                    await self._deps.leases.release(lease)
        finally:
            self._running.pop(group_id, None)
            self._cancels.pop(group_id, None)
            self.wake()

    @contextlib.asynccontextmanager
    async def held(self) -> AsyncIterator[None]:
        """No run starts here meanwhile (a reset at work): the local runs are stopped first;
        a tick under way lets go of any lease it takes, later ticks do nothing."""
        self._holds += 1
        try:
            await self.stop_all()
            yield
        finally:
            self._holds -= 1
            self.wake()

    async def _let_go_if_held(self, lease: Lease) -> bool:
        """A lease a tick took while the scheduler is held goes back at once."""
        if not self._holds:
            return False
        with contextlib.suppress(TransientError):
            await self._deps.leases.release(lease)
        return True

    async def tick(self) -> None:
        if self._holds:
            return
        views = await self._views()
        await self._resume_orphans(views)
        queued = [v for v in views if v.queued and v.info.group_id not in self._running]
        if queued:
            await self._admit(queued, views)

    async def _views(self) -> list[GroupView]:
        migrations = self._deps.migrations
        views = []
        for group_id in await migrations.active_groups():
            info = await migrations.group(group_id)
            if info is None:
                await migrations.finish_group(group_id)
                continue
            members = await migrations.get_many(list(info.members))
            view = GroupView(info, tuple(members))
            if view.finished and group_id not in self._running:
                await migrations.finish_group(group_id)
                continue
            views.append(view)
        return sorted(views, key=lambda v: v.info.admission)

    def _backing_off(self, group_id: str) -> bool:
        retry_at, _ = self._not_before.get(group_id, (0.0, 0.0))
        return self._deps.clock.monotonic() < retry_at

    def _back_off(self, group_id: str, longest: float = 300.0) -> None:
        """A run that died of a defect is retried, but ever more slowly (up to 5 min); one
        that paused (Redis away, a disk still held by its previous owner) up to ``longest``."""
        _, delay = self._not_before.get(group_id, (0.0, 0.0))
        delay = min(longest, max(1.0, delay * 2))
        self._not_before[group_id] = (self._deps.clock.monotonic() + delay, delay)

    def _hold_off(self, group_id: str, seconds: float) -> None:
        """Leave a group alone for a while (after losing it: the new owner needs the time
        to open what this process just let go of; it is the likelier healthy one)."""
        self._not_before[group_id] = (self._deps.clock.monotonic() + seconds, 0.0)

    async def _resume_orphans(self, views: list[GroupView]) -> None:
        for view in views:
            if view.queued or view.info.group_id in self._running:
                continue
            if self._backing_off(view.info.group_id):
                continue
            lease = await self._deps.leases.acquire(group_lease(view.info.group_id))
            if lease is not None and not await self._let_go_if_held(lease):
                log.info("taking over group", group_id=view.info.group_id, token=lease.token)
                self._start(view.info, lease)

    async def _admit(self, queued: list[GroupView], views: list[GroupView]) -> None:
        leases = self._deps.leases
        admission = await leases.acquire(ADMISSION)
        if admission is None:
            return  # another appliance is admitting right now
        try:
            room = Room(self._deps.policies, _running_records(views), self._resting)
            for view in queued:
                members = [load(m.record) for m in view.members]
                if not view.cancel_requested and not await room.fits(members):
                    continue  # a limit it needs is full: it waits, in order, on that limit
                lease = await leases.acquire(group_lease(view.info.group_id))
                if lease is None or await self._let_go_if_held(lease):
                    continue
                if not view.cancel_requested:
                    await self._mark_admitted(view, lease)
                    room.take(members)
                if not await self._let_go_if_held(lease):  # a hold began meanwhile
                    self._start(view.info, lease)
            await self._announce_positions(
                [v for v in queued if v.info.group_id not in self._running]
            )
        finally:
            await leases.release(admission)

    async def _mark_admitted(self, view: GroupView, lease: Lease) -> None:
        journal = Journal(self._deps, lease)
        for member in view.members:
            record = load(member.record)
            if record.step is Step.QUEUED:
                await journal.advance(record, Step.PREPARING)

    async def _announce_positions(self, waiting: list[GroupView]) -> None:
        """Tell queued migrations their place in line when it changes."""
        position = 0
        for view in waiting:
            for member in view.members:
                position += 1
                if self._positions.get(member.migration_id) != position:
                    self._positions[member.migration_id] = position
                    record: MigrationRecord = load(member.record)
                    await self._deps.reporter.publish(record, queue_position=position)

    def _start(self, info: GroupInfo, lease: Lease) -> None:
        cancel = self._cancels.setdefault(info.group_id, asyncio.Event())
        run = self._runs(self._deps, lease, info, cancel)
        keeper = LeaseKeeper(self._deps.leases, lease)
        task = asyncio.create_task(self._supervise(info, keeper, run, lease))
        self._running[info.group_id] = task
        self._leases[info.group_id] = lease

    async def _let_go(self, group: GroupInfo) -> None:
        """Close what this process holds open for a group it lost (disks, exports), so the
        new owner can open them. Touches neither Redis nor the data: it only lets go."""
        deps = self._deps
        try:
            for stored in await deps.migrations.get_many(list(group.members)):
                record = load(stored.record)
                await deps.site(record.site).release(record.vm_id)
                for disk in record.disks:
                    await deps.cloud.unexport(disk.volume_id)
                    await deps.site(record.target_site).release_volume(disk.volume_id)
        except FerryError as error:
            log.warning("lost group not let go", group_id=group.group_id, error=str(error))

    async def _supervise(
        self, info: GroupInfo, keeper: LeaseKeeper, run: Run, lease: Lease
    ) -> None:
        group_id = info.group_id
        try:
            await keeper.run(run.run)
        except LeaseLost:
            log.warning("lease lost; another appliance carries on", group_id=group_id)
            await self._let_go(info)
            self._hold_off(group_id, LOST_HOLD_S)
        except TransientError as error:
            log.warning("group paused; will resume", group_id=group_id, error=str(error))
            self._back_off(group_id, longest=PAUSED_RETRY_S)
        except Exception:
            log.exception("group run failed unexpectedly; retrying later", group_id=group_id)
            self._back_off(group_id)
        else:
            self._not_before.pop(group_id, None)
        finally:
            # Release before leaving the running set: a tick in between would take the
            # lease again with the same token, and this late release would delete it.
            try:
                with contextlib.suppress(TransientError):
                    await self._deps.leases.release(lease)
            finally:
                self._running.pop(group_id, None)
                self._leases.pop(group_id, None)
                self._cancels.pop(group_id, None)
                self.wake()


def _running_records(views: list[GroupView]) -> list[MigrationRecord]:
    return [
        load(member.record)
        for view in views
        for member in view.members
        if Step(member.step) is not Step.QUEUED and Step(member.step) not in TERMINAL
    ]
