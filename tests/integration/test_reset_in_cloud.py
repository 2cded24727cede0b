"""A ResetRequest while VMs run in the cloud brings them home to their last committed epoch.

Two tbc VMs rest in the cloud, each with a guest (the workload generator) writing to the
cache's export; a SyncRequest commits an epoch, the guests write on (those writes stay
dirty in the cache), then stop as their VMs would power off. A ResetRequest with
confirm: each VM is powered off in ``_HDM_MIGRATEPOOL`` with its snapshot kept, its disk
equal to the replay of a prefix of its write log that ends at or after the last write
acknowledged before the sync (DESIGN §9), and not the whole log (no final epoch); the
cloud VMs and the cache's disk files are gone, so are the components' order keys; the
heartbeat says Ready and the same VM can be migrated again. A reset with the cache
SIGKILLed (and not restarted) still completes: the site-side steps and the I/O manager's
close do not need the cache; its close orders wait for it. On LocalStack, a real
redis-server and the real component processes.
"""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from appliance.components.control import ComponentOrders
from appliance.components.heartbeat import ComponentHealth, Liveness
from appliance.components.orders import ComponentKeys, Order, OrderAction, OutcomeKind
from appliance.orchestrator.states import Step
from appliance.sites.lab.site import LabSite
from appliance.sites.lab.workload import WorkloadLog, read_write_log
from appliance.state.store import StateStore
from clients.client import FerryClient, FerryError
from messages.commands import ResetRequest, ResetRequestBody
from messages.common import MigrationState, Phase, PowerState
from messages.events import CommandResponse, ReadyStatus, ResetOutcome, UndoneMigration
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
    kill_pids,
    migrate_back,
    read_onprem,
    state_store,
    sync,
    tbc_request,
)
from tests.integration.test_bus import StartAppliance
from tests.support.lab import MIB, build_lab, lab_vm
from tests.support.records import until_record
from tests.support.replay import find_prefix, replay

pytestmark = pytest.mark.timeout(300)
ORDER_FAMILIES = (
    "component-orders",
    "component-order-events",
    "component-outcomes",
    "component-outcome-events",
)


@pytest.fixture
def component_pids(data_dir: Path) -> Iterator[list[int]]:
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


async def _guests(harness: Harness, tmp_path: Path, ids: list[str]) -> list[Guest]:
    guests = []
    for n, migration_id in enumerate(ids):
        address, export = await cloud_export(harness.data_dir, migration_id, "disk-0")
        guests.append(await Guest.start(address, export, tmp_path / f"g{n}.log", seed=20 + n))
    return guests


async def _write_commit_write(
    client: FerryClient, guests: list[Guest], ids: list[str]
) -> list[int]:
    """Writes, an epoch committed (a sync), more writes only the cache holds; the guests
    stop. The last sequence each guest had acknowledged before the sync."""
    for guest in guests:
        await guest.wait_writes(30, within_s=60)
    floors = [guest.workload.stats().last_sequence for guest in guests]
    await client.request(sync(ids), timeout_s=120)  # answered once committed on-prem
    for guest in guests:
        await guest.wait_writes(guest.workload.stats().writes + 30, within_s=60)
    for guest in guests:
        await guest.halt()
    return floors


async def _reset(client: FerryClient) -> CommandResponse:
    answer = await client.request(ResetRequest(body=ResetRequestBody(confirm=True)), 240)
    assert isinstance(answer, CommandResponse)
    return answer


async def _check_home(
    harness: Harness, vm_id: str, migration_id: str, base: bytes, log_path: Path, floor: int
) -> None:
    onprem = LabSite.open(harness.data_dir / "sites" / "onprem")
    try:
        vm = await onprem.get_vm(vm_id)
        assert vm.resource_pool == "_HDM_MIGRATEPOOL" and vm.power_state is PowerState.OFF
        assert await onprem.vm_snapshot_names(vm_id) == [f"ferry-{migration_id}"]  # kept
        assert not any(key.startswith("ferry.") and key != "ferry.guest_prepared"
                       for key, _ in vm.annotations)  # fmt: skip
    finally:
        await onprem.close()
    image = await read_onprem(harness.data_dir, vm_id, "disk-0")
    log = await read_write_log(log_path)
    prefix = find_prefix(image, base, log, floor)
    assert prefix is not None, _not_a_prefix(image, base, log, floor)
    assert prefix < log.last_sequence  # what the cache alone held is gone: no final epoch
    assert image != bytes(replay(base, log, log.last_sequence))


def _not_a_prefix(image: bytes, base: bytes, log: WorkloadLog, floor: int) -> str:
    """Why the image is no prefix at or after ``floor``: what it is, where it differs."""
    anywhere = find_prefix(image, base, log, 0)
    at_floor = replay(base, log, floor)
    blocks = range(0, len(image), 4096)
    differs = [i for i in blocks if image[i : i + 4096] != at_floor[i : i + 4096]]
    touching = sorted(
        {w.sequence for w in log.writes for i in differs[:64] if w.offset <= i + 4095
         and i < w.offset + w.length}
    )  # fmt: skip
    return (
        f"the on-prem disk is not a prefix of the write log at or after {floor} (last "
        f"{log.last_sequence}); a prefix at all: {anywhere}; 4 KiB blocks differing from the "
        f"replay to {floor}: {len(differs)}, first {differs[:8]}; writes there: {touching[:40]}"
    )


async def _cloud_vms(harness: Harness) -> list[str]:
    cloud = LabSite.open(harness.data_dir / "sites" / "cloud")
    try:
        return [vm.vm_id for vm in await cloud.list_vms()]
    finally:
        await cloud.close()


async def _component_keys(store: StateStore) -> list[str]:
    found = []
    for family in ORDER_FAMILIES:
        async for key in store.redis.scan_iter(match=f"{store.keys.prefix}:{family}:*"):
            found.append(key.decode())
    return sorted(found)


async def _ready(client: FerryClient) -> None:
    async for beat in client.heartbeats():
        if beat.body.status is ReadyStatus.READY:
            return


def _returned(answer: CommandResponse, migration_id: str) -> UndoneMigration:
    (item,) = [u for u in answer.body.undone if u.migration_id == migration_id]
    assert item.outcome is ResetOutcome.RETURNED, item
    assert item.error is None, item
    return item


async def test_a_reset_brings_tbc_vms_home_to_their_last_committed_epoch(
    harness: Harness, start_appliance: StartAppliance, tmp_path: Path, component_pids: list[int]
) -> None:
    vms = [lab_vm(n, disks=1, disk_size=8 * MIB) for n in (1, 2)]
    await build_lab(harness.data_dir, vms)
    bases = [await read_onprem(harness.data_dir, vm.vm_id, "disk-0") for vm in vms]
    running = await start_appliance(harness.settings(**TBC_SETTINGS))
    async with FerryClient(harness.client_settings()) as client, state_store(harness) as store:
        component_pids += (await components_up(store)).values()
        follower = await start_migration(client, tbc_request(client, [vm.vm_id for vm in vms]))
        await _in_cloud(follower, 2)
        by_vm = {s.vm_id: s.migration_id for s in follower.latest.values()}
        ids = [by_vm[vm.vm_id] for vm in vms]
        guests = await _guests(harness, tmp_path, ids)
        floors = await _write_commit_write(client, guests, ids)
        epochs = [await committed_epoch(store, f"{m}-disk-0") for m in ids]
        assert all(epoch >= 1 for epoch in epochs)

        with pytest.raises(FerryError):  # without confirm: refused, nothing done
            await client.request(ResetRequest(body=ResetRequestBody(confirm=False)))
        assert sorted(await _cloud_vms(harness)) == sorted(ids)

        answer = await _reset(client)
        for migration_id, epoch in zip(ids, epochs, strict=True):
            item = _returned(answer, migration_id)
            assert item.epoch == epoch
            assert f"disk disk-0 at committed epoch {epoch}" in item.actions
            assert f"deleted cloud VM {migration_id}" in item.actions
        assert "2 brought home" in answer.body.detail
        for n, (vm, migration_id) in enumerate(zip(vms, ids, strict=True)):
            log_path = tmp_path / f"g{n}.log"
            await _check_home(harness, vm.vm_id, migration_id, bases[n], log_path, floors[n])

        # Each request hears its migration failed by the reset, and at which epoch.
        latest = await follower.until(
            lambda latest: all(latest[m].state is MigrationState.FAILED for m in ids)
        )
        for migration_id, epoch in zip(ids, epochs, strict=True):
            error = latest[migration_id].error
            assert error is not None and error.code == "reset"
            assert f"brought home to epoch {epoch}" in error.message

        assert await _cloud_vms(harness) == []
        cache_dir = harness.data_dir / "components" / "cache" / "cache-1" / "disks"
        for migration_id in ids:
            assert not (cache_dir / migration_id / f"{migration_id}-disk-0").exists()
        assert await _component_keys(store) == []
        heartbeat = ComponentKeys(store.keys, CACHE).heartbeat
        assert await store.redis.exists(heartbeat)  # the components' own beats stay
        await asyncio.wait_for(_ready(client), timeout=60)

        # The same VM migrates again: to the cloud and back.
        again = await start_migration(client, tbc_request(client, [vms[0].vm_id]))
        await _in_cloud(again, 1)
        (status,) = again.latest.values()
        await client.request(migrate_back([status.migration_id]))
        gone = (MigrationState.MIGRATED_BACK, MigrationState.FAILED)
        back = await again.until(
            lambda latest: latest[status.migration_id].state in gone, within_s=180
        )
        assert back[status.migration_id].state is MigrationState.MIGRATED_BACK
    await running.shutdown()


async def test_a_reset_with_the_cache_killed_still_brings_the_vm_home(
    harness: Harness, start_appliance: StartAppliance, tmp_path: Path, component_pids: list[int]
) -> None:
    vm = lab_vm(1, disks=1, disk_size=8 * MIB)
    await build_lab(harness.data_dir, [vm])
    base = await read_onprem(harness.data_dir, vm.vm_id, "disk-0")
    settings = harness.settings(
        **TBC_SETTINGS,
        component_timeout_s=5.0,
        component_repair=False,  # the killed cache is not repaired, nor restarted
        component_restart_backoff_s=3600.0,
        component_restart_backoff_max_s=3600.0,
    )
    running = await start_appliance(settings)
    async with FerryClient(harness.client_settings()) as client, state_store(harness) as store:
        pids = await components_up(store)
        component_pids += pids.values()
        follower = await start_migration(client, tbc_request(client, [vm.vm_id]))
        await _in_cloud(follower, 1)
        (migration_id,) = follower.latest
        disk = f"{migration_id}-disk-0"
        guests = await _guests(harness, tmp_path, [migration_id])
        (floor,) = await _write_commit_write(client, guests, [migration_id])
        epoch = await committed_epoch(store, disk)

        os.kill(pids[str(CACHE)], signal.SIGKILL)
        health = ComponentHealth(store, 5.0)
        await health.wait_until(CACHE, lambda r: r.liveness is Liveness.FAILED, 60)

        answer = await _reset(client)
        item = _returned(answer, migration_id)
        assert item.epoch == epoch
        assert f"{CACHE} is down: its close orders wait for it" in item.actions
        assert f"down: {CACHE}" in answer.body.detail
        assert await _cloud_vms(harness) == []
        # The cache's close order waits for it (it discards the disk when it is back);
        # everything else of the components is gone.
        cache = ComponentKeys(store.keys, CACHE)
        raw = await store.redis.hget(cache.orders, disk)
        assert raw is not None
        order = Order.from_json(raw)
        assert order.action.value == "close" and order.params["discard"] == "always"
        assert await _component_keys(store) == sorted([cache.orders, cache.order_events])
        assert (await ComponentHealth(store, 5.0).report(ONPREM)).liveness is Liveness.OK
    await running.shutdown()
    await _check_home(harness, vm.vm_id, migration_id, base, tmp_path / "g0.log", floor)


async def _step(store: StateStore, migration_id: str, step: Step) -> None:
    """A bounded watch on the persisted record until it reaches ``step``."""
    await until_record(store, migration_id, lambda record: record.step is step)


async def test_a_reset_mid_migrate_back_with_the_cache_stopped_leaves_it_a_close_order(
    harness: Harness, start_appliance: StartAppliance, tmp_path: Path, component_pids: list[int]
) -> None:
    """The migrate back waits for its final epoch (the cache is SIGSTOPped): the reset brings
    the VM home to the last committed epoch without it; resumed, the cache carries out the
    close order the reset left for it and removes the disk's files itself."""
    vm = lab_vm(1, disks=1, disk_size=8 * MIB)
    await build_lab(harness.data_dir, [vm])
    base = await read_onprem(harness.data_dir, vm.vm_id, "disk-0")
    settings = harness.settings(
        **TBC_SETTINGS,
        component_timeout_s=5.0,
        component_repair=False,  # stays stopped
    )
    running = await start_appliance(settings)
    async with FerryClient(harness.client_settings()) as client, state_store(harness) as store:
        pids = await components_up(store)
        component_pids += pids.values()
        follower = await start_migration(client, tbc_request(client, [vm.vm_id]))
        await _in_cloud(follower, 1)
        (migration_id,) = follower.latest
        disk = f"{migration_id}-disk-0"
        guests = await _guests(harness, tmp_path, [migration_id])
        (floor,) = await _write_commit_write(client, guests, [migration_id])
        epoch = await committed_epoch(store, disk)

        cache_pid = pids[str(CACHE)]
        os.kill(cache_pid, signal.SIGSTOP)
        try:
            await client.request(migrate_back([migration_id]))
            await _step(store, migration_id, Step.BACK_FINAL_EPOCH)  # its cut cannot happen
            health = ComponentHealth(store, 5.0)
            await health.wait_until(CACHE, lambda r: r.liveness is Liveness.FAILED, 60)
            answer = await _reset(client)
        finally:
            os.kill(cache_pid, signal.SIGCONT)
        item = _returned(answer, migration_id)
        assert item.epoch == epoch
        assert f"{CACHE} is down: its close orders wait for it" in item.actions
        await _check_home(harness, vm.vm_id, migration_id, base, tmp_path / "g0.log", floor)

        # Resumed, the cache closes the disk as the order left for it says, and discards it.
        orders = ComponentOrders(store, CACHE)
        order = await orders.desired(disk)
        assert order is not None and order.action is OrderAction.CLOSE
        outcome = await orders.wait(order, 60)
        assert outcome.kind is OutcomeKind.APPLIED, outcome
        cache_disk = harness.data_dir / "components" / "cache" / "cache-1" / "disks"
        assert not (cache_disk / migration_id / disk).exists()
    await running.shutdown()


async def _state_loss_noticed(client: FerryClient) -> None:
    async for heartbeat in client.heartbeats():
        if heartbeat.body.status is ReadyStatus.NOT_READY and any(
            "state_generation" in detail for detail in heartbeat.body.status_details
        ):
            return


async def test_a_reset_after_redis_lost_a_resting_vm_s_record_parks_it_and_says_why(
    harness: Harness, start_appliance: StartAppliance, component_pids: list[int]
) -> None:
    """No record, no token: the components cannot be told to let go of the disk. The cloud
    VM goes, the source is parked powered off with its snapshot (never powered on while the
    I/O manager may hold its disk), and the answer says what is left to do."""
    vm = lab_vm(1, disks=1, disk_size=8 * MIB)
    await build_lab(harness.data_dir, [vm])
    running = await start_appliance(harness.settings(**TBC_SETTINGS))
    async with FerryClient(harness.client_settings()) as client, state_store(harness) as store:
        component_pids += (await components_up(store)).values()
        follower = await start_migration(client, tbc_request(client, [vm.vm_id]))
        await _in_cloud(follower, 1)
        (migration_id,) = follower.latest
        async for key in store.redis.scan_iter(match=store.keys.pattern):
            await store.redis.delete(key)  # Redis comes back empty
        await asyncio.wait_for(_state_loss_noticed(client), timeout=60)

        answer = await _reset(client)
        (item,) = answer.body.undone
        assert item.migration_id == migration_id
        assert item.outcome is ResetOutcome.RETURNED
        assert item.error is not None and "its record was lost" in item.error
        assert f"deleted cloud VM {migration_id}" in item.actions
        latest = await follower.until(
            lambda latest: latest[migration_id].state is MigrationState.FAILED
        )
        error = latest[migration_id].error
        assert error is not None and error.code == "state_lost"
        assert await _cloud_vms(harness) == []
    await running.shutdown()
    onprem = LabSite.open(harness.data_dir / "sites" / "onprem")
    try:
        source = await onprem.get_vm(vm.vm_id)
        assert source.resource_pool == "_HDM_MIGRATEPOOL"
        assert source.power_state is PowerState.OFF
        assert await onprem.vm_snapshot_names(vm.vm_id) == [f"ferry-{migration_id}"]
    finally:
        await onprem.close()
