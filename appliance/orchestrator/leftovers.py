"""Finding and undoing what unfinished migrations left behind, from the sites themselves.

After a reset or a state store that came back empty, Redis knows nothing of the
migrations that were in flight; the sites still hold their traces (see
:mod:`appliance.orchestrator.tags`): a tagged source VM (powered off, perhaps moved),
its ``ferry-<migration>`` snapshot, tagged cloud volumes, a cloud VM whose id is the
migration id. Runs must be stopped before this is called.

For each tagged source VM:

* before the cut-over: the cloud VM and every volume of the migration are removed,
  the snapshot is deleted, the VM goes back to its pool and power state (from its
  tags), and its tags are removed: the source is as it was;
* at or past the cut-over (tag ``ferry.stage=cutover``): the cloud copy is the
  finished one and is never touched; the source is finished as finalize would (the
  migrate pool, powered off, no snapshot).

Unattached volumes tagged with a migration that no source VM names any more are
removed too (a finished copy's volumes are attached to its cloud VM, never unattached).
Everything it does is returned, per migration, to be reported.

:class:`ResetCleanup` is what a ResetRequest runs around forgetting the records: stop
the local runs and note the unfinished migrations Redis still knows; bring home the VMs
the components serve (``reset_return``: to their last committed epoch, in the migrate
pool; a warm VM cut over keeps running on its volumes) while their records say where
everything is; then (records gone) stop runs again, undo the leftovers of the others,
and report each noted migration on its request's correlation id: failed (code
``reset``, saying what was done and, for a VM brought home, at which epoch), or
completed for one past its cut-over (one Redis had lost is reported from its source's
tags).
"""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field, replace

from appliance.errors import PermanentError, UnknownVm
from appliance.logs import get_logger
from appliance.orchestrator import tags
from appliance.orchestrator.context import Deps
from appliance.orchestrator.record import MigrationRecord, TransferOptions, load
from appliance.orchestrator.reset_return import (
    KEPT_IN_CLOUD,
    RETURNED,
    ROLLBACK,
    Returned,
    ReturnHome,
    kept_keys,
)
from appliance.orchestrator.states import TERMINAL, Step
from appliance.sites.model import VmConfig, VolumeInfo
from appliance.sites.protocol import Site
from messages.common import MigrationType, PowerState
from messages.events import ResetOutcome

log = get_logger(__name__)


@dataclass(frozen=True, slots=True)
class Undone:
    """What was done about one migration's leftovers."""

    migration_id: str
    vm_id: str
    actions: tuple[str, ...]
    error: str | None = None
    vm_name: str = ""
    request: tags.RequestTag | None = None  # from the source's tags: who asked for it
    finished: bool = False  # past the cut-over: the migration is complete, not undone
    outcome: ResetOutcome = ResetOutcome.UNDONE
    epoch: int | None = None  # returned: the committed epoch its disks were left at


@dataclass
class _Work:
    migration_id: str
    vm_id: str
    actions: list[str] = field(default_factory=list)
    vm_name: str = ""
    request: tags.RequestTag | None = None
    finished: bool = False
    outcome: ResetOutcome | None = None

    def done(self, error: str | None = None) -> Undone:
        return Undone(
            self.migration_id,
            self.vm_id,
            tuple(self.actions),
            error,
            self.vm_name,
            self.request,
            self.finished,
            self.outcome or (ResetOutcome.KEPT_IN_CLOUD if self.finished else ResetOutcome.UNDONE),
        )


class Leftovers:
    def __init__(self, deps: Deps, onprem: str = "onprem", cloud: str = "cloud") -> None:
        self._deps = deps
        self._onprem = onprem
        self._cloud = cloud

    async def undo_all(self, handled: frozenset[str] = frozenset()) -> list[Undone]:
        """``handled``: migrations the reset already brought home or kept (reset_return)."""
        onprem = self._deps.site(self._onprem)
        volumes = await self._deps.site(self._cloud).list_volumes()
        results: list[Undone] = []
        pending: set[str] = set(handled)
        for vm in await onprem.list_vms():
            migration_id = tags.pending_migration(vm)
            if migration_id is None or migration_id in handled:
                continue
            pending.add(migration_id)
            results.append(await self._one(vm, migration_id, volumes))
        results.extend(await self._stray_volumes(volumes, pending))
        for undone in results:
            log.warning(
                "leftovers of an unfinished migration handled",
                migration_id=undone.migration_id,
                vm_id=undone.vm_id,
                actions=list(undone.actions),
                error=undone.error,
            )
        return results

    async def _one(self, vm: VmConfig, migration_id: str, volumes: list[VolumeInfo]) -> Undone:
        work = _Work(migration_id, vm.vm_id, vm_name=vm.name, request=tags.RequestTag.of(vm))
        try:
            if await self._on_cache(migration_id):
                await self._home_without_record(vm, migration_id, volumes, work)
                return work.done(_components_keep_disks(migration_id))
            if vm.tag(tags.STAGE) == tags.CUTOVER:
                await self._finish(vm, work)
            else:
                await self._undo_cloud(migration_id, volumes, work)
                await self._restore_source(vm, work)
        except PermanentError as error:
            # The tags stay: a later reset tries again. Redis being down is not caught here.
            return work.done(f"{type(error).__name__}: {error}")
        return work.done()

    async def _on_cache(self, migration_id: str) -> bool:
        """Does its cloud VM run on the cache's exports (tbc, or warm before its cut-over)?"""
        try:
            vm = await self._deps.site(self._cloud).get_vm(migration_id)
        except UnknownVm:
            return False
        return any(disk.nbd_export for disk in vm.disks)

    async def _home_without_record(
        self, vm: VmConfig, migration_id: str, volumes: list[VolumeInfo], work: _Work
    ) -> None:
        """Its record is lost, so its disks cannot be taken back from the components (no
        order can be given without its token): the cloud VM goes (the guest stops writing),
        the source waits powered off in the migrate pool with its snapshot, never powered
        on nor stripped of the snapshot while the I/O manager may hold its disks."""
        await self._undo_cloud(migration_id, volumes, work)
        onprem = self._deps.site(self._onprem)
        if vm.power_state is not PowerState.OFF:
            await onprem.set_power(vm.vm_id, PowerState.OFF)
        pool = self._deps.config.migrate_pool
        if vm.resource_pool != pool:
            await onprem.move_to_pool(vm.vm_id, pool)
        work.actions.append(f"on-prem VM powered off in {pool}, its snapshot kept")
        await onprem.tag_vm(vm.vm_id, tags.cleared())  # a later reset must not undo it
        work.outcome = ResetOutcome.RETURNED

    async def _undo_cloud(self, migration_id: str, volumes: list[VolumeInfo], work: _Work) -> None:
        cloud = self._deps.site(self._cloud)
        mine = [v for v in volumes if _belongs(v, migration_id)]
        for volume in mine:
            await self._deps.cloud.unexport(volume.volume_id)
        try:
            await cloud.get_vm(migration_id)  # the cloud VM's id is the migration id
        except UnknownVm:
            pass
        else:
            await cloud.delete_vm(migration_id)
            work.actions.append(f"deleted cloud VM {migration_id}")
        for volume in mine:
            await cloud.delete_volume(volume.volume_id)
            work.actions.append(f"deleted cloud volume {volume.volume_id}")

    async def _restore_source(self, vm: VmConfig, work: _Work) -> None:
        onprem = self._deps.site(self._onprem)
        await self._drop_snapshot(onprem, vm, work)
        prior_pool = vm.tag(tags.PRIOR_POOL)
        if prior_pool and vm.resource_pool != prior_pool:
            await onprem.move_to_pool(vm.vm_id, prior_pool)
            work.actions.append(f"moved source VM back to pool {prior_pool}")
        if vm.tag(tags.PRIOR_POWER) == PowerState.ON.value and vm.power_state is not PowerState.ON:
            await onprem.set_power(vm.vm_id, PowerState.ON)
            work.actions.append("powered source VM back on")
        await onprem.tag_vm(vm.vm_id, tags.cleared())
        await onprem.release(vm.vm_id)

    async def _finish(self, vm: VmConfig, work: _Work) -> None:
        """Past the cut-over: what finalize does, and nothing to the cloud copy."""
        onprem = self._deps.site(self._onprem)
        pool = self._deps.config.migrate_pool
        if vm.resource_pool != pool:
            await onprem.move_to_pool(vm.vm_id, pool)
            work.actions.append(f"moved source VM to pool {pool} (migration had cut over)")
        await self._drop_snapshot(onprem, vm, work)
        await onprem.tag_vm(vm.vm_id, tags.cleared())
        await onprem.release(vm.vm_id)
        work.actions.append("kept the finished cloud copy")
        work.finished = True

    @staticmethod
    async def _drop_snapshot(onprem: Site, vm: VmConfig, work: _Work) -> None:
        for name in await onprem.vm_snapshot_names(vm.vm_id):
            if tags.is_snapshot_of(name, work.migration_id):
                await onprem.delete_vm_snapshot(vm.vm_id, name)
                work.actions.append(f"deleted source snapshot {name}")

    async def _stray_volumes(self, volumes: list[VolumeInfo], pending: set[str]) -> list[Undone]:
        """Unattached volumes of a migration no source names: never part of a finished copy."""
        cloud = self._deps.site(self._cloud)
        strays: dict[str, _Work] = {}
        for volume in volumes:
            migration_id = volume.tag(tags.MIGRATION)
            if migration_id is None or migration_id in pending or volume.attached_to is not None:
                continue
            work = strays.setdefault(
                migration_id, _Work(migration_id, volume.tag(tags.SOURCE_VM) or "")
            )
            await self._deps.cloud.unexport(volume.volume_id)
            await cloud.delete_volume(volume.volume_id)
            work.actions.append(f"deleted unattached cloud volume {volume.volume_id}")
        return [work.done() for work in strays.values()]


def _components_keep_disks(migration_id: str) -> str:
    return (
        "its record was lost with the state store, so the cache and the I/O manager could "
        "not be told to let go of its disks: its cloud VM is gone and its source is parked, "
        "but its disks are the I/O manager's until it closes them; stop both components and "
        f"remove the disks {migration_id}-* from their data directories before powering "
        "the VM on or migrating it again"
    )


def _belongs(volume: VolumeInfo, migration_id: str) -> bool:
    """Tagged with the migration, or (a crash between creating and tagging) named after it."""
    return volume.tag(tags.MIGRATION) == migration_id or volume.volume_id.startswith(
        f"{migration_id}-"
    )


RESET_CODE = "reset"
STATE_LOST_CODE = "state_lost"


class ResetCleanup:
    """The orchestrator's part of a reset, before and after the records are forgotten."""

    def __init__(
        self,
        deps: Deps,
        stop_runs: Callable[[], Awaitable[None]],
        hold_runs: Callable[[], AbstractAsyncContextManager[None]] | None = None,
    ) -> None:
        self._deps = deps
        self._stop_runs = stop_runs
        self._hold_runs = hold_runs
        self._down: set[str] = set()

    def runs_held(self) -> AbstractAsyncContextManager[None]:
        """For the whole reset: this process starts no run (the scheduler's ``held``), so
        the reset takes each group's lease without racing the scheduler's own resumes."""
        if self._hold_runs is None:
            return contextlib.nullcontext()
        return self._hold_runs()

    async def stop(self) -> list[MigrationRecord]:
        """Stop local runs; the unfinished migrations Redis knows of (none if it lost them)."""
        await self._stop_runs()
        return await self._unfinished()

    async def _unfinished(self) -> list[MigrationRecord]:
        migrations = self._deps.migrations
        unfinished: list[MigrationRecord] = []
        for group_id in await migrations.active_groups():
            info = await migrations.group(group_id)
            if info is None:
                continue
            for stored in await migrations.get_many(list(info.members)):
                record = load(stored.record)
                if record.step not in TERMINAL:
                    unfinished.append(record)
        return unfinished

    async def bring_home(self, unfinished: Sequence[MigrationRecord]) -> list[Returned]:
        """Records still known: the VMs the components serve go home or stay cut over, and
        the components let go of their disks (``reset_return``)."""
        home = ReturnHome(self._deps, self._stop_runs)
        returned = await home.run(unfinished)
        self._down |= home.down
        return returned

    @property
    def components_down(self) -> list[str]:
        return sorted(self._down)

    def keeps(self, key: str) -> bool:
        """A key the reset leaves (component heartbeats; a down component's orders)."""
        exact, prefixes = kept_keys(self._deps.store.keys, self._down)
        return key in exact or key.startswith(prefixes)

    async def undo(
        self, unfinished: Sequence[MigrationRecord], returned: Sequence[Returned] = ()
    ) -> list[Undone]:
        """Records forgotten: stop what the scheduler resumed meanwhile, undo, report."""
        await self._stop_runs()
        handled = frozenset(r.migration_id for r in returned if r.how != ROLLBACK)
        undone = _merged(await Leftovers(self._deps).undo_all(handled), returned)
        done = {item.migration_id: item for item in undone}
        now = self._deps.clock.now().isoformat()
        for record in unfinished:
            item = done.pop(record.migration_id, None)
            await self._report(record, item, RESET_CODE, now)
        for item in done.values():  # Redis had lost it: the source's tags say who asked
            rebuilt = _record_from_tags(item, now)
            if rebuilt is not None:
                await self._report(rebuilt, item, STATE_LOST_CODE, now)
        return undone

    async def _report(
        self, record: MigrationRecord, item: Undone | None, code: str, now: str
    ) -> None:
        if item is not None and item.finished and item.error is None:
            # It had cut over: the cloud copy is the finished one, the migration completed.
            done = replace(
                record, step=Step.COMPLETED, bytes_done=record.bytes_total, updated_at=now
            )
            await self._deps.reporter.publish(done)
            return
        what = "; ".join(item.actions) if item and item.actions else "nothing was left"
        if item is not None and item.outcome is ResetOutcome.RETURNED:
            at = "an unknown epoch" if item.epoch is None else f"epoch {item.epoch}"
            what = f"brought home to {at} (no final epoch): {what}"
        if item is not None and item.error:
            what = f"{what}; {item.error}"
        why = "reset" if code == RESET_CODE else "reset after the state store lost its data"
        failed = replace(
            record,
            step=Step.FAILED,
            error_code=code,
            error_message=f"the appliance was {why} while this migration ran: {what}"[:4000],
            updated_at=now,
        )
        await self._deps.reporter.publish(failed)


def _merged(undone: list[Undone], returned: Sequence[Returned]) -> list[Undone]:
    """One entry per migration: what the reset did on the components, then on the sites."""
    found = {item.migration_id: item for item in undone}
    merged: list[Undone] = []
    for item in returned:
        sites = found.pop(item.migration_id, None)
        actions = (*item.actions, *(sites.actions if sites else ()))
        error = item.error or (sites.error if sites else None)
        outcome = {
            ROLLBACK: ResetOutcome.UNDONE,
            RETURNED: ResetOutcome.RETURNED,
            KEPT_IN_CLOUD: ResetOutcome.KEPT_IN_CLOUD,
        }[item.how]
        merged.append(
            Undone(
                item.migration_id,
                item.vm_id,
                actions,
                error,
                item.vm_name,
                sites.request if sites else None,
                finished=item.how == KEPT_IN_CLOUD,
                outcome=outcome,
                epoch=item.epoch,
            )
        )
    return merged + [item for item in undone if item.migration_id in found]


def _record_from_tags(item: Undone, now: str) -> MigrationRecord | None:
    """What a report needs of a migration Redis forgot, rebuilt from its source's tags."""
    request = item.request
    if request is None or request.migration_type not in set(MigrationType):
        return None
    return MigrationRecord(
        migration_id=item.migration_id,
        request_id=request.request_id,
        correlation_id=request.correlation_id,
        group_id=request.group_id,
        admission=0,
        site="onprem",
        vm_id=item.vm_id,
        vm_name=item.vm_name,
        migration_type=MigrationType(request.migration_type),
        step=Step.FAILED,
        target_site="cloud",
        target_pool=None,
        target_name=item.vm_name,
        network_map=(),
        options=TransferOptions(),
        disks=(),
        created_at=now,
        updated_at=now,
    )
