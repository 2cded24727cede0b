"""A cache that comes back with its data directory intact recovers its dirty data and keeps
serving: no VM loses data, nothing is migrated back (DESIGN.md §6 "failure").

A tbc VM rests in the cloud, its guest writing and flushing to the cache's export; the
cache process is SIGKILLed with flushed writes that exist only in it (not yet in any epoch
committed on-prem). The supervisor sees the child exit (failed at once), the repair
restarts it on the address it had, it reopens its disk from its data directory, and:
every write the guest flushed before the kill reads back through it; the guest goes on;
epochs commit again; nothing migrated back; and a planned migrate back leaves on-prem
equal to the replay of the guest's whole write log. The I/O manager killed the same way
comes back on its address (the cache's upstream), and the epochs resume. Real processes,
LocalStack, Redis.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from appliance.components.heartbeat import ComponentHealth, ComponentReport, Liveness
from appliance.components.orders import ComponentId
from appliance.datapath.nbd import NbdBackend
from appliance.datapath.nbd.channel import TcpAddress
from appliance.errors import FerryError
from appliance.orchestrator.record import load
from appliance.orchestrator.states import Step
from appliance.service.health import HealthEvent
from appliance.service.runtime import RUNTIME_FILE
from appliance.sites.lab.site import LabSite
from appliance.sites.lab.workload import GuestWorkload, WorkloadSpec, WriteLog, read_write_log
from appliance.state.events import EventRecord
from appliance.state.migrations import MigrationStore
from appliance.state.store import StateStore
from appliance.storage.extents import Extent
from clients.client import FerryClient
from messages.commands import SetPolicyRequest, SetPolicyRequestBody
from messages.common import PowerState
from tests.integration.conftest import Harness, RunningAppliance
from tests.integration.migration_helpers import Follower, start_migration
from tests.integration.tbc_helpers import (
    CACHE,
    ONPREM,
    TBC_SETTINGS,
    Guest,
    cloud_export,
    committed_epoch,
    components_up,
    expected_after,
    kill_pids,
    migrate_back,
    read_onprem,
    state_store,
    sync,
    tbc_request,
)
from tests.integration.test_health import health_events_until
from tests.integration.test_tbc import _back, _in_cloud
from tests.support.lab import MIB, build_lab, lab_vm
from tests.support.replay import last_flush, lost_flushed_writes
from tests.support.scrape import scrape

pytestmark = pytest.mark.timeout(300)
StartAppliance = Callable[..., Awaitable[RunningAppliance]]
WAIT_S = 90.0
Range = tuple[int, int]


class GuestDisk:
    """The cloud VM's disk as its guest sees it across a restart of the cache. A request
    that fails (the connection dropped) waits until the test says the disk is back, like a
    VM paused on an I/O error; then the guest writes again what it wrote since its last
    completed flush (a guest keeps that until a flush returns) and sends the request again."""

    def __init__(self, backend: NbdBackend) -> None:
        self._backend = backend
        self._unflushed: list[tuple[int, bytes]] = []
        self.stalled = asyncio.Event()
        self.resume = asyncio.Event()
        self.in_flight: list[Range] = []
        self.stalls = 0

    @property
    def name(self) -> str:
        return self._backend.name

    @property
    def size(self) -> int:
        return self._backend.size

    @property
    def readonly(self) -> bool:
        return False

    async def _again(self, in_flight: list[Range]) -> None:
        self.stalls += 1
        self.in_flight = in_flight
        self.stalled.set()
        await self.resume.wait()
        for offset, data in self._unflushed:
            await self._backend.write(offset, data)

    async def read(self, offset: int, length: int) -> bytes:
        try:
            return await self._backend.read(offset, length)
        except (FerryError, OSError):
            await self._again([])
            return await self._backend.read(offset, length)

    async def write(self, offset: int, data: bytes | memoryview) -> None:
        kept = bytes(data)
        try:
            await self._backend.write(offset, kept)
        except (FerryError, OSError):
            await self._again([(offset, offset + len(kept))])
            await self._backend.write(offset, kept)
        self._unflushed.append((offset, kept))

    async def flush(self) -> None:
        try:
            await self._backend.flush()
        except (FerryError, OSError):
            await self._again([])
            await self._backend.flush()
        self._unflushed.clear()

    async def zero(self, offset: int, length: int, *, punch_hole: bool = False) -> None:
        raise NotImplementedError("the workload only reads, writes and flushes")

    async def extents(self, offset: int = 0, length: int | None = None) -> list[Extent]:
        return await self._backend.extents(offset, length)

    async def close(self) -> None:
        await self._backend.close()


@dataclass
class RecoveringGuest(Guest):
    disk: GuestDisk | None = None

    @classmethod
    async def on(
        cls, address: TcpAddress, export: str, log_path: Path, seed: int
    ) -> tuple[RecoveringGuest, GuestDisk]:
        backend = await NbdBackend.connect(address, export)
        disk = GuestDisk(backend)
        log = await WriteLog.create(log_path, seed=seed, disk_size=backend.size, batch=16)
        spec = WorkloadSpec(seed=seed, max_length=256 * 1024)
        guest = cls(backend, GuestWorkload(disk, spec, log), log, asyncio.Event(), disk=disk)
        guest.task = asyncio.create_task(guest._run())
        return guest, disk


@pytest.fixture
def component_pids(data_dir: Path) -> Iterator[list[int]]:
    pids: list[int] = []
    yield pids
    kill_pids(pids, data_dir)


async def read_export(address: str, export: str) -> bytes:
    host, _, port = address.rpartition(":")
    async with await NbdBackend.connect(TcpAddress(host, int(port)), export) as source:
        return await source.read(0, source.size)


@dataclass
class RestingVm:
    """A tbc VM resting in the cloud, its guest writing: the parts a test uses."""

    client: FerryClient
    store: StateStore
    follower: Follower
    migration_id: str
    disk: str
    address: TcpAddress
    export: str
    guest: RecoveringGuest
    guest_disk: GuestDisk
    base: bytes
    pids: dict[str, int]
    committed: int


@asynccontextmanager
async def resting_vm(
    harness: Harness, start_appliance: StartAppliance, tmp_path: Path, component_pids: list[int]
) -> AsyncIterator[RestingVm]:
    """Its guest wrote, an epoch (a sync) committed, then the guest wrote and flushed more:
    that exists only in the cache. Epochs only when asked: nothing is cut by time."""
    vm = lab_vm(1, disks=1, disk_size=8 * MIB)
    await build_lab(harness.data_dir, [vm])
    base = await read_onprem(harness.data_dir, vm.vm_id, "disk-0")
    settings = harness.settings(
        **TBC_SETTINGS,
        component_timeout_s=30.0,  # a kill is seen at the exit, not by the timeout
        component_restart_backoff_s=0.2,
        metrics_bind="127.0.0.1:0",
    )
    running = await start_appliance(settings)
    async with FerryClient(harness.client_settings()) as client, state_store(harness) as store:
        pids = await components_up(store)
        component_pids += pids.values()
        policy = SetPolicyRequestBody(cluster="cluster-a", rto_rpo_interval_s=3600)
        await client.request(SetPolicyRequest(body=policy))
        follower = await start_migration(client, tbc_request(client, [vm.vm_id]))
        await _in_cloud(follower, 1)
        (status,) = follower.latest.values()
        migration_id, disk = status.migration_id, f"{status.migration_id}-disk-0"
        address, export = await cloud_export(harness.data_dir, migration_id, "disk-0")
        guest, guest_disk = await RecoveringGuest.on(address, export, tmp_path / "guest.log", 17)
        await guest.wait_writes(30, within_s=60)
        await client.request(sync([migration_id]), timeout_s=120)
        committed = await committed_epoch(store, disk)
        assert committed >= 1
        await guest.wait_writes(await guest.writes() + 40, within_s=60)  # flushed, dirty
        yield RestingVm(
            client, store, follower, migration_id, disk, address, export, guest, guest_disk,
            base, pids, committed,
        )  # fmt: skip

        # Nothing migrated back: still resting in the cloud, the on-prem VM still parked.
        (stored,) = await MigrationStore(store).get_many([migration_id])
        assert load(stored.record).step is Step.RUNNING_IN_CLOUD
        onprem_site = LabSite.open(harness.data_dir / "sites" / "onprem")
        try:
            assert (await onprem_site.get_vm(vm.vm_id)).resource_pool == "_HDM_MIGRATEPOOL"
        finally:
            await onprem_site.close()
        cloud_site = LabSite.open(harness.data_dir / "sites" / "cloud")
        try:
            assert (await cloud_site.get_vm(migration_id)).power_state is PowerState.ON
        finally:
            await cloud_site.close()

        # A planned migrate back loses nothing the guest wrote, before or after the kill.
        await guest.halt()
        await client.request(migrate_back([migration_id]))
        await _back(follower, 1)
    await running.shutdown()
    image = await read_onprem(harness.data_dir, vm.vm_id, "disk-0")
    expected = await expected_after(base, tmp_path / "guest.log")
    assert expected != base
    assert image == expected


def of(instance: ComponentId, events: list[EventRecord]) -> list[EventRecord]:
    return [e for e in events if e.fields.get("component") == str(instance)]


def repaired(instance: ComponentId) -> Callable[[list[EventRecord]], bool]:
    return lambda events: HealthEvent.COMPONENT_REPAIRED in [e.kind for e in of(instance, events)]


async def repair_events(vm: RestingVm, instance: ComponentId) -> list[EventRecord]:
    """Failed at the exit, restarted at once (the repair), back."""
    pid = vm.pids[str(instance)]
    events = of(instance, await health_events_until(vm.store, repaired(instance)))
    assert [e.kind for e in events] == [
        "component_failed",
        "component_repair_started",
        "component_recovered",
        "component_repaired",
    ]
    assert events[0].fields["detail"] == f"pid {pid} exited with code -9"
    assert events[1].fields["action"] == "restarted it (it had exited with code -9)"
    assert events[3].fields["attempts"] == 1
    print(f"{instance} SIGKILL: repaired {events[3].fields['seconds']:.2f}s after it failed")
    return events


async def counted(instance: ComponentId, data_dir: Path) -> None:
    runtime = json.loads((data_dir / RUNTIME_FILE).read_text())
    samples = await scrape(runtime["metrics_address"])
    component = (("component", str(instance)),)
    assert samples[("ferry_component_failures_total", component)] == 1
    outcome = (*component, ("outcome", "repaired"))
    assert samples[("ferry_component_repairs_total", outcome)] == 1


async def test_a_killed_cache_comes_back_with_its_dirty_data_and_nothing_migrates_back(
    harness: Harness, start_appliance: StartAppliance, tmp_path: Path, component_pids: list[int]
) -> None:
    async with resting_vm(harness, start_appliance, tmp_path, component_pids) as vm:
        health = ComponentHealth(vm.store, 120)
        before = await health.report(CACHE)
        cache_pid = vm.pids[str(CACHE)]
        os.kill(cache_pid, signal.SIGKILL)
        await asyncio.wait_for(vm.guest_disk.stalled.wait(), WAIT_S)
        await repair_events(vm, CACHE)

        def serving(report: ComponentReport) -> bool:
            return (
                report.liveness is Liveness.OK
                and report.pid != cache_pid
                and vm.disk in report.figures.get("exports", [])
            )

        back = await health.wait_until(CACHE, serving, WAIT_S)
        assert back.pid is not None
        component_pids.append(back.pid)
        assert back.figures["address"] == before.figures["address"] == str(vm.address)

        # Every write the guest flushed before the kill reads back through the cache...
        await vm.guest.log.sync()
        log = await read_write_log(tmp_path / "guest.log")
        assert last_flush(log) >= 70
        in_flight = vm.guest_disk.in_flight
        seen = await read_export(str(vm.address), vm.export)
        assert lost_flushed_writes(seen, vm.base, log, in_flight) == ([], [])
        # ... though on-prem (its last committed epoch) lacks some: they lived in the cache.
        onprem = (await health.report(ONPREM)).figures["address"]
        current = await read_export(str(onprem), f"cur/{vm.disk}")
        lost_on_prem, _ = lost_flushed_writes(current, vm.base, log, in_flight)
        assert lost_on_prem
        assert await committed_epoch(vm.store, vm.disk) == vm.committed

        # The guest goes on; epochs commit again.
        vm.guest_disk.resume.set()
        await vm.guest.wait_writes(await vm.guest.writes() + 40, within_s=60)
        assert vm.guest_disk.stalls == 1
        await vm.client.request(sync([vm.migration_id]), timeout_s=120)
        assert await committed_epoch(vm.store, vm.disk) > vm.committed
        await counted(CACHE, harness.data_dir)


async def test_a_killed_io_manager_comes_back_on_its_address_and_the_epochs_resume(
    harness: Harness, start_appliance: StartAppliance, tmp_path: Path, component_pids: list[int]
) -> None:
    """The cache keeps serving the guest meanwhile; its upstream (the I/O manager's
    address, given in its open order) still points at the restarted process."""
    async with resting_vm(harness, start_appliance, tmp_path, component_pids) as vm:
        health = ComponentHealth(vm.store, 120)
        before = await health.report(ONPREM)
        onprem_pid = vm.pids[str(ONPREM)]
        os.kill(onprem_pid, signal.SIGKILL)
        written = await vm.guest.writes()
        await repair_events(vm, ONPREM)

        def serving(report: ComponentReport) -> bool:
            return (
                report.liveness is Liveness.OK
                and report.pid != onprem_pid
                and f"cur/{vm.disk}" in report.figures.get("exports", [])
            )

        back = await health.wait_until(ONPREM, serving, WAIT_S)
        assert back.pid is not None
        component_pids.append(back.pid)
        assert back.figures["address"] == before.figures["address"]
        await vm.guest.wait_writes(written + 40, within_s=60)
        assert vm.guest_disk.stalls == 0  # the cache served it all along
        await vm.client.request(sync([vm.migration_id]), timeout_s=120)
        assert await committed_epoch(vm.store, vm.disk) > vm.committed
        await counted(ONPREM, harness.data_dir)
