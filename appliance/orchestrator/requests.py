"""Turning a SourceCloneRequest into queued migrations, once, whatever the redeliveries.

Migration ids are derived from the request id and the VM, so a handler that
runs twice (a redelivery after a crash) finds and reuses what the first run
made: the same VM locks, the same records. Everything is checked before
anything is created: unknown VMs, VMs already migrating, dependency groups
that name VMs outside the request all reject the whole request.

A VM lock is taken *pending* (it lapses by itself) and becomes permanent with
its migration's record; a request that fails after locking (rejected, or a
defect the dispatcher dead-letters) drops its pending locks at once.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

from appliance.components.heartbeat import ComponentHealth, Liveness
from appliance.components.orders import ComponentId
from appliance.errors import CommandRejected, Conflict, TransientError, WrongStep
from appliance.orchestrator.context import Deps
from appliance.orchestrator.record import DiskPlan, MigrationRecord, TransferOptions, dump, load
from appliance.orchestrator.states import (
    MIGRATING_BACK,
    RESTING,
    TERMINAL,
    Step,
    machine_for,
    public_state,
)
from appliance.orchestrator.volumes import check_free, component_id, naming, planned_volumes
from appliance.sites.model import VmConfig
from appliance.sites.protocol import Site
from appliance.state.migrations import NewMigration
from messages.commands import SourceCloneRequest, SourceCloneRequestBody, VmRef
from messages.common import BulkTransferMode, MigrationType
from messages.errors import ErrorCode
from messages.events import SourceCloneResponse


def _digest(*parts: str) -> str:
    return hashlib.sha256("\x00".join(parts).encode()).hexdigest()[:16]


def migration_id_for(request_id: str, vm_id: str) -> str:
    return f"m-{_digest(request_id, vm_id)}"


def group_id_for(request_id: str, vm_ids: Sequence[str]) -> str:
    return f"g-{_digest(request_id, *sorted(vm_ids))}"


async def find_vm(site: Site, ref: VmRef) -> VmConfig:
    """The VM a reference names: by id, or by name, as it says (never one for the other)."""
    if ref.vm_id is not None:
        return await site.get_vm(ref.vm_id)
    return await site.find_vm_by_name(str(ref.name))


@dataclass(frozen=True, slots=True)
class PlannedGroup:
    group_id: str
    vms: tuple[VmConfig, ...]


class CloneRequests:
    def __init__(self, deps: Deps, onprem: str = "onprem") -> None:
        self._deps = deps
        self._onprem = onprem
        self._naming = asyncio.Lock()  # one request at a time takes volume names

    async def handle(self, command: SourceCloneRequest) -> list[SourceCloneResponse]:
        body = command.body
        request_id = body.request_id or command.message_id
        existing = await self._deps.migrations.request(request_id)
        if existing is None:
            _check_supported(body)
            if Step.OPENING_DISKS in machine_for(body.migration_type).steps:
                await self._check_components()
            if body.guest_credentials is not None:  # refuse now what prepare could not use
                self._deps.sealer.check(body.guest_credentials.sealed)
            groups = await self._plan(request_id, body)
            vms = [vm for group in groups for vm in group.vms]
            await self._lock(vms, request_id)  # a VM's own migration answers first, by code
            try:
                async with naming(self._deps, body.migration_type, self._naming):
                    await self._check_volumes(request_id, body, vms)
                    await self._create(request_id, command, groups)
            except TransientError:
                raise  # redelivered: the same locks are taken again (or lapse by themselves)
            except BaseException:
                # Rejected, a defect (dead-lettered) or cancelled: no VM stays locked for a
                # migration that was never created.
                await self._release_pending(vms, request_id)
                raise
            existing = [migration_id_for(request_id, vm.vm_id) for vm in vms]
            existing = await self._deps.migrations.claim_request(request_id, existing)
        return await self._responses(existing, command.correlation_id)

    def _cache_node(self, migration_type: MigrationType) -> str | None:
        """The cache instance a warm or tbc VM will run on (its per-node limits count it)."""
        if migration_type is MigrationType.COLD:
            return None
        return ComponentId.parse(self._deps.config.cache_component).name

    async def _check_volumes(
        self, request_id: str, body: SourceCloneRequestBody, vms: list[VmConfig]
    ) -> None:
        """No volume name of this request is another migration's (orchestrator/volumes.py)."""
        planned = []
        for vm in vms:
            mine = migration_id_for(request_id, vm.vm_id)
            for name in _volumes(body, vm, mine):
                planned.append((name, mine, vm.name))
        if body.migration_type is not MigrationType.COLD:  # cold's carry the migration id
            await check_free(self._deps, body.target.site, planned)

    async def _check_components(self) -> None:
        """A VM that will run on the cache and the I/O manager needs both alive now."""
        config = self._deps.config
        health = ComponentHealth(self._deps.store, config.component_timeout_s)
        for name in (config.onprem_component, config.cache_component):
            report = await health.report(ComponentId.parse(name))
            if report.liveness is not Liveness.OK:
                raise CommandRejected(
                    f"component {name} is not running ({report.detail}): a "
                    "try-before-commit migration needs the cache and the I/O manager",
                    ErrorCode.UNAVAILABLE,
                )

    async def _plan(self, request_id: str, body: SourceCloneRequestBody) -> list[PlannedGroup]:
        site = self._deps.site(self._onprem)
        by_ref: dict[tuple[str, str], VmConfig] = {}
        for vm_ref in body.vms:
            vm = await find_vm(site, vm_ref)
            if vm.vm_id in {v.vm_id for v in by_ref.values()}:
                raise CommandRejected(f"VM {vm.name!r} ({vm.vm_id}) is named twice in the request")
            by_ref[vm_ref.key] = vm
        grouped: set[str] = set()
        groups = []
        for members in body.application_dependency:
            vms = []
            for ref in members:
                # The same kind of reference as in `vms`: a name is never matched to an id.
                member = by_ref.get(ref.key)
                if member is None:
                    raise CommandRejected(f"dependency group names {ref}, not in the request")
                if member.vm_id in grouped:
                    raise CommandRejected(f"VM {member.name!r} is in two dependency groups")
                grouped.add(member.vm_id)
                vms.append(member)
            groups.append(
                PlannedGroup(group_id_for(request_id, [v.vm_id for v in vms]), tuple(vms))
            )
        for vm in by_ref.values():
            if vm.vm_id not in grouped:
                groups.append(PlannedGroup(group_id_for(request_id, [vm.vm_id]), (vm,)))
        return groups

    async def _lock(self, vms: list[VmConfig], request_id: str) -> None:
        """One migration per VM: take every VM's lock, or none."""
        migrations = self._deps.migrations
        taken: list[VmConfig] = []
        for vm in vms:
            mine = migration_id_for(request_id, vm.vm_id)
            holder = await migrations.lock_vm(
                self._onprem,
                vm.vm_id,
                mine,
                pending_s=self._deps.config.vm_lock_pending_s,
                finished=[step.value for step in TERMINAL],
            )
            if holder != mine:
                await self._release_pending(taken, request_id)
                await self._refuse_held(vm, holder)
            taken.append(vm)

    async def _refuse_held(self, vm: VmConfig, holder: str | None) -> None:
        """Another migration holds the VM: say which, and how it stands (resting in the cloud,
        migrating back) with its own code."""
        stored = await self._deps.migrations.get(holder) if holder else None
        step = Step(stored.step) if stored is not None else None
        if step in RESTING:
            raise WrongStep(
                f"a migration of VM {vm.name!r} ({vm.vm_id})",
                str(holder),
                f"{step}: the VM runs in the cloud; migrate it back (or commit) first",
                ErrorCode.RESTING_IN_CLOUD,
            )
        if step in MIGRATING_BACK:
            raise WrongStep(
                f"a migration of VM {vm.name!r} ({vm.vm_id})",
                str(holder),
                str(step),
                ErrorCode.MIGRATING_BACK,
            )
        raise Conflict(f"VM {vm.name!r} ({vm.vm_id}) is already in migration {holder}")

    async def _release_pending(self, vms: list[VmConfig], request_id: str) -> None:
        """Drop this request's locks on VMs whose migration was not created (others stay)."""
        for vm in vms:
            await self._deps.migrations.release_pending_lock(
                self._onprem, vm.vm_id, migration_id_for(request_id, vm.vm_id)
            )

    async def _create(
        self, request_id: str, command: SourceCloneRequest, groups: list[PlannedGroup]
    ) -> None:
        deps = self._deps
        now = deps.clock.now().isoformat()
        for group in groups:
            admission = await deps.migrations.next_admission()
            members = []
            for vm in group.vms:
                record = self._record(request_id, command, group.group_id, admission, vm, now)
                members.append(
                    NewMigration(
                        record.migration_id,
                        Step.QUEUED.value,
                        public_state(Step.QUEUED, False).value,
                        dump(record),
                        vm_lock=(self._onprem, vm.vm_id),
                    )
                )
                await self._seal_credentials(command, record.migration_id)
            created = await deps.migrations.create_group(
                group.group_id, request_id, admission, members
            )
            for vm in group.vms:  # again on a redelivery: harmless
                await deps.migrations.note_latest(
                    self._onprem, vm.vm_id, migration_id_for(request_id, vm.vm_id)
                )
            if not created:
                continue  # made by an earlier (or a concurrent) delivery of this command
            await deps.events.append(
                "migration_requested",
                now,
                group_id=group.group_id,
                request_id=request_id,
                migrations=[m.migration_id for m in members],
            )

    async def _seal_credentials(self, command: SourceCloneRequest, migration_id: str) -> None:
        """Keep the client's sealed box as it came: Redis holds ciphertext only, which only
        this appliance's key opens (at prepare)."""
        credentials = command.body.guest_credentials
        if credentials is None:
            return
        sealed = credentials.sealed
        key = self._deps.store.keys.secret(migration_id)
        await self._deps.store.run(lambda r: r.set(key, sealed, ex=7 * 24 * 3600, nx=True))

    def _record(
        self,
        request_id: str,
        command: SourceCloneRequest,
        group_id: str,
        admission: int,
        vm: VmConfig,
        now: str,
    ) -> MigrationRecord:
        body = command.body
        migration_id = migration_id_for(request_id, vm.vm_id)
        options = body.options
        volumes = _volumes(body, vm, migration_id)
        return MigrationRecord(
            migration_id=migration_id,
            request_id=request_id,
            correlation_id=command.correlation_id,
            group_id=group_id,
            admission=admission,
            site=self._onprem,
            vm_id=vm.vm_id,
            vm_name=vm.name,
            migration_type=body.migration_type,
            step=Step.QUEUED,
            target_site=body.target.site,
            target_pool=body.target.resource_pool,
            target_name=_target_name(body, vm),
            network_map=tuple((m.source, m.target) for m in body.network_map),
            options=TransferOptions(
                verify=options.verify,
                bandwidth_cap_bps=options.bandwidth_cap_mbps * 125_000
                if options.bandwidth_cap_mbps
                else None,
                io_queue_depth=options.io_queue_depth,
                chunk_size=options.chunk_size_mib * 1024 * 1024,
                power_on_target=options.power_on_target,
            ),
            disks=tuple(
                DiskPlan(
                    disk_id=d.disk_id,
                    label=d.label,
                    capacity_bytes=d.capacity_bytes,
                    boot=d.boot,
                    volume_id=volume,
                    component_id=component_id(migration_id, d.disk_id),
                )
                for d, volume in zip(vm.disks, volumes, strict=True)
            ),
            has_credentials=body.guest_credentials is not None,
            cache_node=self._cache_node(body.migration_type),
            bulk_offline=body.bulk_transfer_mode is BulkTransferMode.OFFLINE,
            package_location=_package_for(body, migration_id),
            source_cluster=vm.cluster,
            target_cluster=body.target.cluster,
            created_at=now,
            updated_at=now,
            reply_to=command.reply_to,
        )

    async def _responses(
        self, migration_ids: list[str], correlation_id: str
    ) -> list[SourceCloneResponse]:
        stored = await self._deps.migrations.get_many(migration_ids)
        return [
            self._deps.reporter.response(
                load(s.record), s.cancel_requested, correlation_id=correlation_id
            )
            for s in stored
        ]


def _target_name(body: SourceCloneRequestBody, vm: VmConfig) -> str:
    """Each VM is named once in the request (checked), by id or by its (unique) name."""
    return next((r.target_name for r in body.vms if r.key in _keys(vm) and r.target_name), vm.name)


def _volumes(body: SourceCloneRequestBody, vm: VmConfig, migration_id: str) -> tuple[str, ...]:
    disk_ids = [d.disk_id for d in vm.disks]
    return planned_volumes(body.migration_type, migration_id, _target_name(body, vm), disk_ids)


def _keys(vm: VmConfig) -> tuple[tuple[str, str], ...]:
    return (("vm_id", vm.vm_id), ("name", vm.name))


def _check_supported(body: SourceCloneRequestBody) -> None:
    if body.bulk_transfer_mode is BulkTransferMode.OFFLINE:
        if body.migration_type is not MigrationType.WARM:
            raise CommandRejected("offline bulk transfer is for warm migrations")
        if body.package_location is None:
            raise CommandRejected("offline bulk transfer needs a package_location")
    if body.target.site != "cloud":
        raise CommandRejected(f"unknown target site {body.target.site!r}")


def _package_for(body: SourceCloneRequestBody, migration_id: str) -> str | None:
    """Each VM's package in its own place under the request's location."""
    if body.bulk_transfer_mode is not BulkTransferMode.OFFLINE or body.package_location is None:
        return None
    return f"{body.package_location.rstrip('/')}/{migration_id}"
