"""Recovery over SQS with the real cache and I/O manager processes: a lost component sends the
VMs that depend on it (and only them) back on-prem to their last committed epoch.

* the cache killed and its data directory removed (restarted empty by the supervisor, it says
  ``data_lost`` instead of serving an empty disk): the dependency group lands in
  ``_HDM_RECOVERYSUCCESS``, its on-prem disks a prefix of the guest's write log that holds
  every write acknowledged before the last committed epoch; a cold VM is untouched;
* the same with the I/O manager's journal showing an epoch committed but not applied (its
  staging gone): ``_HDM_RECOVERYFAILED``, the migrate-time snapshot kept;
* a warm migration caught reconciling: it fails and goes back the same way;
* the cache paused (SIGSTOP) past the deadline while an epoch ships, resumed (SIGCONT) after
  the recovery: its epoch requests carry the old token and are refused on-prem; the
  on-prem image does not change.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from appliance.clock import SystemClock
from appliance.components.heartbeat import ComponentHealth, ComponentReport, Liveness
from appliance.components.onprem.journal import EpochJournal
from appliance.components.onprem.manifest import EpochManifest, ManifestEntry
from appliance.orchestrator.record import MigrationRecord, load
from appliance.orchestrator.recovery import RecoveryEvent
from appliance.service.recovery import recovery_trigger
from appliance.sites.lab.site import LabSite
from appliance.sites.lab.workload import read_write_log
from appliance.state.events import EventRecord, _record
from appliance.state.migrations import MigrationStore
from appliance.state.store import StateStore
from clients.client import FerryClient
from messages.commands import StatusRequestBody
from messages.common import MigrationState, Phase, PowerState
from messages.events import MigrationStatus
from tests.integration.conftest import Harness
from tests.integration.migration_helpers import Follower, clone_request, start_migration
from tests.integration.tbc_helpers import (
    CACHE,
    ONPREM,
    TBC_SETTINGS,
    Guest,
    cloud_export,
    commit_request,
    components_up,
    kill_pids,
    read_onprem,
    state_store,
    sync,
    tbc_request,
)
from tests.integration.test_bus import StartAppliance
from tests.integration.test_warm import WARM_SETTINGS, open_gates, warm_request
from tests.support.lab import MIB, build_lab, lab_vm
from tests.support.records import until_record
from tests.support.replay import find_prefix, replay

pytestmark = pytest.mark.timeout(300)

SUCCESS, FAILED = "_HDM_RECOVERYSUCCESS", "_HDM_RECOVERYFAILED"
OVER = {MigrationState.RECOVERED, MigrationState.RECOVERY_FAILED}
# Data lost is the only trigger here: the deadline is far away. No repair: these tests hold a
# component stopped (SIGSTOP) on purpose, which a repair would kill and restart (an exited
# child is still restarted by the supervisor).
DATA_LOST_SETTINGS: dict[str, Any] = {
    **TBC_SETTINGS,
    "recovery_after_s": 600.0,
    "component_repair": False,
}


@pytest.fixture
def component_pids(data_dir: Path) -> Iterator[list[int]]:
    pids: list[int] = []
    yield pids
    kill_pids(pids, data_dir)


def component_dir(data_dir: Path, kind: str, name: str) -> Path:
    return data_dir / "components" / kind / name


def lose_cache(data_dir: Path, pid: int) -> None:
    """The cache dies with its data: stopped first, so its supervisor cannot restart it
    before the directory is gone; then killed (and restarted, empty)."""
    os.kill(pid, signal.SIGSTOP)
    shutil.rmtree(component_dir(data_dir, "cache", "cache-1"))
    os.kill(pid, signal.SIGKILL)


async def back_on_prem(follower: Follower, count: int, within_s: float = 150) -> None:
    await follower.until(
        lambda latest: len(latest) >= count and all(s.state in OVER for s in latest.values()),
        within_s=within_s,
    )


async def new_pid(store: StateStore, old: int, pids: list[int]) -> None:
    """The restarted component's pid, for the cleanup."""
    report = await ComponentHealth(store, 120).wait_until(
        CACHE, lambda r: r.liveness is Liveness.OK and r.pid not in (None, old), 60
    )
    assert report.pid is not None
    pids.append(report.pid)


async def global_events(store: StateStore) -> list[EventRecord]:
    rows: Any = await store.redis.xrange(store.keys.events)
    return [_record(event_id, fields) for event_id, fields in rows]


async def record_of(store: StateStore, migration_id: str) -> MigrationRecord:
    stored = await MigrationStore(store).get(migration_id)
    assert stored is not None
    return load(stored.record)


def print_figures(case: str, lost_at: datetime, events: list[EventRecord]) -> None:
    """Seconds from the loss to the trigger, and to each VM back (shown with ``pytest -s``)."""
    started = next(e for e in events if e.kind == RecoveryEvent.RECOVERY_STARTED)
    back = [e for e in events if e.kind in set(RecoveryEvent) - {started.kind}]

    def after(event: EventRecord) -> float:
        return (datetime.fromisoformat(event.at) - lost_at).total_seconds()

    print(
        f"\nrecovery figures ({case}): recovery started {after(started):.2f} s after the loss; "
        + ", ".join(f"{e.migration_id} back after {after(e):.2f} s" for e in back)
    )


def check_recovered(status: MigrationStatus, pool: str, lost: str = str(CACHE)) -> None:
    assert status.phase is Phase.DONE
    assert status.recovery is not None, status
    assert status.recovery.component == lost
    assert status.recovery.pool == pool
    assert status.error is not None and status.error.code == "component_lost"


async def test_a_cache_lost_with_its_data_sends_its_group_back_to_the_last_committed_epoch(
    harness: Harness, start_appliance: StartAppliance, tmp_path: Path, component_pids: list[int]
) -> None:
    one, two = lab_vm(1, disks=1, disk_size=4 * MIB), lab_vm(2, disks=1, disk_size=4 * MIB)
    cold = lab_vm(3, disks=1, disk_size=2 * MIB)
    await build_lab(harness.data_dir, [one, two, cold])
    bases = {vm.vm_id: await read_onprem(harness.data_dir, vm.vm_id, "disk-0") for vm in (one, two)}
    running = await start_appliance(harness.settings(**DATA_LOST_SETTINGS))
    async with FerryClient(harness.client_settings()) as client, state_store(harness) as store:
        pids = await components_up(store)
        component_pids += pids.values()
        # An unrelated VM, migrated cold: it does not depend on the cache.
        cold_follower = await start_migration(client, clone_request(client, [cold.vm_id]))
        (cold_done,) = (await cold_follower.finished(1)).values()
        assert cold_done.state is MigrationState.COMPLETED

        request = tbc_request(client, [one.vm_id, two.vm_id], groups=[[one.vm_id, two.vm_id]])
        follower = await start_migration(client, request)
        await follower.until(
            lambda latest: (
                len(latest) == 2 and all(s.phase is Phase.IN_CLOUD for s in latest.values())
            ),
            within_s=120,
        )
        ids = {s.vm_id: s.migration_id for s in follower.latest.values()}
        address, export = await cloud_export(harness.data_dir, ids[one.vm_id], "disk-0")
        guest = await Guest.start(address, export, tmp_path / "guest.log", seed=31)
        await guest.wait_writes(40, within_s=60)
        # Every write acknowledged now is in the epoch the sync cuts, committed on-prem.
        acknowledged = guest.workload.stats().last_sequence
        await client.request(sync(list(ids.values())), timeout_s=120)
        written = await guest.writes()
        await guest.wait_writes(written + 40, within_s=60)  # these stay in the cache only
        await guest.halt()

        lost_at = datetime.now(UTC)
        lose_cache(harness.data_dir, pids[str(CACHE)])
        await new_pid(store, pids[str(CACHE)], component_pids)
        await back_on_prem(follower, 2)
        print_figures("data lost", lost_at, await global_events(store))
        for status in follower.latest.values():
            assert status.state is MigrationState.RECOVERED, status
            check_recovered(status, SUCCESS)
            assert status.recovery is not None and "data" in status.recovery.reason
        events = await global_events(store)
        started = [e for e in events if e.kind == RecoveryEvent.RECOVERY_STARTED]
        assert len(started) == 1 and set(started[0].fields["migrations"].split(",")) == set(
            ids.values()
        )
        recovered = [e for e in events if e.kind == RecoveryEvent.MIGRATION_RECOVERED]
        assert {e.migration_id for e in recovered} == set(ids.values())
        assert all(e.fields["pool"] == SUCCESS for e in recovered)
        # The cold VM: untouched.
        answer = await client.status(StatusRequestBody(migration_ids=(cold_done.migration_id,)))
        (still,) = answer.body.migrations
        assert still.state is MigrationState.COMPLETED and still.recovery is None
    await running.shutdown()

    onprem = LabSite.open(harness.data_dir / "sites" / "onprem")
    cloud = LabSite.open(harness.data_dir / "sites" / "cloud")
    try:
        for vm in (one, two):
            back = await onprem.get_vm(vm.vm_id)
            assert back.resource_pool == SUCCESS and back.power_state is PowerState.OFF
            assert back.tag("ferry.migration") is None
            assert not (harness.data_dir / "sites" / "cloud" / "vms" / ids[vm.vm_id]).exists()
        twin = await cloud.get_vm(cold_done.migration_id)
        assert twin.power_state is PowerState.ON
    finally:
        await onprem.close()
        await cloud.close()
    # A prefix of the write log that holds every write acknowledged before the sync's epoch.
    log = await read_write_log(tmp_path / "guest.log")
    image = await read_onprem(harness.data_dir, one.vm_id, "disk-0")
    found = find_prefix(image, bases[one.vm_id], log, acknowledged)
    assert found is not None, "the on-prem disk is no prefix of the write log"
    assert image != replay(bases[one.vm_id], log, log.last_sequence)  # the cache's tail is lost
    assert await read_onprem(harness.data_dir, two.vm_id, "disk-0") == bases[two.vm_id]


async def test_a_half_applied_epoch_on_prem_lands_in_recovery_failed_with_the_snapshot_kept(
    harness: Harness, start_appliance: StartAppliance, tmp_path: Path, component_pids: list[int]
) -> None:
    vm = lab_vm(1, disks=1, disk_size=4 * MIB)
    await build_lab(harness.data_dir, [vm])
    running = await start_appliance(harness.settings(**DATA_LOST_SETTINGS))
    async with FerryClient(harness.client_settings()) as client, state_store(harness) as store:
        pids = await components_up(store)
        component_pids += pids.values()
        follower = await start_migration(client, tbc_request(client, [vm.vm_id]))
        await follower.until(
            lambda latest: all(s.phase is Phase.IN_CLOUD for s in latest.values()), within_s=120
        )
        (migration_id,) = follower.latest
        disk = f"{migration_id}-disk-0"
        address, export = await cloud_export(harness.data_dir, migration_id, "disk-0")
        guest = await Guest.start(address, export, tmp_path / "guest.log", seed=41)
        await guest.wait_writes(30, within_s=60)
        await client.request(sync([migration_id]), timeout_s=120)
        await guest.halt()

        # The I/O manager's journal: epoch 2 committed, never applied, its staging gone
        # (written while the process is stopped; restarted, it cannot reopen the disk).
        os.kill(pids[str(ONPREM)], signal.SIGSTOP)
        journal_path = component_dir(harness.data_dir, "onprem", "onprem-1") / "disks" / disk
        journal = EpochJournal.open(journal_path / "journal")
        assert journal.state.applied_epoch == 1 and journal.state.pending is None
        entry = ManifestEntry(0, 65536, bytes(16))
        journal.append_commit(2, 1, EpochManifest.build((entry,)))
        journal.close()
        os.kill(pids[str(ONPREM)], signal.SIGKILL)
        onprem_up = await ComponentHealth(store, 120).wait_until(
            ONPREM, lambda r: r.liveness is Liveness.OK and r.pid != pids[str(ONPREM)], 60
        )
        assert onprem_up.pid is not None
        component_pids.append(onprem_up.pid)

        lose_cache(harness.data_dir, pids[str(CACHE)])
        await new_pid(store, pids[str(CACHE)], component_pids)
        await back_on_prem(follower, 1)
        (status,) = follower.latest.values()
        assert status.state is MigrationState.RECOVERY_FAILED, status
        check_recovered(status, FAILED)
        assert status.recovery is not None and "not applied" in status.recovery.verdict
        record = await record_of(store, migration_id)
        assert record.snapshot_name is not None
        assert record.snapshot_name in (status.error.message if status.error else "")
        events = await global_events(store)
        failed = [e for e in events if e.kind == RecoveryEvent.MIGRATION_RECOVERY_FAILED]
        assert [(e.migration_id, e.fields["pool"]) for e in failed] == [(migration_id, FAILED)]
    await running.shutdown()

    onprem = LabSite.open(harness.data_dir / "sites" / "onprem")
    try:
        back = await onprem.get_vm(vm.vm_id)
        assert back.resource_pool == FAILED and back.power_state is PowerState.OFF
        assert await onprem.vm_snapshot_names(vm.vm_id) == [record.snapshot_name]
    finally:
        await onprem.close()


async def test_an_io_manager_lost_with_its_journal_lands_in_recovery_failed(
    harness: Harness, start_appliance: StartAppliance, tmp_path: Path, component_pids: list[int]
) -> None:
    vm = lab_vm(1, disks=1, disk_size=4 * MIB)
    await build_lab(harness.data_dir, [vm])
    running = await start_appliance(harness.settings(**DATA_LOST_SETTINGS))
    async with FerryClient(harness.client_settings()) as client, state_store(harness) as store:
        pids = await components_up(store)
        component_pids += pids.values()
        follower = await start_migration(client, tbc_request(client, [vm.vm_id]))
        await follower.until(
            lambda latest: all(s.phase is Phase.IN_CLOUD for s in latest.values()), within_s=120
        )
        (migration_id,) = follower.latest
        address, export = await cloud_export(harness.data_dir, migration_id, "disk-0")
        guest = await Guest.start(address, export, tmp_path / "guest.log", seed=53)
        await guest.wait_writes(30, within_s=60)
        await client.request(sync([migration_id]), timeout_s=120)
        await guest.halt()

        # The I/O manager dies with its data directory (its journals): restarted empty, it
        # cannot say which epochs the on-prem image holds.
        os.kill(pids[str(ONPREM)], signal.SIGSTOP)
        shutil.rmtree(component_dir(harness.data_dir, "onprem", "onprem-1"))
        os.kill(pids[str(ONPREM)], signal.SIGKILL)
        await back_on_prem(follower, 1)
        (status,) = follower.latest.values()
        assert status.state is MigrationState.RECOVERY_FAILED, status
        check_recovered(status, FAILED, lost=str(ONPREM))
        assert status.recovery is not None and "journal is gone" in status.recovery.verdict
        record = await record_of(store, migration_id)
        health = ComponentHealth(store, 120)
        restarted = await health.report(ONPREM)
        assert restarted.pid is not None
        component_pids.append(restarted.pid)
    await running.shutdown()

    onprem = LabSite.open(harness.data_dir / "sites" / "onprem")
    try:
        back = await onprem.get_vm(vm.vm_id)
        assert back.resource_pool == FAILED and back.power_state is PowerState.OFF
        assert await onprem.vm_snapshot_names(vm.vm_id) == [record.snapshot_name]
    finally:
        await onprem.close()
    assert not (harness.data_dir / "sites" / "cloud" / "vms" / migration_id).exists()


async def test_a_warm_migration_caught_reconciling_fails_and_goes_back(
    harness: Harness, start_appliance: StartAppliance, tmp_path: Path, component_pids: list[int]
) -> None:
    vm = lab_vm(1, disks=1, disk_size=4 * MIB)
    await build_lab(harness.data_dir, [vm])
    base = await read_onprem(harness.data_dir, vm.vm_id, "disk-0")
    settings = {**WARM_SETTINGS, "recovery_after_s": 600.0}
    running = await start_appliance(harness.settings(**settings))
    async with FerryClient(harness.client_settings()) as client, state_store(harness) as store:
        pids = await components_up(store)
        component_pids += pids.values()
        follower = await start_migration(client, warm_request(client, vm.vm_id))
        (migration_id,) = follower.latest
        await follower.until(
            lambda latest: latest[migration_id].phase is Phase.TRANSFER, within_s=120
        )
        address, export = await cloud_export(harness.data_dir, migration_id, "disk-0")
        guest = await Guest.start(address, export, tmp_path / "guest.log", seed=43)
        await guest.wait_writes(30, within_s=60)
        await guest.halt()

        def reconciled_once(record: MigrationRecord) -> bool:  # the cutover gate holds it there
            return int((record.extra.get("reconcile") or {}).get("passes", 0)) >= 1

        caught = await until_record(store, migration_id, reconciled_once)
        assert caught.step.value == "reconciling"
        volume_id = caught.disks[0].volume_id
        lose_cache(harness.data_dir, pids[str(CACHE)])
        await new_pid(store, pids[str(CACHE)], component_pids)
        await back_on_prem(follower, 1)
        (status,) = follower.latest.values()
        assert status.state is MigrationState.RECOVERED, status
        check_recovered(status, SUCCESS)
    await running.shutdown()

    onprem = LabSite.open(harness.data_dir / "sites" / "onprem")
    try:
        back = await onprem.get_vm(vm.vm_id)
        assert back.resource_pool == SUCCESS and back.power_state is PowerState.OFF
    finally:
        await onprem.close()
    cloud = harness.data_dir / "sites" / "cloud"
    assert not (cloud / "vms" / migration_id).exists()
    assert not any(volume_id in p.name for p in (cloud / "volumes").glob("*"))
    log = await read_write_log(tmp_path / "guest.log")
    image = await read_onprem(harness.data_dir, vm.vm_id, "disk-0")
    assert find_prefix(image, base, log, 0) is not None


async def test_a_warm_vm_cut_over_to_its_volumes_is_untouched_by_the_cache_s_loss(
    harness: Harness, start_appliance: StartAppliance, component_pids: list[int]
) -> None:
    vm = lab_vm(1, disks=1, disk_size=4 * MIB)
    await build_lab(harness.data_dir, [vm])
    settings = harness.settings(**{**WARM_SETTINGS, "recovery_after_s": 600.0})
    running = await start_appliance(settings)
    async with FerryClient(harness.client_settings()) as client, state_store(harness) as store:
        pids = await components_up(store)
        component_pids += pids.values()
        follower = await start_migration(client, warm_request(client, vm.vm_id))
        (migration_id,) = follower.latest
        await open_gates(store, migration_id)
        await follower.until(
            lambda latest: (
                latest[migration_id].phase is Phase.IN_CLOUD
                and latest[migration_id].state is MigrationState.RUNNING
            ),
            within_s=120,
        )
        assert (await record_of(store, migration_id)).step.value == "cut_over"
        disk = f"{migration_id}-disk-0"

        lose_cache(harness.data_dir, pids[str(CACHE)])
        await new_pid(store, pids[str(CACHE)], component_pids)
        health = ComponentHealth(store, 120)
        await health.wait_until(CACHE, lambda r: disk in r.figures.get("data_lost", {}), 60)
        # The trigger sees the disk lost, and the VM on its volumes: nothing to send back.
        trigger = recovery_trigger(settings, store, health, SystemClock())
        assert trigger is not None
        assert await trigger.check() == []
        assert "recover" not in await MigrationStore(store).asks(migration_id)
        # It goes on: the commit cleans up (the restarted cache closes what it lost).
        await client.request(commit_request([migration_id]))
        (done,) = (await follower.finished(1)).values()
        assert done.state is MigrationState.COMPLETED and done.recovery is None
    await running.shutdown()


async def test_a_cache_paused_past_the_deadline_and_resumed_writes_nothing_on_prem(
    harness: Harness,
    start_appliance: StartAppliance,
    tmp_path: Path,
    component_pids: list[int],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    vm = lab_vm(1, disks=1, disk_size=8 * MIB)
    await build_lab(harness.data_dir, [vm])
    # The cache's own setting (its environment, inherited): an epoch of MiBs ships for many
    # seconds, so the cache is paused in the middle of it.
    monkeypatch.setenv("FERRY_CACHE_BANDWIDTH_BYTES_PER_S", str(128 * 1024))
    settings = {
        **TBC_SETTINGS,
        "component_timeout_s": 5.0,
        "recovery_after_s": 8.0,
        "component_repair": False,  # a cache that cannot be repaired (a remote host lost)
    }
    running = await start_appliance(harness.settings(**settings))
    async with FerryClient(harness.client_settings()) as client, state_store(harness) as store:
        pids = await components_up(store)
        component_pids += pids.values()
        follower = await start_migration(client, tbc_request(client, [vm.vm_id]))
        await follower.until(
            lambda latest: all(s.phase is Phase.IN_CLOUD for s in latest.values()), within_s=120
        )
        (migration_id,) = follower.latest
        disk = f"{migration_id}-disk-0"
        address, export = await cloud_export(harness.data_dir, migration_id, "disk-0")
        guest = await Guest.start(address, export, tmp_path / "guest.log", seed=47)
        await guest.wait_writes(60, within_s=60)
        await guest.halt()

        # An epoch cut and shipping (slowly): the cache is paused in the middle of it.
        syncing = asyncio.create_task(client.request(sync([migration_id]), timeout_s=240))
        health = ComponentHealth(store, 120)

        def shipping(report: ComponentReport) -> bool:
            return bool(report.figures.get("epochs_in_flight", {}).get(disk))

        in_flight = await health.wait_until(CACHE, shipping, 60)
        (epoch, *_) = in_flight.figures["epochs_in_flight"][disk]
        assert int(in_flight.figures["dirty_bytes_per_disk"][disk]) >= 2 * MIB  # 16 s at least
        lost_at = datetime.now(UTC)
        os.kill(pids[str(CACHE)], signal.SIGSTOP)
        try:
            seen = (await health.report(ONPREM)).sequence
            onprem = await health.wait_until(ONPREM, lambda r: r.sequence > seen, 30)
            assert int(onprem.figures["committed_epoch"].get(disk, 0)) < epoch, "shipped already"
            await back_on_prem(follower, 1)
            (status,) = follower.latest.values()
            assert status.state is MigrationState.RECOVERED, status
            check_recovered(status, SUCCESS)
            assert status.recovery is not None and "not repaired" in status.recovery.reason
            print_figures("paused past the deadline", lost_at, await global_events(store))
            before = await read_onprem(harness.data_dir, vm.vm_id, "disk-0")
        finally:
            os.kill(pids[str(CACHE)], signal.SIGCONT)

        # Resumed, the cache goes on shipping its epoch with the old token: refused on-prem.
        def refused(report: ComponentReport) -> bool:
            return int(report.figures.get("epochs_refused_stale", {}).get(disk, 0)) >= 1

        await health.wait_until(ONPREM, refused, 120)
        cache = await health.wait_until(
            CACHE, lambda r: disk in r.figures.get("shipping_refused", {}), 60
        )
        record = await record_of(store, migration_id)
        assert cache.figures["shipping_refused"][disk] > 0
        assert record.recovery_pool == SUCCESS
        # Fenced, the cache is then ordered to close and discard what it held.
        await health.wait_until(CACHE, lambda r: disk not in r.figures.get("exports", []), 60)
        cache_disks = component_dir(harness.data_dir, "cache", "cache-1") / "disks"
        assert not (cache_disks / migration_id / disk).exists()
        syncing.cancel()
        await asyncio.gather(syncing, return_exceptions=True)
    await running.shutdown()
    assert await read_onprem(harness.data_dir, vm.vm_id, "disk-0") == before
