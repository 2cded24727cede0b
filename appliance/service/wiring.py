"""Building the orchestrator's dependencies and the command handlers from settings."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

from appliance.clock import Clock
from appliance.components.heartbeat import ComponentHealth
from appliance.datapath.buffers import BufferBudget
from appliance.datapath.checkpoint import CheckpointStore
from appliance.datapath.chunks import MAX_DATA_RUN
from appliance.datapath.nbd.channel import NbdAddress, TcpAddress
from appliance.datapath.nbd.server import NbdServer
from appliance.datapath.package import S3Access
from appliance.dispatch.admin import Admin
from appliance.dispatch.dispatcher import CommandHandler
from appliance.dispatch.event_log import EventsQuery
from appliance.dispatch.inventory import Inventory
from appliance.errors import CommandRejected
from appliance.health import HealthBoard
from appliance.orchestrator.cloud_control import CloudCommands
from appliance.orchestrator.context import Deps, OrchestratorConfig
from appliance.orchestrator.control import MigrationControl
from appliance.orchestrator.figures import CacheFigureReader
from appliance.orchestrator.leftovers import ResetCleanup
from appliance.orchestrator.record import MigrationRecord, load
from appliance.orchestrator.reporting import Reporter, status_of
from appliance.orchestrator.requests import CloneRequests
from appliance.orchestrator.resume import Resumes
from appliance.orchestrator.scheduler import Scheduler, group_lease
from appliance.sealing import Sealer
from appliance.service.health import refuse_if_degraded, tbc_instances
from appliance.settings import Settings
from appliance.sink import EventSink
from appliance.sites.lab.sample import cloud_site_config, onprem_site_config
from appliance.sites.lab.site import LabSite
from appliance.sites.model import SiteConfig
from appliance.state.checkpoints import RedisCheckpointStore
from appliance.state.events import EventLog
from appliance.state.leases import Lease, Leases
from appliance.state.migrations import MigrationStore
from appliance.state.policy import Policies, PolicyDefaults
from appliance.state.store import StateStore
from messages.commands import (
    BulkMigrationDoneRequest,
    CancelRequest,
    Command,
    CommitRequest,
    MigrateBackRequest,
    SourceCloneRequest,
    SourceInventoryRequest,
    SyncRequest,
)
from messages.common import MigrationState
from messages.errors import ErrorCode
from messages.events import Event, InventorySkip, SourceCloneResponse, SourceInventoryResponse
from messages.keys import ApplianceKeyPair

WanLink = Callable[[NbdAddress], Awaitable[NbdAddress]]
"""Maps the cloud NBD server's address to the one the data path dials (a tunnel, a proxy)."""


class CloudDataPlane:
    """The cloud site's NBD server: a volume is exported while data is copied into it."""

    def __init__(self, server: NbdServer, cloud: LabSite, wan: WanLink | None = None) -> None:
        self._server = server
        self._cloud = cloud
        self._wan = wan
        self._dialled: NbdAddress | None = None  # what the last export handed the data path

    async def export(self, volume_id: str) -> tuple[NbdAddress, str]:
        if volume_id not in self._server.exports:
            self._server.add_export(volume_id, await self._cloud.open_volume(volume_id))
        address = self._server.address
        dialled = await self._wan(address) if self._wan else address
        self._dialled = dialled
        return dialled, volume_id

    async def unexport(self, volume_id: str) -> None:
        self._server.remove_export(volume_id)

    async def dialled(self) -> TcpAddress | None:
        """Where the data path dials while a copy runs (a volume is exported), else None:
        the WAN probe's view of the cold copies' link (the address the last export gave)."""
        if not self._server.exports:
            return None
        dialled = self._dialled
        return dialled if isinstance(dialled, TcpAddress) else None


async def open_site(root: Path, default: SiteConfig) -> LabSite:
    if (root / "site.json").is_file():
        return await asyncio.to_thread(LabSite.open, root)
    return await LabSite.create(root, default)


async def open_sites(data_dir: Path) -> dict[str, LabSite]:
    return {
        "onprem": await open_site(data_dir / "sites" / "onprem", onprem_site_config()),
        "cloud": await open_site(data_dir / "sites" / "cloud", cloud_site_config()),
    }


def policy_defaults(settings: Settings) -> PolicyDefaults:
    """What holds where no SetPolicyRequest said otherwise."""
    return PolicyDefaults(
        rto_rpo_interval_s=settings.rto_rpo_interval_s,
        rpo_dirty_bytes=settings.cache_rpo_dirty_bytes,
        max_concurrent_migrations=settings.max_concurrent_migrations,
        max_in_progress_per_cache_node=settings.max_in_progress_per_cache_node,
        max_resting_per_cache_node=settings.max_resting_per_cache_node,
    )


def build_deps(
    settings: Settings,
    store: StateStore,
    sink: EventSink,
    sites: dict[str, LabSite],
    cloud: CloudDataPlane,
    clock: Clock,
    keys: ApplianceKeyPair,
    health: HealthBoard | None = None,
) -> Deps:
    config = OrchestratorConfig(
        appliance_id=settings.appliance_id,
        lease_ttl_s=settings.lease_ttl_s,
        progress_interval_s=settings.progress_interval_s,
        scheduler_tick_s=settings.scheduler_tick_s,
        step_delay_s=settings.debug_step_delay_s,
        transfer_workers=settings.transfer_workers,
        onprem_component=settings.tbc_components.split(",")[0],
        cache_component=settings.tbc_components.split(",")[1],
        component_order_timeout_s=settings.component_order_timeout_s,
        component_timeout_s=settings.component_timeout_s,
        epoch_commit_timeout_s=settings.epoch_commit_timeout_s,
        resting_poll_s=settings.resting_poll_s,
        reconcile_threshold_bytes=settings.warm_reconcile_threshold_bytes,
        reconcile_max_passes=settings.warm_reconcile_max_passes,
        cutover_gate=settings.debug_warm_cutover_gate,
        wan_upstream=settings.wan_upstream,
        holds=frozenset(filter(None, settings.debug_warm_holds.split(","))),
        package_s3=S3Access.from_settings(settings),
    )

    def checkpoints(transfer_id: str, lease: Lease | None) -> CheckpointStore:
        return RedisCheckpointStore(store.redis, store.keys, transfer_id, lease=lease)

    return Deps(
        config=config,
        store=store,
        migrations=MigrationStore(store),
        # Unique per process: two processes sharing an appliance id must not share leases.
        leases=Leases(
            store, f"{settings.appliance_id}/{uuid.uuid4().hex[:8]}", settings.lease_ttl_s
        ),
        policies=Policies(store, policy_defaults(settings)),
        events=EventLog(store),
        reporter=Reporter(
            settings.appliance_id,
            sink,
            clock,
            CacheFigureReader(ComponentHealth(store, settings.component_timeout_s), clock),
        ),
        sites=dict(sites),
        cloud=cloud,
        checkpoints=checkpoints,
        sealer=Sealer(keys),
        clock=clock,
        buffers=BufferBudget(settings.transfer_buffers, MAX_DATA_RUN),
        health=health,
    )


def build_handlers(
    settings: Settings,
    deps: Deps,
    scheduler: Scheduler,
    health: HealthBoard,
    onprem: LabSite,
) -> dict[str, CommandHandler]:
    async def skipped(skip: InventorySkip) -> None:
        at = deps.clock.now().isoformat()
        await deps.events.append("inventory_vm_skipped", at, **skip.model_dump())

    async def migration_states(vm_ids: Sequence[str]) -> dict[str, MigrationState]:
        found = await deps.migrations.latest_states(onprem.name, list(vm_ids))
        return {vm_id: MigrationState(state) for vm_id, state in found.items()}

    inventory = Inventory(onprem, settings.max_message_bytes, migration_states, skipped)
    clones = CloneRequests(deps)
    control = MigrationControl(deps, scheduler)

    async def answer_inventory(command: Command) -> list[Event]:
        assert isinstance(command, SourceInventoryRequest)
        return [
            SourceInventoryResponse(
                appliance_id=settings.appliance_id,
                correlation_id=command.correlation_id,
                body=await inventory.page(command.body),
            )
        ]

    async def answer_clone(command: Command) -> list[Event]:
        assert isinstance(command, SourceCloneRequest)
        responses = await clones.handle(command)
        scheduler.wake()
        return list(responses)

    async def answer_cancel(command: Command) -> list[Event]:
        assert isinstance(command, CancelRequest)
        return list(await control.cancel(command))

    resumes = Resumes(deps, group_lease)
    cloud = CloudCommands(deps)

    def answers(command: Command, records: Sequence[MigrationRecord]) -> list[Event]:
        return [
            SourceCloneResponse(
                appliance_id=settings.appliance_id,
                correlation_id=command.correlation_id,
                body=status_of(record, False),
            )
            for record in records
        ]

    async def answer_sync(command: Command) -> list[Event]:
        assert isinstance(command, SyncRequest)
        ids = await control.select(command.body.select)
        stored = [load(s.record) for s in await deps.migrations.get_many(ids)]
        if cloud.resting(stored):  # an epoch now, answered once committed
            return answers(command, await cloud.sync(ids))
        records = await resumes.requeue(ids)  # a resume of failed migrations that kept data
        scheduler.wake()
        return answers(command, records)

    async def answer_migrate_back(command: Command) -> list[Event]:
        assert isinstance(command, MigrateBackRequest)
        ids = await control.select(command.body.select)
        return answers(command, await cloud.migrate_back(ids, command.body))

    async def answer_commit(command: Command) -> list[Event]:
        assert isinstance(command, CommitRequest)
        return answers(command, await cloud.commit(await control.select(command.body.select)))

    async def answer_bulk_done(command: Command) -> list[Event]:
        assert isinstance(command, BulkMigrationDoneRequest)
        ids = await control.select(command.body.select)
        return answers(command, await cloud.bulk_done(ids, command.body.package_location))

    admin = Admin(
        appliance_id=settings.appliance_id,
        store=deps.store,
        health=health,
        generation_file=settings.data_dir / "state-generation",
        status_page=control.status_page,
        counts=control.counts,
        reset_cleanup=ResetCleanup(deps, scheduler.stop_all, scheduler.held),
        clock=deps.clock,
        policies=deps.policies,
        on_policy_change=scheduler.wake,
    )
    return {
        "SourceInventoryRequest": answer_inventory,
        "SourceCloneRequest": guarded(health, unless_degraded(health, settings, answer_clone)),
        "CancelRequest": guarded(health, answer_cancel),
        "SyncRequest": guarded(health, answer_sync),
        "MigrateBackRequest": guarded(health, answer_migrate_back),
        "CommitRequest": guarded(health, answer_commit),
        "BulkMigrationDoneRequest": guarded(health, answer_bulk_done),
        "EventsRequest": EventsQuery(
            settings.appliance_id, deps.events, settings.max_message_bytes
        ).answer,
        **admin.handlers(),
    }


def unless_degraded(
    health: HealthBoard, settings: Settings, handler: CommandHandler
) -> CommandHandler:
    """Refuse a new migration that needs a failed component (services_degraded)."""
    components = tbc_instances(settings)

    async def checked(command: Command) -> Sequence[Event]:
        refuse_if_degraded(health, command, components)
        return await handler(command)

    return checked


def guarded(health: HealthBoard, handler: CommandHandler) -> CommandHandler:
    """Refuse commands that change migrations while the state store has lost its data:
    acting on an empty store could run finished migrations again."""

    async def checked(command: Command) -> Sequence[Event]:
        if not health.is_ok("state_generation"):
            raise CommandRejected(
                "the state store lost its data (Redis came back empty); send ResetRequest "
                "to start over",
                ErrorCode.UNAVAILABLE,
            )
        return await handler(command)

    return checked
