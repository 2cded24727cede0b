"""The WAN link blackholed for less than its threshold under a tbc VM whose guest writes.

Real processes (the appliance over SQS, the cache, the I/O manager); the cache reaches
on-prem through a blackholing proxy (``wan_upstream``). While the link is down the
heartbeat lists it degraded and stays Ready, the guest's writes keep landing in the
cache, a read of a chunk the cache does not hold waits, and an epoch cut (a sync) waits
to ship. Once the link is back the read answers with on-prem's bytes, the epoch commits
(on-prem then equals a replay of a prefix of the guest's log that holds every write
acknowledged before the cut), and a migrate back loses nothing.
Blackholed past the threshold the link is failed, and once it returns the cache's VM goes
home by itself to its last committed epoch (issue 11's failure path).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

from appliance.components.epochs import parse_address
from appliance.components.heartbeat import ComponentHealth
from appliance.components.onprem.manager import current_export
from appliance.datapath.nbd import NbdBackend
from appliance.errors import NbdCommandError
from appliance.service.health import WAN_LINK, HealthEvent
from appliance.sites.lab.site import LabSite
from appliance.sites.lab.workload import GuestWorkload, WorkloadSpec, WriteLog, read_write_log
from clients.client import FerryClient, FerryError
from messages.common import MigrationState, Phase, PowerState
from messages.errors import ErrorCode
from messages.events import ComponentState, MigrationStatus, ReadyStatus, SourceCloneResponse
from tests.integration.conftest import Harness
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
from tests.integration.test_bus import StartAppliance
from tests.integration.test_health import (
    beat_until,
    failed_then_recovered,
    health_events_until,
    states,
)
from tests.support.blackhole import BlackholeProxy
from tests.support.lab import MIB, build_lab, lab_vm
from tests.support.replay import find_prefix

pytestmark = pytest.mark.timeout(300)
THRESHOLD_S = 60.0
"""The WAN threshold here: the blackhole below lasts a fraction of it, even when slow."""
CHUNK = 64 * 1024
HOT = 2 * MIB
"""The guest writes only here (warmed into the cache first): no write needs a fetch."""


@pytest.fixture
def component_pids(data_dir: Path) -> Iterator[list[int]]:
    pids: list[int] = []
    yield pids
    kill_pids(pids, data_dir)


async def hot_guest(address: object, export: str, log_path: Path, seed: int) -> Guest:
    """The cloud VM's guest, every operation in the first ``HOT`` bytes of its disk."""
    backend = await NbdBackend.connect(address, export)  # type: ignore[arg-type]
    log = await WriteLog.create(log_path, seed=seed, disk_size=backend.size, batch=16)
    spec = WorkloadSpec(
        seed=seed, max_length=128 * 1024, hot_ratio=1.0, hot_fraction=HOT / backend.size
    )
    guest = Guest(backend, GuestWorkload(backend, spec, log), log, asyncio.Event())
    guest.task = asyncio.create_task(guest._run())
    return guest


def uncached_chunk(base: bytes) -> int:
    """A chunk past the guest's region that holds data on-prem (a miss must fetch it)."""
    for offset in range(4 * MIB, len(base), CHUNK):
        if any(base[offset : offset + CHUNK]):
            return offset
    raise AssertionError("no data past 4 MiB")


async def in_cloud(follower: Follower) -> str:
    latest = await follower.until(
        lambda latest: bool(latest) and all(s.phase is Phase.IN_CLOUD for s in latest.values()),
        within_s=120,
    )
    (status,) = latest.values()
    return status.migration_id


async def test_a_blackhole_shorter_than_the_threshold_stalls_reads_and_loses_nothing(
    harness: Harness, start_appliance: StartAppliance, tmp_path: Path, component_pids: list[int]
) -> None:
    vm = lab_vm(1, disks=1, disk_size=8 * MIB)
    await build_lab(harness.data_dir, [vm])
    base = await read_onprem(harness.data_dir, vm.vm_id, "disk-0")
    uncached = uncached_chunk(base)
    async with BlackholeProxy("127.0.0.1", 9) as wan:  # aimed at on-prem once it listens
        settings = harness.settings(
            **TBC_SETTINGS,
            wan_upstream=f"127.0.0.1:{wan.port}",
            wan_down_threshold_s=THRESHOLD_S,
        )
        running = await start_appliance(settings)
        async with FerryClient(harness.client_settings()) as client, state_store(harness) as store:
            component_pids += (await components_up(store)).values()
            onprem = await ComponentHealth(store, 120).report(ONPREM)
            onprem_address = parse_address(str(onprem.figures["address"]))
            wan.retarget(onprem_address.host, onprem_address.port)
            follower = await start_migration(client, tbc_request(client, [vm.vm_id]))
            migration_id = await in_cloud(follower)
            disk = f"{migration_id}-disk-0"
            address, export = await cloud_export(harness.data_dir, migration_id, "disk-0")
            assert wan.connections >= 1  # the cache reads on-prem through the proxy
            async with await NbdBackend.connect(address, export) as other:
                assert await other.read(0, HOT) == base[:HOT]  # the guest's region, cached
                guest = await hot_guest(address, export, tmp_path / "guest.log", seed=21)
                await guest.wait_writes(20, within_s=60)
                before = await committed_epoch(store, disk)
                # (Older heartbeats may still wait in the queue: wait for a current one.)
                await beat_until(
                    client,
                    lambda b: (
                        b.body.status is ReadyStatus.READY
                        and states(b).get(WAN_LINK) is ComponentState.OK
                    ),
                )

                wan.blackhole()
                degraded = await beat_until(
                    client, lambda b: states(b)[WAN_LINK] is ComponentState.DEGRADED
                )
                assert degraded.body.status is ReadyStatus.READY  # tolerated, not a failure
                link = next(c for c in degraded.body.components if c.name == WAN_LINK)
                assert "unreachable from the cache" in link.detail
                # The guest goes on writing into the cache.
                written = await guest.writes()
                await guest.wait_writes(written + 30, within_s=60)
                # A miss waits for the link (the guest's region is unaffected meanwhile).
                reading = asyncio.create_task(other.read(uncached, CHUNK))
                acknowledged = guest.workload.stats().last_sequence
                syncing = asyncio.create_task(client.request(sync([migration_id]), timeout_s=150))
                health = ComponentHealth(store, 120)
                cut = await health.wait_until(
                    CACHE, lambda r: bool(r.figures.get("epochs_in_flight", {}).get(disk)), 60
                )
                epoch = cut.figures["epochs_in_flight"][disk][-1]
                written = await guest.writes()
                await guest.wait_writes(written + 30, within_s=60)
                assert not reading.done() and not syncing.done()
                assert await committed_epoch(store, disk) == before
                still = await beat_until(client, lambda b: True)
                assert still.body.status is ReadyStatus.READY
                assert states(still)[WAN_LINK] is ComponentState.DEGRADED
                assert wan.down and wan.blackholes == 1

                wan.heal()
                assert await asyncio.wait_for(reading, 60) == base[uncached : uncached + CHUNK]
                answer = await asyncio.wait_for(syncing, 120)
                assert isinstance(answer, SourceCloneResponse)
                assert await committed_epoch(store, disk) >= epoch > before
                image = await read_current(onprem_address, disk)
                back = await beat_until(client, lambda b: states(b)[WAN_LINK] is ComponentState.OK)
                assert back.body.status is ReadyStatus.READY
                last = await guest.halt()

            log = await read_write_log(tmp_path / "guest.log")
            prefix = find_prefix(image, base, log, acknowledged)
            assert prefix is not None, "on-prem is not a replay of a prefix of the guest's log"
            assert acknowledged <= prefix <= last

            await client.request(migrate_back([migration_id]))
            final = await follower.until(
                lambda latest: all(
                    s.state in (MigrationState.MIGRATED_BACK, MigrationState.FAILED)
                    for s in latest.values()
                ),
                within_s=180,
            )
            (status,) = final.values()
            assert status.state is MigrationState.MIGRATED_BACK, status.error
        await running.shutdown()
    assert await read_onprem(harness.data_dir, vm.vm_id, "disk-0") == await expected_after(
        base, tmp_path / "guest.log"
    )
    print(f"wan blackhole: epoch {epoch} cut during the outage committed after; prefix {prefix}")


async def read_current(address: object, disk: str) -> bytes:
    async with await NbdBackend.connect(address, current_export(disk)) as current:  # type: ignore[arg-type]
        return await current.read(0, current.size)


SHORT_THRESHOLD_S = 6.0
RECOVERY_SUCCESS = "_HDM_RECOVERYSUCCESS"


async def test_a_blackhole_longer_than_the_threshold_fails_the_link_then_sends_the_vm_home(
    harness: Harness, start_appliance: StartAppliance, tmp_path: Path, component_pids: list[int]
) -> None:
    """Past the threshold the link is failed: an event, Not Ready naming it, new tbc
    migrations refused, and a miss that waited that long fails (not before); guest writes
    still land. Once the link is back (issue 11: "Longer: the failure path above, once the
    link returns"): recovered, Ready, and the cache's VM goes home by itself to its last
    committed epoch (``_HDM_RECOVERYSUCCESS``), nothing acknowledged before it lost."""
    vm = lab_vm(1, disks=1, disk_size=8 * MIB)
    await build_lab(harness.data_dir, [vm, lab_vm(2, disks=1, disk_size=MIB)])
    base = await read_onprem(harness.data_dir, vm.vm_id, "disk-0")
    uncached = uncached_chunk(base)
    async with BlackholeProxy("127.0.0.1", 9) as wan:
        settings = harness.settings(
            **TBC_SETTINGS,
            wan_upstream=f"127.0.0.1:{wan.port}",
            wan_down_threshold_s=SHORT_THRESHOLD_S,
        )
        running = await start_appliance(settings)
        async with FerryClient(harness.client_settings()) as client, state_store(harness) as store:
            component_pids += (await components_up(store)).values()
            onprem = await ComponentHealth(store, 120).report(ONPREM)
            onprem_address = parse_address(str(onprem.figures["address"]))
            wan.retarget(onprem_address.host, onprem_address.port)
            follower = await start_migration(client, tbc_request(client, [vm.vm_id]))
            migration_id = await in_cloud(follower)
            disk = f"{migration_id}-disk-0"
            address, export = await cloud_export(harness.data_dir, migration_id, "disk-0")
            async with await NbdBackend.connect(address, export) as other:
                assert await other.read(0, HOT) == base[:HOT]
                guest = await hot_guest(address, export, tmp_path / "guest.log", seed=22)
                await guest.wait_writes(10, within_s=60)
                # Every write acknowledged now is in the epoch the sync cuts, committed on-prem.
                acknowledged = guest.workload.stats().last_sequence
                await client.request(sync([migration_id]), timeout_s=120)
                committed = await committed_epoch(store, disk)
                assert committed >= 1

                wan.blackhole()
                loop = asyncio.get_running_loop()
                started = loop.time()
                with pytest.raises(NbdCommandError):  # EIO, once the threshold has passed
                    await other.read(uncached, CHUNK)
                assert loop.time() - started >= SHORT_THRESHOLD_S - 0.5
                down = await beat_until(
                    client, lambda b: states(b).get(WAN_LINK) is ComponentState.FAILED
                )
                assert down.body.status is ReadyStatus.NOT_READY
                assert down.body.status_details[0] == "Services not ready or down wan_link"
                with pytest.raises(FerryError) as refused:
                    await client.request(tbc_request(client, ["vm-0002"]), timeout_s=60)
                assert refused.value.code is ErrorCode.SERVICES_DEGRADED
                written = await guest.writes()
                await guest.wait_writes(written + 20, within_s=60)  # still writing
                # The guest stops before the link returns: its VM is about to go home.
                last = await guest.halt()
                assert await committed_epoch(store, disk) == committed  # nothing shipped

                wan.heal()
                back = await beat_until(
                    client,
                    lambda b: (
                        b.body.status is ReadyStatus.READY
                        and states(b).get(WAN_LINK) is ComponentState.OK
                    ),
                )
                assert back.body.status_details == ()
            # Events are written as they are noticed: wait for the recovery's.
            logged = await health_events_until(store, failed_then_recovered(WAN_LINK))
            events = [e for e in logged if e.fields.get("component") == WAN_LINK]
            status = await recovered(follower)
        await running.shutdown()
    kinds = [e.kind for e in events]
    assert HealthEvent.COMPONENT_FAILED in kinds
    assert kinds.index(HealthEvent.COMPONENT_FAILED) < len(kinds) - 1
    assert kinds[-1] == HealthEvent.COMPONENT_RECOVERED
    assert status.recovery is not None and status.recovery.pool == RECOVERY_SUCCESS, status
    assert status.recovery.component == str(CACHE)
    assert "WAN link" in status.recovery.reason
    onprem_site = LabSite.open(harness.data_dir / "sites" / "onprem")
    try:
        home = await onprem_site.get_vm(vm.vm_id)
    finally:
        await onprem_site.close()
    assert home.resource_pool == RECOVERY_SUCCESS and home.power_state is PowerState.OFF
    # On-prem holds the last committed epoch: a prefix of the guest's log that holds every
    # write acknowledged before the sync; the writes made in the cache after it are gone.
    log = await read_write_log(tmp_path / "guest.log")
    image = await read_onprem(harness.data_dir, vm.vm_id, "disk-0")
    prefix = find_prefix(image, base, log, acknowledged)
    assert prefix is not None, "on-prem is not a replay of a prefix of the guest's log"
    assert acknowledged <= prefix < last
    print(f"wan blackhole past the threshold: home at epoch {committed}, prefix {prefix}/{last}")


async def recovered(follower: Follower) -> MigrationStatus:
    """The migration went home by itself (recovery), not by a migrate back."""
    final = await follower.until(
        lambda latest: all(
            s.state in (MigrationState.RECOVERED, MigrationState.RECOVERY_FAILED)
            for s in latest.values()
        ),
        within_s=180,
    )
    (status,) = final.values()
    assert status.state is MigrationState.RECOVERED, status
    assert status.phase is Phase.DONE
    return status
