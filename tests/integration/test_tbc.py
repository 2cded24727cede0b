"""Try before commit over SQS, with the real cache and I/O manager processes.

The cloud VM's guest is the workload generator writing to the cache's NBD
export (found in the cloud VM's configuration); epochs are cut by the
appliance every RTO/RPO interval of the cluster's policy and on SyncRequest,
and committed on-prem by the I/O manager; a planned migrate back leaves the
on-prem disk equal to the replay of the guest's whole write log.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from appliance.components.heartbeat import ComponentHealth
from appliance.sites.lab.site import LabSite
from clients.client import FerryClient, FerryError
from messages.commands import (
    CancelRequest,
    CancelRequestBody,
    MigrationSelector,
    SetPolicyRequest,
    SetPolicyRequestBody,
)
from messages.common import MigrationState, Phase, PowerState
from messages.errors import ErrorCode
from messages.events import SourceCloneResponse
from tests.integration.conftest import Harness
from tests.integration.migration_helpers import ApplianceProcess, Follower, start_migration
from tests.integration.tbc_helpers import (
    CACHE,
    TBC_SETTINGS,
    Guest,
    cloud_export,
    commit_request,
    committed_at_least,
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
from tests.support.lab import MIB, build_lab, lab_vm

pytestmark = pytest.mark.timeout(300)


@pytest.fixture
def component_pids(data_dir: Path) -> Iterator[list[int]]:
    """Component processes a test's appliance started: an appliance that stops while VMs
    run on them leaves them running (by design), so a test that fails midway kills them."""
    pids: list[int] = []
    yield pids
    kill_pids(pids, data_dir)


async def _in_cloud(follower: Follower, count: int) -> None:
    await follower.until(
        lambda latest: (
            len(latest) >= count and all(s.phase is Phase.IN_CLOUD for s in latest.values())
        ),
        within_s=120,
    )


async def _back(follower: Follower, count: int) -> None:
    latest = await follower.until(
        lambda latest: (
            len(latest) >= count
            and all(
                s.state in (MigrationState.MIGRATED_BACK, MigrationState.FAILED)
                for s in latest.values()
            )
        ),
        within_s=180,
    )
    for status in latest.values():
        assert status.state is MigrationState.MIGRATED_BACK, status.error


async def test_tbc_runs_in_the_cloud_flushes_by_policy_and_migrates_back_losing_nothing(
    harness: Harness, start_appliance: StartAppliance, tmp_path: Path, component_pids: list[int]
) -> None:
    vm = lab_vm(1, disks=1, disk_size=8 * MIB)
    await build_lab(harness.data_dir, [vm])
    base = await read_onprem(harness.data_dir, vm.vm_id, "disk-0")
    running = await start_appliance(harness.settings(**TBC_SETTINGS))
    async with FerryClient(harness.client_settings()) as client, state_store(harness) as store:
        component_pids += (await components_up(store)).values()
        policy = SetPolicyRequestBody(cluster="cluster-a", rto_rpo_interval_s=10)
        await client.request(SetPolicyRequest(body=policy))
        follower = await start_migration(client, tbc_request(client, [vm.vm_id]))
        await _in_cloud(follower, 1)
        (status,) = follower.latest.values()
        migration_id = status.migration_id
        disk = f"{migration_id}-disk-0"

        # Parked on-prem, powered off; the cloud VM runs on the cache's export.
        onprem = LabSite.open(harness.data_dir / "sites" / "onprem")
        parked = await onprem.get_vm(vm.vm_id)
        assert parked.resource_pool == "_HDM_MIGRATEPOOL"
        assert parked.power_state is PowerState.OFF
        assert parked.tag("ferry.guest_prepared") == "true"  # credentials used, dropped
        cloud = LabSite.open(harness.data_dir / "sites" / "cloud")
        twin = await cloud.get_vm(migration_id)
        await cloud.close()
        assert (twin.cpus, twin.memory_mib, twin.firmware) == (vm.cpus, vm.memory_mib, vm.firmware)
        assert [n.network for n in twin.nics] == ["cloud-app"]  # prod-app, mapped
        assert twin.power_state is PowerState.ON
        address, export = await cloud_export(harness.data_dir, migration_id, "disk-0")
        guest = await Guest.start(address, export, tmp_path / "guest.log", seed=11)

        # Epochs by policy (every 10 s) commit while the guest writes.
        await committed_at_least(store, disk, 2, within_s=60)
        assert await guest.writes() > 0

        # A sync cuts one now and answers once it is committed on-prem.
        before = await committed_epoch(store, disk)
        answer = await client.request(sync([migration_id]), timeout_s=120)
        assert isinstance(answer, SourceCloneResponse)
        assert await committed_epoch(store, disk) > before

        # A second migration of the VM resting in the cloud is refused with its own code.
        with pytest.raises(FerryError) as refused:
            await client.request(tbc_request(client, [vm.vm_id]))
        assert refused.value.code is ErrorCode.RESTING_IN_CLOUD

        # Migrate back: the guest stops as its VM powers off; nothing it wrote is lost.
        await guest.halt()
        await client.request(migrate_back([migration_id]))
        await _back(follower, 1)
        with pytest.raises(FerryError) as twice:
            await client.request(migrate_back([migration_id]))
        assert twice.value.code is ErrorCode.MIGRATING_BACK
    await running.shutdown()

    back = await onprem.get_vm(vm.vm_id)
    assert back.resource_pool == "Production" and back.power_state is PowerState.OFF
    assert await onprem.vm_snapshot_names(vm.vm_id) == []
    await onprem.close()
    assert not (harness.data_dir / "sites" / "cloud" / "vms" / migration_id).exists()
    cache_disks = harness.data_dir / "components" / "cache" / "cache-1" / "disks" / migration_id
    assert not (cache_disks / disk).exists()  # its cache disk removed, not just closed
    image = await read_onprem(harness.data_dir, vm.vm_id, "disk-0")
    expected = await expected_after(base, tmp_path / "guest.log")
    assert expected != base  # the guest did write
    assert image == expected


async def test_a_dependency_group_rests_together_takes_a_policy_live_and_migrates_back_together(
    harness: Harness, start_appliance: StartAppliance, tmp_path: Path, component_pids: list[int]
) -> None:
    one, two = lab_vm(1, disks=1, disk_size=4 * MIB), lab_vm(2, disks=2, disk_size=4 * MIB)
    await build_lab(harness.data_dir, [one, two])
    bases = {
        (vm.vm_id, d.disk_id): await read_onprem(harness.data_dir, vm.vm_id, d.disk_id)
        for vm in (one, two)
        for d in vm.disks
    }
    running = await start_appliance(harness.settings(**TBC_SETTINGS))
    async with FerryClient(harness.client_settings()) as client, state_store(harness) as store:
        component_pids += (await components_up(store)).values()
        request = tbc_request(client, [one.vm_id, two.vm_id], groups=[[one.vm_id, two.vm_id]])
        follower = await start_migration(client, request)
        await _in_cloud(follower, 2)
        ids = {s.vm_id: s.migration_id for s in follower.latest.values()}
        disk = f"{ids[one.vm_id]}-disk-0"
        address, export = await cloud_export(harness.data_dir, ids[one.vm_id], "disk-0")
        guest = await Guest.start(address, export, tmp_path / "guest.log", seed=5)

        # The default interval (20 min) cuts nothing here; a policy set now takes effect
        # at the next tick of the resting run.
        assert await committed_epoch(store, disk) == 0
        policy = SetPolicyRequestBody(cluster="cluster-a", rto_rpo_interval_s=10)
        await client.request(SetPolicyRequest(body=policy))
        await committed_at_least(store, disk, 1, within_s=60)

        # Naming one member migrates the whole group back (here: powered on, snapshot kept).
        await guest.halt()
        answer = await client.request(
            migrate_back([ids[one.vm_id]], power_on=True, keep_snapshot=True)
        )
        assert isinstance(answer, SourceCloneResponse)
        with pytest.raises(FerryError) as during:
            await client.request(commit_request([ids[two.vm_id]]))
        assert during.value.code is ErrorCode.MIGRATING_BACK
        await _back(follower, 2)
    await running.shutdown()

    onprem = LabSite.open(harness.data_dir / "sites" / "onprem")
    for vm in (one, two):
        back = await onprem.get_vm(vm.vm_id)
        assert back.resource_pool == "Production" and back.power_state is PowerState.ON
        (snapshot,) = await onprem.vm_snapshot_names(vm.vm_id)
        assert snapshot.startswith("ferry-")
    await onprem.close()
    expected = await expected_after(bases[(one.vm_id, "disk-0")], tmp_path / "guest.log")
    assert await read_onprem(harness.data_dir, one.vm_id, "disk-0") == expected
    for disk_id in ("disk-0", "disk-1"):
        image = await read_onprem(harness.data_dir, two.vm_id, disk_id)
        assert image == bases[(two.vm_id, disk_id)]


@pytest.mark.parametrize("back_steps_seen", [2, 4], ids=["final_epoch", "restoring_disks"])
async def test_sigkill_while_resting_and_while_migrating_back_resumes_losing_nothing(
    harness: Harness, tmp_path: Path, back_steps_seen: int
) -> None:
    """The appliance dies while its VM runs in the cloud: the components keep serving the
    guest, and after a restart the epochs resume; it dies again while migrating back: the
    restarted one finishes the migrate back, and nothing the guest wrote is lost."""
    vm = lab_vm(1, disks=1, disk_size=4 * MIB)
    await build_lab(harness.data_dir, [vm])
    base = await read_onprem(harness.data_dir, vm.vm_id, "disk-0")
    overrides = {**TBC_SETTINGS, "debug_step_delay_s": 0.3, "lease_ttl_s": 3.0}
    appliances = [
        ApplianceProcess(harness, tmp_path / f"appliance-{n}.log", **overrides) for n in range(3)
    ]
    orphans: list[int] = []
    try:
        await appliances[0].start()
        async with FerryClient(harness.client_settings()) as client, state_store(harness) as store:
            orphans += (await components_up(store)).values()
            policy = SetPolicyRequestBody(cluster="cluster-a", rto_rpo_interval_s=10)
            await client.request(SetPolicyRequest(body=policy))
            follower = await start_migration(client, tbc_request(client, [vm.vm_id]))
            await _in_cloud(follower, 1)
            (status,) = follower.latest.values()
            migration_id, disk = status.migration_id, f"{status.migration_id}-disk-0"
            address, export = await cloud_export(harness.data_dir, migration_id, "disk-0")
            guest = await Guest.start(address, export, tmp_path / "guest.log", seed=7)
            await committed_at_least(store, disk, 1, within_s=60)

            appliances[0].kill()
            written = await guest.writes()
            await guest.wait_writes(written + 50, within_s=30)  # served while it is down
            # The open epoch (not cut yet) commits only once the next appliance cuts it.
            cache = await ComponentHealth(store, 120).report(CACHE)
            open_epoch = int(cache.figures["open_epoch"][disk])
            await appliances[1].start()
            await committed_at_least(store, disk, open_epoch, within_s=60)  # epochs resume

            await guest.halt()
            await client.request(migrate_back([migration_id]))

            def back_steps(_: object) -> bool:
                seen = sum(s.phase is Phase.MIGRATE_BACK for s in follower.history)
                return seen >= back_steps_seen

            await follower.until(back_steps, within_s=120)
            appliances[1].kill()
            await appliances[2].start()
            await _back(follower, 1)
        await appliances[2].stop()
    finally:
        for appliance in appliances:
            appliance.kill()
        kill_pids(orphans, harness.data_dir)
    image = await read_onprem(harness.data_dir, vm.vm_id, "disk-0")
    expected = await expected_after(base, tmp_path / "guest.log")
    assert expected != base
    assert image == expected


async def test_a_cancel_before_the_vm_runs_in_the_cloud_rolls_back_and_closes_its_disks(
    harness: Harness, start_appliance: StartAppliance, component_pids: list[int]
) -> None:
    """The cache is held (SIGSTOP) so the migration waits on its open order; a cancel then
    rolls it back once the cache answers: the components let go of the disks, the source is
    as it was, nothing is left in the cloud."""
    vm = lab_vm(1, disks=1, disk_size=4 * MIB)
    await build_lab(harness.data_dir, [vm])
    base = await read_onprem(harness.data_dir, vm.vm_id, "disk-0")
    running = await start_appliance(harness.settings(**TBC_SETTINGS))
    async with FerryClient(harness.client_settings()) as client, state_store(harness) as store:
        pids = await components_up(store)
        component_pids += pids.values()
        cache_pid = pids[str(CACHE)]
        os.kill(cache_pid, signal.SIGSTOP)
        try:
            follower = await start_migration(client, tbc_request(client, [vm.vm_id]))
            await follower.until(
                lambda latest: any(s.phase is Phase.OPEN_DISKS for s in latest.values())
            )
            (migration_id,) = follower.latest
            selector = MigrationSelector(migration_ids=(migration_id,))
            answer = await client.request(CancelRequest(body=CancelRequestBody(select=selector)))
            assert isinstance(answer, SourceCloneResponse)
            assert answer.body.state is MigrationState.CANCELLING
        finally:
            os.kill(cache_pid, signal.SIGCONT)
        (status,) = (await follower.finished(1)).values()
        assert status.state is MigrationState.CANCELLED
        disk = f"{migration_id}-disk-0"
        cache = await ComponentHealth(store, 120).wait_until(
            CACHE, lambda r: disk not in r.figures.get("exports", []), 30
        )
        assert disk not in cache.figures.get("exports", [])
    await running.shutdown()

    onprem = LabSite.open(harness.data_dir / "sites" / "onprem")
    after = await onprem.get_vm(vm.vm_id)
    assert after.resource_pool == "Production" and after.power_state is PowerState.ON
    assert await onprem.vm_snapshot_names(vm.vm_id) == []
    await onprem.close()
    assert not (harness.data_dir / "sites" / "cloud" / "vms" / migration_id).exists()
    assert await read_onprem(harness.data_dir, vm.vm_id, "disk-0") == base


@pytest.mark.parametrize("phase", [Phase.OPEN_DISKS, Phase.PARK])
async def test_sigkill_on_the_way_to_the_cloud_resumes_there(
    harness: Harness, tmp_path: Path, phase: Phase
) -> None:
    """Killed while opening the disks or parking the source: the next appliance takes the
    group over, runs the interrupted step again (orders are desired state, carried out
    once) and reaches the cloud; the migrate back then finds the disk as it was."""
    vm = lab_vm(1, disks=2, disk_size=4 * MIB)
    await build_lab(harness.data_dir, [vm])
    bases = {d.disk_id: await read_onprem(harness.data_dir, vm.vm_id, d.disk_id) for d in vm.disks}
    overrides = {**TBC_SETTINGS, "debug_step_delay_s": 0.5, "lease_ttl_s": 3.0}
    appliances = [
        ApplianceProcess(harness, tmp_path / f"appliance-{n}.log", **overrides) for n in range(2)
    ]
    orphans: list[int] = []
    try:
        await appliances[0].start()
        async with FerryClient(harness.client_settings()) as client, state_store(harness) as store:
            orphans += (await components_up(store)).values()
            follower = await start_migration(client, tbc_request(client, [vm.vm_id]))
            await follower.until(lambda latest: any(s.phase is phase for s in latest.values()))
            appliances[0].kill()
            await appliances[1].start()
            await _in_cloud(follower, 1)
            (status,) = follower.latest.values()
            steps = [s.phase for s in follower.history]
            assert steps.count(Phase.IN_CLOUD) == 1
            await client.request(migrate_back([status.migration_id]))
            await _back(follower, 1)
        await appliances[1].stop()
    finally:
        for appliance in appliances:
            appliance.kill()
        kill_pids(orphans, harness.data_dir)
    for disk_id, base in bases.items():
        assert await read_onprem(harness.data_dir, vm.vm_id, disk_id) == base


async def test_a_clean_appliance_stop_leaves_the_components_serving_the_cloud_vm(
    harness: Harness, tmp_path: Path
) -> None:
    """SIGTERM while a VM rests in the cloud: the embedded components are left running (the
    guest keeps its disk), the next appliance finds them and carries on."""
    vm = lab_vm(1, disks=1, disk_size=4 * MIB)
    await build_lab(harness.data_dir, [vm])
    base = await read_onprem(harness.data_dir, vm.vm_id, "disk-0")
    overrides = {**TBC_SETTINGS, "lease_ttl_s": 3.0}
    appliances = [
        ApplianceProcess(harness, tmp_path / f"appliance-{n}.log", **overrides) for n in range(2)
    ]
    orphans: list[int] = []
    try:
        await appliances[0].start()
        async with FerryClient(harness.client_settings()) as client, state_store(harness) as store:
            pids = await components_up(store)
            orphans += pids.values()
            policy = SetPolicyRequestBody(cluster="cluster-a", rto_rpo_interval_s=10)
            await client.request(SetPolicyRequest(body=policy))
            follower = await start_migration(client, tbc_request(client, [vm.vm_id]))
            await _in_cloud(follower, 1)
            (status,) = follower.latest.values()
            migration_id, disk = status.migration_id, f"{status.migration_id}-disk-0"
            address, export = await cloud_export(harness.data_dir, migration_id, "disk-0")
            guest = await Guest.start(address, export, tmp_path / "guest.log", seed=13)

            assert await appliances[0].stop() == 0
            written = await guest.writes()
            await guest.wait_writes(written + 50, within_s=30)
            assert await components_up(store) == pids  # the same processes, still beating
            cache = await ComponentHealth(store, 120).report(CACHE)
            open_epoch = int(cache.figures["open_epoch"][disk])
            await appliances[1].start()
            await committed_at_least(store, disk, open_epoch, within_s=60)

            await guest.halt()
            await client.request(migrate_back([migration_id]))
            await _back(follower, 1)
        await appliances[1].stop()
    finally:
        for appliance in appliances:
            appliance.kill()
        kill_pids(orphans, harness.data_dir)
    expected = await expected_after(base, tmp_path / "guest.log")
    assert expected != base
    assert await read_onprem(harness.data_dir, vm.vm_id, "disk-0") == expected


async def test_an_epoch_is_cut_when_the_policy_s_dirty_bytes_are_reached(
    harness: Harness, start_appliance: StartAppliance, tmp_path: Path, component_pids: list[int]
) -> None:
    """An hour's interval, no sync: only the cluster's ``rpo_dirty_bytes`` can cut."""
    vm = lab_vm(1, disks=1, disk_size=8 * MIB)
    await build_lab(harness.data_dir, [vm])
    base = await read_onprem(harness.data_dir, vm.vm_id, "disk-0")
    running = await start_appliance(harness.settings(**TBC_SETTINGS))
    async with FerryClient(harness.client_settings()) as client, state_store(harness) as store:
        component_pids += (await components_up(store)).values()
        policy = SetPolicyRequestBody(
            cluster="cluster-a", rto_rpo_interval_s=3600, rpo_dirty_bytes=1024 * 1024
        )
        await client.request(SetPolicyRequest(body=policy))
        follower = await start_migration(client, tbc_request(client, [vm.vm_id]))
        await _in_cloud(follower, 1)
        (status,) = follower.latest.values()
        migration_id = status.migration_id
        disk = f"{migration_id}-disk-0"
        first = await committed_epoch(store, disk)
        address, export = await cloud_export(harness.data_dir, migration_id, "disk-0")
        guest = await Guest.start(address, export, tmp_path / "guest.log", seed=5)
        await committed_at_least(store, disk, first + 1, within_s=60)
        await guest.halt()
        await client.request(migrate_back([migration_id]))
        await _back(follower, 1)
    await running.shutdown()
    image = await read_onprem(harness.data_dir, vm.vm_id, "disk-0")
    assert image == await expected_after(base, tmp_path / "guest.log")
