"""Writing down a group's progress: every step persisted, fenced by the lease, then announced.

Every Redis write a group's run makes goes through its journal (or a store it
hands out), fenced by the group's lease: the records and their step events,
the transfer checkpoints, the VM unlock and the removal of sealed credentials.
A write refused because the lease moved on raises FencedOut and marks the
lease lost, which stops the whole run.
"""

from __future__ import annotations

import asyncio
from dataclasses import replace
from typing import Any

from appliance.datapath.checkpoint import CheckpointStore
from appliance.orchestrator.context import Deps
from appliance.orchestrator.record import MigrationRecord, dump, load
from appliance.orchestrator.states import Step, machine_for, public_state
from appliance.state.events import encode_entry
from appliance.state.leases import Lease


class Journal:
    """The only writer of a group's migration records while it holds the group's lease."""

    def __init__(self, deps: Deps, lease: Lease) -> None:
        self._deps = deps
        self._lease = lease

    @property
    def lease(self) -> Lease:
        return self._lease

    def now(self) -> str:
        return self._deps.clock.now().isoformat()

    async def advance(self, record: MigrationRecord, step: Step, **changes: Any) -> MigrationRecord:
        """Persist ``record`` at ``step`` with its event (compare-and-set), then announce it."""
        machine = machine_for(record.migration_type)
        machine.check(f"{machine.name} migration {record.migration_id}", record.step, step)
        updated = replace(record, step=step, updated_at=self.now(), **changes)
        event = encode_entry(
            "step",
            updated.updated_at,
            record.migration_id,
            {"step": step.value, "previous": record.step.value, "error": updated.error_code},
        )
        await self._write(record, updated, event)
        await self._deps.reporter.publish(updated, await self.cancel_requested(record))
        if self._deps.config.step_delay_s:
            await asyncio.sleep(self._deps.config.step_delay_s)
        return updated

    async def update(self, record: MigrationRecord, **changes: Any) -> MigrationRecord:
        """Persist changes that keep the step (progress, what a step learned)."""
        updated = replace(record, updated_at=self.now(), **changes)
        await self._write(record, updated)
        return updated

    async def _write(
        self, old: MigrationRecord, new: MigrationRecord, event: dict[str, str] | None = None
    ) -> None:
        await self._deps.migrations.transition(
            old.migration_id,
            expected=old.step.value,
            step=new.step.value,
            old_public=public_state(old.step, False).value,
            public=public_state(new.step, False).value,
            record=dump(new),
            lease=self._lease,
            event=event,
        )

    def checkpoints(self, transfer_id: str) -> CheckpointStore:
        """A transfer's checkpoint, fenced by this journal's lease."""
        return self._deps.checkpoints(transfer_id, self._lease)

    async def unlock_vm(self, record: MigrationRecord) -> None:
        await self._deps.migrations.unlock_vm(
            record.site, record.vm_id, record.migration_id, self._lease
        )

    async def delete_secret(self, record: MigrationRecord) -> None:
        await self._deps.migrations.delete_secret(record.migration_id, self._lease)

    async def cancel_requested(self, record: MigrationRecord) -> bool:
        stored = await self._deps.migrations.get(record.migration_id)
        return stored is not None and stored.cancel_requested

    async def reload(self, record: MigrationRecord) -> MigrationRecord:
        stored = await self._deps.migrations.get(record.migration_id)
        return load(stored.record) if stored is not None else record
