"""Driving one dependency group (a lone VM is a group of one) through its type's machine.

The machine (``states.Machine``: one table per migration type) says which
steps members take on their own, side by side (``solo``: up to VERIFYING for
cold, OPENING_DISKS for tbc), and which the group takes together: every
member through each step in turn, so the group cuts over together or not at
all. Any failure or cancel before a step of ``no_rollback`` rolls every
member back. A machine with a resting step (tbc: RUNNING_IN_CLOUD) rests
there (``resting.Resting``: epochs on time and on request) until a migrate
back is asked for, then takes the way back together, step by step.

On a restart the run picks up from the persisted steps: an interrupted step's
action runs again (each is idempotent), members already at a together step
wait for the others, and a group found rolling back finishes rolling back.

A recovery asked of the group (a component it depends on is lost: ``recovery.py``) ends
the run at once, wherever it is; the next run, under a new fencing token, takes the group
down the recovery path instead.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable

from appliance.errors import (
    ComponentError,
    FerryError,
    LeaseLost,
    MigrationCancelled,
    OutOfSpace,
    PermanentError,
    StateStoreUnavailable,
    TransferCancelled,
    TransientError,
)
from appliance.logs import get_logger
from appliance.orchestrator import recovery, serve_steps, steps, tags, warm, warm_offline
from appliance.orchestrator.context import Deps
from appliance.orchestrator.copying import DiskCopy
from appliance.orchestrator.journal import Journal
from appliance.orchestrator.pausing import Pausing
from appliance.orchestrator.record import MigrationRecord, load
from appliance.orchestrator.resting import ASK_BACK, Resting
from appliance.orchestrator.resume import snapshot_step
from appliance.orchestrator.states import RECOVERY_ENDS, TERMINAL, Machine, Step, machine_for
from appliance.state.leases import Lease
from appliance.state.migrations import GroupInfo
from messages.common import MigrationType

log = get_logger(__name__)
Action = Callable[[Deps, Journal, MigrationRecord], Awaitable[MigrationRecord]]


class GroupRun:
    def __init__(self, deps: Deps, lease: Lease, group: GroupInfo, cancel: asyncio.Event) -> None:
        self._deps = deps
        self._journal = Journal(deps, lease)
        self._group = group
        self._cancel = cancel
        self._records: dict[str, MigrationRecord] = {}
        self._failed: str | None = None  # the member whose step failed first
        self._recovery_asked = False
        self._log = log.bind(group_id=group.group_id)

    async def run(self) -> None:
        stored = await self._deps.migrations.get_many(list(self._group.members))
        self._records = {s.migration_id: load(s.record) for s in stored}
        # Asked before this run gave any order: its token is newer than any the lost
        # component was given, so it may fence it.
        lost = await recovery.asked(self._deps, self._records)
        if lost is not None:
            await recovery.Recovery(self._deps, self._journal, self._records, lost).run()
        else:
            if any(s.cancel_requested for s in stored):
                self._cancel.set()
            await self._drive_watched()
        if all(record.step in TERMINAL for record in self._records.values()):
            await self._deps.migrations.finish_group(self._group.group_id)

    async def _drive_watched(self) -> None:
        """Drive, watching for a cancel and for a recovery asked meanwhile (which ends this
        run: the next one takes the lease with a new token)."""
        drive = asyncio.create_task(self._drive())
        watcher = asyncio.create_task(self._watch(drive))
        try:
            await drive
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if not self._recovery_asked or (current is not None and current.cancelling()):
                raise
            # Only the drive was cancelled, by the watcher: this run is over.
            self._log.warning("recovery asked: this run ends, the next one recovers")
        finally:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher

    @property
    def _machine(self) -> Machine:
        """A group comes from one request, so its members share one migration type."""
        return machine_for(next(iter(self._records.values())).migration_type)

    def _position(self, step: Step) -> int:
        machine = self._machine
        path = (*machine.forward, *machine.back)
        return path.index(step) if step in path else -1

    async def _drive(self) -> None:
        if len({r.migration_type for r in self._records.values()}) > 1:
            # A commit to warm cut short (a crash): the other members go on as warm too.
            await warm.go_warm(self._deps, self._journal, self._records)
        records = list(self._records.values())
        machine = self._machine
        if any(r.step in (Step.ROLLING_BACK, Step.FAILED, Step.CANCELLED) for r in records):
            await self._rollback_all(None)
            return
        recovered = [r for r in records if r.step in RECOVERY_ENDS]
        if recovered:  # members not yet on the components when it went back: rolled back
            lost = recovered[0]
            await self._rollback_all(
                ComponentError(
                    f"group member {lost.migration_id} went back: "
                    f"{lost.recovery_component} lost ({lost.recovery_reason})"
                )
            )
            return
        try:
            solo_end = self._position(machine.solo[-1])
            if all(self._position(r.step) <= solo_end for r in records):
                await self._until_solo_done()
            await self._together(machine.together, machine.arrive)
            if machine.resting is not None:
                await self._rest_then_back(machine)
        except (LeaseLost, TransientError):
            raise  # another owner, or a later run of ours, carries on from the checkpoint
        except MigrationCancelled:
            await self._rollback_all(None)
        except PermanentError as error:
            await self._rollback_all(error)
        except Exception as error:  # a defect: roll back rather than retry it forever
            self._log.exception("unexpected error; rolling the group back")
            await self._rollback_all(error)

    async def _rest_then_back(self, machine: Machine) -> None:
        resting = machine.resting
        if all(r.step is resting for r in self._records.values()):
            if resting is Step.CUT_OVER:  # warm: on its volumes until a commit
                await warm.until_commit(self._deps, self._records)
            else:
                await Resting(self._deps, self._journal, self._records).until_back()
        if resting is Step.RUNNING_IN_CLOUD and await self._committed():
            await warm.go_warm(self._deps, self._journal, self._records)
            await self._drive()  # as warm from here: bulk copy, reconcile, cutover, commit
            return
        await self._together(machine.back[:-1], machine.back[-1])

    async def _committed(self) -> bool:
        """Did the rest end by a commit (every member asked, none to migrate back)?"""
        for migration_id, record in self._records.items():
            if record.step is not Step.RUNNING_IN_CLOUD:
                return False
            asks = await self._deps.migrations.asks(migration_id)
            if warm.ASK_COMMIT not in asks or ASK_BACK in asks:
                return False
        return True

    # -- forward ------------------------------------------------------------------

    async def _until_solo_done(self) -> None:
        """Every member through its solo steps, side by side; the first failure stops them."""
        try:
            async with asyncio.TaskGroup() as tasks:
                for migration_id in self._records:
                    tasks.create_task(self._member_solo(migration_id))
        except BaseExceptionGroup as group:
            raise _first(group) from None

    async def _member_solo(self, migration_id: str) -> None:
        machine = self._machine
        while True:
            self._check_cancel()
            record = self._records[migration_id]
            if record.step is Step.QUEUED:
                record = await self._advance(record, Step.PREPARING)
            await self._act(record)
            if self._records[migration_id].step is machine.solo[-1]:
                return
            await self._advance(self._records[migration_id], machine.next_step(record.step))

    async def _together(self, path: tuple[Step, ...], arrive: Step) -> None:
        """Every member through each step of ``path`` in turn, then all to ``arrive``."""
        machine = self._machine
        for step in path:
            if step is _first_no_rollback(machine):
                await self._mark_cut_over()
            for migration_id in self._records:
                record = self._records[migration_id]
                if self._position(record.step) > self._position(step):
                    continue
                if step not in machine.no_rollback:
                    self._check_cancel()
                if record.step is not step:
                    record = await self._advance(record, step)
                await self._act(record)
        for record in list(self._records.values()):
            if self._position(record.step) < self._position(arrive):
                await self._advance(record, arrive, bytes_done=record.bytes_total)

    async def _mark_cut_over(self) -> None:
        """Every member's source says the cloud copy is the finished one, before any of them
        finalizes: a cleanup without Redis then finishes the whole group, never half of it."""
        for record in self._records.values():
            if record.step is not Step.COMPLETED:
                await self._deps.site(record.site).tag_vm(record.vm_id, {tags.STAGE: tags.CUTOVER})

    async def _step(self, record: MigrationRecord) -> MigrationRecord:
        if record.step is Step.TRANSFERRING:
            return await DiskCopy(self._deps, self._journal, record, self._cancel).run()
        action = ACTIONS.get(record.step, serve_steps.not_built)
        return await action(self._deps, self._journal, record)

    async def _act(self, record: MigrationRecord) -> None:
        board = self._deps.health
        try:
            if record.migration_type is MigrationType.COLD and board is not None:
                # A cold run waits out an outage of what it needs (orchestrator/pausing.py).
                pausing = Pausing(self._deps, self._journal, board, self._cancel)
                done = await pausing.run(record, self._step)
            else:
                done = await self._step(record)
        except TransferCancelled:
            raise MigrationCancelled(record.migration_id) from None
        except Exception as error:
            if self._failed is None and not isinstance(error, MigrationCancelled | TransientError):
                self._failed = record.migration_id
            raise
        self._records[record.migration_id] = done

    async def _advance(
        self, record: MigrationRecord, step: Step, **changes: object
    ) -> MigrationRecord:
        updated = await self._journal.advance(record, step, **changes)
        self._records[record.migration_id] = updated
        self._log.info("step", migration_id=record.migration_id, step=step.value)
        return updated

    def _check_cancel(self) -> None:
        if self._cancel.is_set():
            raise MigrationCancelled(self._group.group_id)

    async def _watch(self, drive: asyncio.Task[None]) -> None:
        while not drive.done():
            await asyncio.sleep(self._deps.config.cancel_poll_s)
            try:
                stored = await self._deps.migrations.get_many(list(self._group.members))
                records = {s.migration_id: load(s.record) for s in stored}
                lost = await recovery.asked(self._deps, records)
            except StateStoreUnavailable:
                continue  # the drive meets it too; the watch goes on
            if any(s.cancel_requested for s in stored):
                self._cancel.set()
            if lost is not None:
                self._recovery_asked = True
                await _cancel_until_done(drive)
                return

    # -- backward -----------------------------------------------------------------

    async def _rollback_all(self, error: FerryError | BaseException | None) -> None:
        outcome = Step.FAILED if error is not None else Step.CANCELLED
        failed = self._failed
        # Out of space: keep what was copied, and its checkpoints, for a resume once freed.
        keep = isinstance(error, OutOfSpace)
        for migration_id, record in list(self._records.items()):
            # Redis is the truth: a step that failed half-way may have saved more than we hold.
            record = await self._journal.reload(record)
            self._records[migration_id] = record
            if record.step in TERMINAL or not self._machine.rolls_back(record.step):
                continue
            if record.step is Step.QUEUED:
                await self._advance(record, Step.CANCELLED)
                await self._journal.unlock_vm(record)
                continue
            if record.step is not Step.ROLLING_BACK:
                code, message = _error_fields(error, migration_id == failed, failed)
                record = await self._advance(
                    record,
                    Step.ROLLING_BACK,
                    rollback_to=outcome,
                    error_code=code,
                    error_message=message,
                    keep_for_resume=keep,
                )
            if Step.OPENING_DISKS in self._machine.steps:  # components may serve its disks
                await serve_steps.close_served(self._deps, self._journal, record)
            await steps.rollback(self._deps, self._journal, record)
            await self._advance(record, record.rollback_to or outcome)


def _first(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The error that matters in a group: a real failure over the cancellations it caused."""
    leaves: list[BaseException] = []
    stack: list[BaseException] = [group]
    while stack:
        item = stack.pop()
        if isinstance(item, BaseExceptionGroup):
            stack.extend(reversed(item.exceptions))
        else:
            leaves.append(item)
    for kind in (PermanentError, TransientError, Exception):
        for leaf in leaves:
            if isinstance(leaf, kind) and not isinstance(leaf, MigrationCancelled):
                return leaf
    cancelled = [leaf for leaf in leaves if isinstance(leaf, MigrationCancelled)]
    return cancelled[0] if cancelled else leaves[0]


def _error_fields(
    error: FerryError | BaseException | None, own: bool, failed: str | None
) -> tuple[str | None, str | None]:
    if error is None:
        return "cancelled", "cancelled on request; the source VM is as it was"
    code = error.code.value if isinstance(error, FerryError) else "internal"
    if own or failed is None:
        return code, str(error)
    return "dependency_failed", f"group member {failed} failed: {error}"


def _first_no_rollback(machine: Machine) -> Step | None:
    """The step from which a forward path goes on whatever happens (cold: FINALIZING):
    before it, the sources are marked cut over."""
    return next((s for s in machine.together if s in machine.no_rollback), None)


ACTIONS: dict[Step, Action] = {
    # shared by every type
    Step.PREPARING: steps.prepare,
    Step.POWERING_OFF: steps.power_off,
    Step.SNAPSHOTTING: snapshot_step,
    Step.CREATING_TARGET: steps.create_target,
    Step.POWERING_ON: steps.power_on,
    # cold
    Step.VERIFYING: steps.verify,
    Step.FINALIZING: steps.finalize,
    # on the components (tbc, warm's first steps)
    Step.OPENING_DISKS: serve_steps.open_disks,
    Step.PARKING: serve_steps.park,
    # warm (orchestrator/warm.py)
    Step.BULK_COPYING: warm.bulk_copy,
    Step.AWAITING_BULK: warm_offline.await_bulk,
    Step.RECONCILING: warm.reconcile,
    Step.CUTTING_OVER: warm.cut_over,
    Step.COMMITTING: warm.commit,
    # the way back
    Step.BACK_POWERING_OFF: serve_steps.back_power_off,
    Step.BACK_FINAL_EPOCH: serve_steps.back_final_epoch,
    Step.BACK_REMOVING_CLOUD: serve_steps.back_remove_cloud,
    Step.BACK_RESTORING_DISKS: serve_steps.back_restore_disks,
    Step.BACK_RETURNING: serve_steps.back_return,
}
"""Every step's action; a step without one answers not_implemented."""


RECANCEL_S = 1.0


async def _cancel_until_done(drive: asyncio.Task[None]) -> None:
    """Cancel the drive, again each ``RECANCEL_S`` while it goes on: a cancel can be lost
    (Python 3.11's ``wait_for`` drops one that races its inner future finishing), and a
    resting drive, which never ends by itself, would then keep the VM in the cloud with its
    recovery asked and no run to do it (as the scheduler's ``stop_all`` does for a stop)."""
    while not drive.done():
        drive.cancel()
        await asyncio.wait({drive}, timeout=RECANCEL_S)
