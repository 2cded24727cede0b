"""Inventory shows each VM's latest migration state (it used to be always null)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from clients.client import FerryClient
from messages.common import MigrationState
from tests.integration.conftest import Harness, RunningAppliance
from tests.integration.migration_helpers import clone_request, start_migration
from tests.support.lab import MIB, build_lab, lab_vm

StartAppliance = Callable[..., Awaitable[RunningAppliance]]


async def test_inventory_carries_the_latest_migration_state(
    harness: Harness, start_appliance: StartAppliance
) -> None:
    migrated = lab_vm(1, disks=1, disk_size=4 * MIB)
    untouched = lab_vm(2, disks=1, disk_size=4 * MIB)
    await build_lab(harness.data_dir, [migrated, untouched])
    running = await start_appliance(harness.settings())
    async with FerryClient(harness.client_settings()) as client:
        before = {vm.vm_id: vm.migration_state for vm in await client.inventory()}
        assert before == {migrated.vm_id: None, untouched.vm_id: None}
        follower = await start_migration(client, clone_request(client, [migrated.vm_id]))
        (status,) = (await follower.finished(1)).values()
        assert status.state is MigrationState.COMPLETED, status.error
        after = {vm.vm_id: vm.migration_state for vm in await client.inventory()}
    await running.shutdown()
    assert after == {migrated.vm_id: MigrationState.COMPLETED, untouched.vm_id: None}
