"""Driving one dependency group (a lone VM is a group of one) through the cold workflow.

Members go through the steps up to VERIFYING side by side. The cut-over
steps (create the cloud VM, power it on, finalize) are then taken by every
member in turn, step by step, so the group cuts over together or not at all:
any failure or cancel before FINALIZING rolls every member back.

On a restart the run picks up from the persisted steps: an interrupted step's
action runs again (each is idempotent), members already at a cut-over step
wait for the others, and a group found rolling back finishes rolling back.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable

from appliance.errors import (
    FerryError,
    LeaseLost,
    MigrationCancelled,
    OutOfSpace,
    PermanentError,
    TransferCancelled,
    TransientError,
)
from appliance.logs import get_logger
from appliance.orchestrator import steps, tags
from appliance.orchestrator.context import Deps
from appliance.orchestrator.copying import DiskCopy
from appliance.orchestrator.journal import Journal
from appliance.orchestrator.record import MigrationRecord, load
from appliance.orchestrator.resume import snapshot_step
from appliance.orchestrator.states import CUTOVER, FORWARD, TERMINAL, Step, next_step
from appliance.state.leases import Lease
from appliance.state.migrations import GroupInfo

log = get_logger(__name__)
Action = Callable[[Deps, Journal, MigrationRecord], Awaitable[MigrationRecord]]
CUTOVER_ORDER = (Step.CREATING_TARGET, Step.POWERING_ON, Step.FINALIZING)
NO_ROLLBACK = frozenset({Step.FINALIZING, Step.COMPLETED})


class GroupRun:
    def __init__(self, deps: Deps, lease: Lease, group: GroupInfo, cancel: asyncio.Event) -> None:
        self._deps = deps
        self._journal = Journal(deps, lease)
        self._group = group
        self._cancel = cancel
        self._records: dict[str, MigrationRecord] = {}
        self._failed: str | None = None  # the member whose step failed first
        self._log = log.bind(group_id=group.group_id)

    async def run(self) -> None:
        stored = await self._deps.migrations.get_many(list(self._group.members))
        self._records = {s.migration_id: load(s.record) for s in stored}
        if any(s.cancel_requested for s in stored):
            self._cancel.set()
        watcher = asyncio.create_task(self._watch_cancel())
        try:
            await self._drive()
        finally:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
        if all(record.step in TERMINAL for record in self._records.values()):
            await self._deps.migrations.finish_group(self._group.group_id)

    async def _drive(self) -> None:
        records = list(self._records.values())
        if any(r.step in (Step.ROLLING_BACK, Step.FAILED, Step.CANCELLED) for r in records):
            await self._rollback_all(None)
            return
        try:
            if not any(r.step in CUTOVER or r.step is Step.COMPLETED for r in records):
                await self._until_verified()
            await self._cut_over()
        except (LeaseLost, TransientError):
            raise  # another owner, or a later run of ours, carries on from the checkpoint
        except MigrationCancelled:
            await self._rollback_all(None)
        except PermanentError as error:
            await self._rollback_all(error)
        except Exception as error:  # a defect: roll back rather than retry it forever
            self._log.exception("unexpected error; rolling the group back")
            await self._rollback_all(error)

    # -- forward ------------------------------------------------------------------

    async def _until_verified(self) -> None:
        """Every member up to VERIFYING, side by side; the first failure stops them all."""
        try:
            async with asyncio.TaskGroup() as tasks:
                for migration_id in self._records:
                    tasks.create_task(self._member_until_verified(migration_id))
        except BaseExceptionGroup as group:
            raise _first(group) from None

    async def _member_until_verified(self, migration_id: str) -> None:
        while True:
            self._check_cancel()
            record = self._records[migration_id]
            if record.step is Step.QUEUED:
                record = await self._advance(record, Step.PREPARING)
            await self._act(record)
            if self._records[migration_id].step is Step.VERIFYING:
                return
            await self._advance(self._records[migration_id], next_step(record.step))

    async def _cut_over(self) -> None:
        for step in CUTOVER_ORDER:
            if step is Step.FINALIZING:
                await self._mark_cut_over()
            for migration_id in self._records:
                record = self._records[migration_id]
                if FORWARD.index(record.step) > FORWARD.index(step):
                    continue
                if step is not Step.FINALIZING:
                    self._check_cancel()
                if record.step is not step:
                    record = await self._advance(record, step)
                await self._act(record)
        for record in list(self._records.values()):
            if record.step is Step.FINALIZING:
                await self._advance(record, Step.COMPLETED, bytes_done=record.bytes_total)

    async def _mark_cut_over(self) -> None:
        """Every member's source says the cloud copy is the finished one, before any of them
        finalizes: a cleanup without Redis then finishes the whole group, never half of it."""
        for record in self._records.values():
            if record.step is not Step.COMPLETED:
                await self._deps.site(record.site).tag_vm(record.vm_id, {tags.STAGE: tags.CUTOVER})

    async def _act(self, record: MigrationRecord) -> None:
        try:
            if record.step is Step.TRANSFERRING:
                done = await DiskCopy(self._deps, self._journal, record, self._cancel).run()
            else:
                done = await ACTIONS[record.step](self._deps, self._journal, record)
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

    async def _watch_cancel(self) -> None:
        while not self._cancel.is_set():
            await asyncio.sleep(self._deps.config.cancel_poll_s)
            stored = await self._deps.migrations.get_many(list(self._group.members))
            if any(s.cancel_requested for s in stored):
                self._cancel.set()

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
            if record.step in TERMINAL or record.step in NO_ROLLBACK:
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


ACTIONS: dict[Step, Action] = {
    Step.PREPARING: steps.prepare,
    Step.POWERING_OFF: steps.power_off,
    Step.SNAPSHOTTING: snapshot_step,
    Step.VERIFYING: steps.verify,
    Step.CREATING_TARGET: steps.create_target,
    Step.POWERING_ON: steps.power_on,
    Step.FINALIZING: steps.finalize,
}
