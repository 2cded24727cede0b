"""Driving try-before-commit migrations from tests: the components, a guest on the cache, the
write log, and reading the on-prem disk back."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

from appliance.components.heartbeat import ComponentHealth, ComponentReport, Liveness
from appliance.components.orders import ComponentId
from appliance.datapath.nbd import NbdBackend
from appliance.datapath.nbd.channel import TcpAddress
from appliance.sites.lab.site import LabSite
from appliance.sites.lab.workload import GuestWorkload, WorkloadSpec, WriteLog, read_write_log
from appliance.state.keys import Keys
from appliance.state.store import StateStore, connect
from appliance.storage.layered import LayeredDisk
from clients.client import FerryClient
from messages.commands import (
    CloneOptions,
    CloneVm,
    CommitRequest,
    CommitRequestBody,
    MigrateBackRequest,
    MigrateBackRequestBody,
    MigrationSelector,
    NetworkMapping,
    SourceCloneRequest,
    SourceCloneRequestBody,
    SyncRequest,
    SyncRequestBody,
    VmRef,
)
from messages.common import MigrationType
from tests.integration.conftest import Harness
from tests.support.lab import NETWORK_MAP, onprem_disk
from tests.support.replay import replay

ONPREM = ComponentId("onprem", "onprem-1")
CACHE = ComponentId("cache", "cache-1")
COMPONENTS = f"{ONPREM},{CACHE}"
TBC_SETTINGS: dict[str, object] = {
    "embedded_components": COMPONENTS,
    "component_heartbeat_interval_s": 0.2,
    "resting_poll_s": 0.2,
    "component_order_timeout_s": 30.0,
    "epoch_commit_timeout_s": 60.0,
}


def tbc_request(
    client: FerryClient, vm_ids: Sequence[str], *, groups: Sequence[Sequence[str]] = ()
) -> SourceCloneRequest:
    return SourceCloneRequest(
        body=SourceCloneRequestBody(
            vms=tuple(CloneVm(vm_id=vm_id) for vm_id in vm_ids),
            migration_type=MigrationType.TBC,
            guest_credentials=client.seal_credentials("tester", "pw-123"),
            network_map=tuple(NetworkMapping(source=s, target=t) for s, t in NETWORK_MAP.items()),
            application_dependency=tuple(tuple(VmRef(vm_id=i) for i in g) for g in groups),
            options=CloneOptions(),
        )
    )


def migrate_back(migration_ids: Sequence[str], **options: bool) -> MigrateBackRequest:
    selector = MigrationSelector(migration_ids=tuple(migration_ids))
    return MigrateBackRequest(body=MigrateBackRequestBody(select=selector, **options))


def commit_request(migration_ids: Sequence[str]) -> CommitRequest:
    selector = MigrationSelector(migration_ids=tuple(migration_ids))
    return CommitRequest(body=CommitRequestBody(select=selector))


def sync(migration_ids: Sequence[str]) -> SyncRequest:
    selector = MigrationSelector(migration_ids=tuple(migration_ids))
    return SyncRequest(body=SyncRequestBody(select=selector))


@contextlib.asynccontextmanager
async def state_store(harness: Harness) -> contextlib.AsyncIterator[StateStore]:  # type: ignore[name-defined]
    store = StateStore(connect(harness.redis_url), Keys(harness.prefix))
    try:
        yield store
    finally:
        await store.close()


async def components_up(store: StateStore, within_s: float = 60) -> dict[str, int]:
    """Both components beat; their pids."""
    health = ComponentHealth(store, 120)
    pids = {}
    for instance in (ONPREM, CACHE):
        report = await health.wait_until(
            instance, lambda r: r.liveness is Liveness.OK and r.pid is not None, within_s
        )
        assert report.pid is not None
        pids[str(instance)] = report.pid
    return pids


async def committed_at_least(
    store: StateStore, disk: str, epoch: int, within_s: float = 60
) -> ComponentReport:
    def done(report: ComponentReport) -> bool:
        return int(report.figures.get("committed_epoch", {}).get(disk, 0)) >= epoch

    health = ComponentHealth(store, 120)
    try:
        return await health.wait_until(ONPREM, done, within_s)
    except TimeoutError:
        onprem, cache = await health.report(ONPREM), await health.report(CACHE)
        raise AssertionError(
            f"epoch {epoch} of {disk} not committed in {within_s} s: on-prem {onprem}, "
            f"cache {cache}"
        ) from None


async def committed_epoch(store: StateStore, disk: str) -> int:
    report = await ComponentHealth(store, 120).report(ONPREM)
    return int(report.figures.get("committed_epoch", {}).get(disk, 0))


async def cloud_export(data_dir: Path, cloud_vm_id: str, disk_id: str) -> tuple[TcpAddress, str]:
    """Where the cloud VM's disk is served (the cache's NBD export), from its configuration."""
    cloud = LabSite.open(data_dir / "sites" / "cloud")
    try:
        vm = await cloud.get_vm(cloud_vm_id)
    finally:
        await cloud.close()
    disk = next(d for d in vm.disks if d.disk_id == disk_id)
    assert disk.nbd_export is not None, vm
    url = urlparse(disk.nbd_export)
    assert url.hostname is not None and url.port is not None
    return TcpAddress(url.hostname, url.port), url.path.lstrip("/")


@dataclass
class Guest:
    """The workload generator as the cloud VM's guest: writes to the cache's export."""

    backend: NbdBackend
    workload: GuestWorkload
    log: WriteLog
    stop: asyncio.Event
    task: asyncio.Task[None] | None = None
    wrote: asyncio.Condition = field(default_factory=asyncio.Condition)
    """Notified after each batch of operations, and when the guest stops."""

    @classmethod
    async def start(cls, address: TcpAddress, export: str, log_path: Path, seed: int) -> Guest:
        backend = await NbdBackend.connect(address, export)
        log = await WriteLog.create(log_path, seed=seed, disk_size=backend.size, batch=16)
        spec = WorkloadSpec(seed=seed, max_length=256 * 1024)
        guest = cls(backend, GuestWorkload(backend, spec, log), log, asyncio.Event())
        guest.task = asyncio.create_task(guest._run())
        return guest

    async def _run(self) -> None:
        try:
            while not self.stop.is_set():
                await self.workload.run(count=10, rate=100, flush_every=8)
                async with self.wrote:
                    self.wrote.notify_all()
        finally:
            async with self.wrote:
                self.wrote.notify_all()

    async def writes(self) -> int:
        return self.workload.stats().writes

    async def wait_writes(self, count: int, within_s: float) -> None:
        """Until the guest has written ``count`` times (woken after each batch it writes)."""
        task = self.task
        assert task is not None
        async with asyncio.timeout(within_s), self.wrote:
            await self.wrote.wait_for(lambda: self.workload.stats().writes >= count or task.done())
        assert self.workload.stats().writes >= count, "the guest stopped"

    async def halt(self) -> int:
        """Stop writing (like the guest of a VM being powered off); the last sequence."""
        self.stop.set()
        assert self.task is not None
        await self.task
        await self.workload.flush()
        await self.log.close()
        await self.backend.close()
        return self.workload.stats().last_sequence


async def read_onprem(data_dir: Path, vm_id: str, disk_id: str) -> bytes:
    async with await LayeredDisk.open(onprem_disk(data_dir, vm_id, disk_id)) as disk:
        return await disk.active().read(0, disk.size)


async def expected_after(base: bytes, log_path: Path) -> bytes:
    log = await read_write_log(log_path)
    return bytes(replay(base, log, log.last_sequence))


def kill_pids(pids: Sequence[int], data_dir: Path) -> None:
    """Stop component processes this test's appliance started (orphaned by a SIGKILL, or left
    serving by a clean stop): only a PID that is still such a process of ``data_dir``."""
    ours = str(data_dir.resolve()).encode()
    for pid in pids:
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue  # gone
        if b"component" in argv and any(arg.startswith(ours) for arg in argv):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
