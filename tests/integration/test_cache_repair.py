"""A cache that comes back with its data directory intact recovers its dirty data and keeps
serving: no VM loses data, nothing is migrated back (DESIGN.md §6 "failure").

A tbc VM rests in the cloud, its guest writing and flushing to the cache's export; the
cache process is SIGKILLed with flushed writes that exist only in it (not yet in any epoch
committed on-prem). The supervisor sees the child exit (failed at once), the repair
restarts it on the address it had, it reopens its disk from its data directory, and:
every write the guest flushed before the kill reads back through it; the guest goes on;
epochs commit again; nothing migrated back; and a planned migrate back leaves on-prem
equal to the replay of the guest's whole write log. Real processes, LocalStack, Redis.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from appliance.components.heartbeat import ComponentHealth, ComponentReport, Liveness
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
from appliance.storage.extents import Extent
from clients.client import FerryClient
from messages.commands import SetPolicyRequest, SetPolicyRequestBody
from messages.common import PowerState
from tests.integration.conftest import Harness, RunningAppliance
from tests.integration.migration_helpers import start_migration
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

    async def _again(self, failed: FerryError | OSError, in_flight: list[Range]) -> None:
        self.stalls += 1
        self.in_flight = in_flight
        self.stalled.set()
        await self.resume.wait()
        for offset, data in self._unflushed:
            await self._backend.write(offset, data)

    async def read(self, offset: int, length: int) -> bytes:
        try:
            return await self._backend.read(offset, length)
        except (FerryError, OSError) as error:
            await self._again(error, [])
            return await self._backend.read(offset, length)

    async def write(self, offset: int, data: bytes | memoryview) -> None:
        kept = bytes(data)
        try:
            await self._backend.write(offset, kept)
        except (FerryError, OSError) as error:
            await self._again(error, [(offset, offset + len(kept))])
            await self._backend.write(offset, kept)
        self._unflushed.append((offset, kept))

    async def flush(self) -> None:
        try:
            await self._backend.flush()
        except (FerryError, OSError) as error:
            await self._again(error, [])
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


def of_cache(events: list[EventRecord]) -> list[EventRecord]:
    return [e for e in events if e.fields.get("component") == str(CACHE)]


def repaired(events: list[EventRecord]) -> bool:
    return HealthEvent.COMPONENT_REPAIRED in [e.kind for e in of_cache(events)]


async def read_export(address: str, export: str) -> bytes:
    host, _, port = address.rpartition(":")
    async with await NbdBackend.connect(TcpAddress(host, int(port)), export) as source:
        return await source.read(0, source.size)


async def test_a_killed_cache_comes_back_with_its_dirty_data_and_nothing_migrates_back(
    harness: Harness, start_appliance: StartAppliance, tmp_path: Path, component_pids: list[int]
) -> None:
    vm = lab_vm(1, disks=1, disk_size=8 * MIB)
    await build_lab(harness.data_dir, [vm])
    base = await read_onprem(harness.data_dir, vm.vm_id, "disk-0")
    settings = harness.settings(
        **TBC_SETTINGS,
        component_timeout_s=30.0,  # the kill is seen at the exit, not by the timeout
        component_restart_backoff_s=0.2,
        metrics_bind="127.0.0.1:0",
    )
    running = await start_appliance(settings)
    async with FerryClient(harness.client_settings()) as client, state_store(harness) as store:
        pids = await components_up(store)
        component_pids += pids.values()
        # Epochs only when asked (a sync): what the guest writes after one stays dirty in
        # the cache, on no other disk.
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

        health = ComponentHealth(store, 120)
        before = await health.report(CACHE)
        cache_pid = pids[str(CACHE)]
        os.kill(cache_pid, signal.SIGKILL)
        await asyncio.wait_for(guest_disk.stalled.wait(), WAIT_S)

        # The repair: failed at the exit, restarted at once, on the same address.
        events = of_cache(await health_events_until(store, repaired))
        assert [e.kind for e in events] == [
            "component_failed",
            "component_repair_started",
            "component_recovered",
            "component_repaired",
        ]
        assert events[0].fields["detail"] == f"pid {cache_pid} exited with code -9"
        assert events[1].fields["action"] == "restarted it (it had exited with code -9)"
        assert events[3].fields["attempts"] == 1
        print(f"cache SIGKILL: repaired {events[3].fields['seconds']:.2f}s after it failed")

        def serving(report: ComponentReport) -> bool:
            return (
                report.liveness is Liveness.OK
                and report.pid != cache_pid
                and disk in report.figures.get("exports", [])
            )

        back = await health.wait_until(CACHE, serving, WAIT_S)
        assert back.pid is not None
        component_pids.append(back.pid)
        assert back.figures["address"] == before.figures["address"] == str(address)

        # Every write the guest flushed before the kill reads back through the cache...
        await guest.log.sync()
        log = await read_write_log(tmp_path / "guest.log")
        assert last_flush(log) >= 70
        seen = await read_export(str(address), export)
        assert lost_flushed_writes(seen, base, log, guest_disk.in_flight) == ([], [])
        # ... though on-prem (its last committed epoch) lacks some: they lived in the cache.
        onprem = (await health.report(ONPREM)).figures["address"]
        current = await read_export(str(onprem), f"cur/{disk}")
        lost_on_prem, _ = lost_flushed_writes(current, base, log, guest_disk.in_flight)
        assert lost_on_prem
        assert await committed_epoch(store, disk) == committed

        # The guest goes on; epochs commit again.
        guest_disk.resume.set()
        await guest.wait_writes(await guest.writes() + 40, within_s=60)
        assert guest_disk.stalls == 1
        await client.request(sync([migration_id]), timeout_s=120)
        assert await committed_epoch(store, disk) > committed

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
        kinds = {e.kind for e in of_cache(await health_events_until(store, repaired))}
        assert HealthEvent.COMPONENT_REPAIR_GAVE_UP not in kinds

        runtime = json.loads((harness.data_dir / RUNTIME_FILE).read_text())
        samples = await scrape(runtime["metrics_address"])
        component = (("component", str(CACHE)),)
        assert samples[("ferry_component_failures_total", component)] == 1
        outcome = (*component, ("outcome", "repaired"))
        assert samples[("ferry_component_repairs_total", outcome)] == 1

        # A planned migrate back loses nothing the guest wrote, before or after the kill.
        await guest.halt()
        await client.request(migrate_back([migration_id]))
        await _back(follower, 1)
    await running.shutdown()
    image = await read_onprem(harness.data_dir, vm.vm_id, "disk-0")
    expected = await expected_after(base, tmp_path / "guest.log")
    assert expected != base
    assert image == expected
