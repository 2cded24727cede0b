"""Writing down a group's progress: every step persisted, fenced by the lease, then announced."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from typing import Any

from appliance.orchestrator.context import Deps
from appliance.orchestrator.record import MigrationRecord, dump, load
from appliance.orchestrator.states import Step, check_transition, public_state
from appliance.state.leases import Lease


class Journal:
    """The only writer of a group's migration records while it holds the group's lease."""

    def __init__(self, deps: Deps, lease: Lease) -> None:
        self._deps = deps
        self._lease = lease

    @property
    def lease(self) -> Lease:
        return self._lease

    def _now(self) -> str:
        return self._deps.clock.now().isoformat()

    async def advance(self, record: MigrationRecord, step: Step, **changes: Any) -> MigrationRecord:
        """Persist ``record`` at ``step`` (compare-and-set on its step), then announce it."""
        check_transition(f"migration {record.migration_id}", record.step, step)
        updated = replace(record, step=step, updated_at=self._now(), **changes)
        await self._write(record, updated)
        await self._deps.events.append(
            "step",
            updated.updated_at,
            migration_id=record.migration_id,
            step=step.value,
            previous=record.step.value,
            error=updated.error_code,
        )
        await self._deps.reporter.publish(updated, await self.cancel_requested(record))
        if self._deps.config.step_delay_s:
            await asyncio.sleep(self._deps.config.step_delay_s)
        return updated

    async def update(self, record: MigrationRecord, **changes: Any) -> MigrationRecord:
        """Persist changes that keep the step (progress, what a step learned)."""
        updated = replace(record, updated_at=self._now(), **changes)
        await self._write(record, updated)
        return updated

    async def _write(self, old: MigrationRecord, new: MigrationRecord) -> None:
        await self._deps.migrations.transition(
            old.migration_id,
            expected=old.step.value,
            step=new.step.value,
            old_public=public_state(old.step, False).value,
            public=public_state(new.step, False).value,
            record=dump(new),
            lease_resource=self._lease.resource,
            token=self._lease.token,
        )

    async def cancel_requested(self, record: MigrationRecord) -> bool:
        stored = await self._deps.migrations.get(record.migration_id)
        return stored is not None and stored.cancel_requested

    async def reload(self, record: MigrationRecord) -> MigrationRecord:
        stored = await self._deps.migrations.get(record.migration_id)
        return load(stored.record) if stored is not None else record
