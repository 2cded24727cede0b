"""A migration stopped mid-transfer by a reset or a lost state store leaves nothing behind.

A migration is held in its transfer by a gate on the WAN link (the data path dials the
cloud's NBD server through it): the source VM is powered off, its snapshot taken, its
cloud volume created. Then a ResetRequest (Redis intact, or after Redis lost every key):
the source VM is powered back on in its pool, no snapshot, no cloud volume, no cloud VM,
and the reset's answer says what was undone. A re-migration afterwards completes and
leaves only its own copy. On LocalStack + a real redis-server.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path

from appliance.datapath.nbd.channel import NbdAddress
from appliance.sites.lab.site import LabSite
from appliance.sites.model import VmConfig
from appliance.state.events import EventLog
from appliance.state.keys import Keys
from appliance.state.store import StateStore, connect
from appliance.storage.layered import LayeredDisk
from clients.client import FerryClient
from messages.commands import ResetRequest, ResetRequestBody
from messages.common import MigrationState, Phase, PowerState
from messages.events import CommandResponse, ReadyStatus
from tests.integration.conftest import Harness, RunningAppliance
from tests.integration.migration_helpers import Follower, clone_request, start_migration
from tests.support.lab import MIB, build_lab, lab_vm, onprem_disk

StartAppliance = Callable[..., Awaitable[RunningAppliance]]


class GatedWan:
    """Holds the first transfer at the WAN link until cancelled; later ones pass."""

    def __init__(self) -> None:
        self.reached = asyncio.Event()
        self._held = False

    async def __call__(self, address: NbdAddress) -> NbdAddress:
        if not self._held:
            self._held = True
            self.reached.set()
            await asyncio.Event().wait()  # held until the run is cancelled
        return address


def _volumes(data_dir: Path) -> list[str]:
    root = data_dir / "sites" / "cloud" / "volumes"
    return sorted(p.name for p in root.iterdir()) if root.is_dir() else []


async def _source(data_dir: Path, vm_id: str) -> VmConfig:
    site = LabSite.open(data_dir / "sites" / "onprem")
    try:
        return await site.get_vm(vm_id)
    finally:
        await site.close()


async def _cloud_vms(data_dir: Path) -> list[str]:
    site = LabSite.open(data_dir / "sites" / "cloud")
    try:
        return [vm.vm_id for vm in await site.list_vms()]
    finally:
        await site.close()


async def _snapshots(data_dir: Path, vm: VmConfig) -> list[str]:
    names: list[str] = []
    for disk in vm.disks:
        async with await LayeredDisk.open(onprem_disk(data_dir, vm.vm_id, disk.disk_id)) as d:
            names.extend(s.name for s in d.snapshots())
    return names


async def _hold_a_migration(client: FerryClient, wan: GatedWan, vm: VmConfig) -> Follower:
    follower = await start_migration(client, clone_request(client, [vm.vm_id]))
    await asyncio.wait_for(wan.reached.wait(), timeout=60)
    await follower.phase(Phase.TRANSFER)
    return follower


async def _reset(client: FerryClient) -> CommandResponse:
    answer = await client.request(ResetRequest(body=ResetRequestBody(confirm=True)), 60)
    assert isinstance(answer, CommandResponse)
    return answer


async def _events(harness: Harness) -> list[tuple[str, str | None]]:
    store = StateStore(connect(harness.redis_url), Keys(harness.prefix))
    try:
        return [(e.kind, e.migration_id) for e in await EventLog(store).read(count=1000)]
    finally:
        await store.close()


async def _flush_state(harness: Harness) -> None:
    """Redis comes back empty: every key of this appliance is gone."""
    store = StateStore(connect(harness.redis_url), Keys(harness.prefix))
    try:
        async for key in store.redis.scan_iter(match=Keys(harness.prefix).pattern):
            await store.redis.delete(key)
    finally:
        await store.close()


async def _state_loss_noticed(client: FerryClient) -> None:
    async for heartbeat in client.heartbeats():
        if heartbeat.body.status is ReadyStatus.NOT_READY and any(
            "state_generation" in detail for detail in heartbeat.body.status_details
        ):
            return


def _check_answer(answer: CommandResponse, migration_id: str, vm: VmConfig) -> None:
    assert answer.body.migration_ids == (migration_id,)
    (undone,) = answer.body.undone
    assert undone.migration_id == migration_id and undone.vm_id == vm.vm_id
    assert undone.error is None
    actions = set(undone.actions)
    assert "powered source VM back on" in actions
    assert f"deleted source snapshot ferry-{migration_id}" in actions
    assert f"deleted cloud volume {migration_id}-disk-0" in actions


async def _check_undone(harness: Harness, vm: VmConfig) -> None:
    source = await _source(harness.data_dir, vm.vm_id)
    assert source.power_state is PowerState.ON
    assert source.resource_pool == vm.resource_pool
    assert not any(key.startswith("ferry.migration") for key, _ in source.annotations)
    assert _volumes(harness.data_dir) == []
    assert await _cloud_vms(harness.data_dir) == []


async def _remigrate(client: FerryClient, vm: VmConfig) -> str:
    follower = await start_migration(client, clone_request(client, [vm.vm_id], request_id="again"))
    (status,) = (await follower.finished(1)).values()
    assert status.state is MigrationState.COMPLETED, status.error
    return status.migration_id


async def _scenario(harness: Harness, start_appliance: StartAppliance, *, lose_state: bool) -> None:
    vm = lab_vm(1, disks=1, disk_size=16 * MIB)
    await build_lab(harness.data_dir, [vm])
    wan = GatedWan()
    running = await start_appliance(harness.settings(), wan=wan)
    try:
        async with FerryClient(harness.client_settings()) as client:
            follower = await _hold_a_migration(client, wan, vm)
            (migration_id,) = follower.latest
            held = await _source(harness.data_dir, vm.vm_id)
            assert held.power_state is PowerState.OFF  # the scenario: mid-transfer, VM off
            assert _volumes(harness.data_dir) == [f"{migration_id}-disk-0"]
            if lose_state:
                await _flush_state(harness)
                await asyncio.wait_for(_state_loss_noticed(client), timeout=60)
            answer = await _reset(client)
            _check_answer(answer, migration_id, vm)
            await _check_undone(harness, vm)
            assert ("leftovers_undone", migration_id) in await _events(harness)
            # Its request hears it failed: from Redis, or (Redis lost) from the source's tags.
            latest = await follower.until(
                lambda latest: latest[migration_id].state is MigrationState.FAILED
            )
            error = latest[migration_id].error
            assert error is not None
            assert error.code == ("state_lost" if lose_state else "reset")
            assert "powered source VM back on" in error.message
            again = await _remigrate(client, vm)
    finally:
        await running.shutdown()
    # The finished copy is the only thing in the cloud, and the source has no snapshot.
    assert _volumes(harness.data_dir) == [f"{again}-disk-0"]
    assert await _cloud_vms(harness.data_dir) == [again]
    assert await _snapshots(harness.data_dir, vm) == []


async def test_a_reset_mid_transfer_undoes_the_migration_on_the_sites(
    harness: Harness, start_appliance: StartAppliance
) -> None:
    await _scenario(harness, start_appliance, lose_state=False)


async def test_a_reset_after_redis_lost_its_data_mid_transfer_undoes_it_too(
    harness: Harness, start_appliance: StartAppliance
) -> None:
    await _scenario(harness, start_appliance, lose_state=True)


async def test_a_reset_never_removes_a_finished_copy(
    harness: Harness, start_appliance: StartAppliance
) -> None:
    vm = lab_vm(1, disks=1, disk_size=8 * MIB)
    await build_lab(harness.data_dir, [vm])
    running = await start_appliance(harness.settings())
    try:
        async with FerryClient(harness.client_settings()) as client:
            follower = await start_migration(client, clone_request(client, [vm.vm_id]))
            (status,) = (await follower.finished(1)).values()
            assert status.state is MigrationState.COMPLETED, status.error
            answer = await _reset(client)
            assert answer.body.undone == ()
    finally:
        await running.shutdown()
    assert _volumes(harness.data_dir) == [f"{status.migration_id}-disk-0"]
    assert await _cloud_vms(harness.data_dir) == [status.migration_id]
    moved = await _source(harness.data_dir, vm.vm_id)
    assert moved.power_state is PowerState.OFF and moved.resource_pool == "_HDM_MIGRATEPOOL"
