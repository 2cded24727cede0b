"""``ferry reset`` as an operator runs it (its own process, over SQS on LocalStack), against
a real appliance with the real component processes and a tbc VM resting in the cloud:
without ``--confirm`` it sends nothing and exits 2; with it, it prints each VM's outcome and
epoch and exits 0, or 1 when a VM could not be brought all the way home (the I/O manager
killed: the disk waits for it)."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from appliance.components.heartbeat import ComponentHealth, Liveness
from appliance.sites.lab.site import LabSite
from clients.client import FerryClient
from messages.common import Phase, PowerState
from tests.integration.conftest import Harness
from tests.integration.migration_helpers import Follower, start_migration
from tests.integration.tbc_helpers import (
    ONPREM,
    TBC_SETTINGS,
    components_up,
    kill_pids,
    state_store,
    tbc_request,
)
from tests.integration.test_bus import StartAppliance
from tests.integration.test_cli_commands import ferry
from tests.support.lab import MIB, build_lab, lab_vm

pytestmark = pytest.mark.timeout(300)


@pytest.fixture
def component_pids(data_dir: Path) -> Iterator[list[int]]:
    pids: list[int] = []
    yield pids
    kill_pids(pids, data_dir)


async def _in_cloud(follower: Follower) -> str:
    latest = await follower.until(
        lambda latest: all(s.phase is Phase.IN_CLOUD for s in latest.values()), within_s=120
    )
    (migration_id,) = latest
    return migration_id


async def _cloud_vms(harness: Harness) -> list[str]:
    cloud = LabSite.open(harness.data_dir / "sites" / "cloud")
    try:
        return [vm.vm_id for vm in await cloud.list_vms()]
    finally:
        await cloud.close()


async def _parked(harness: Harness, vm_id: str) -> None:
    onprem = LabSite.open(harness.data_dir / "sites" / "onprem")
    try:
        vm = await onprem.get_vm(vm_id)
    finally:
        await onprem.close()
    assert vm.resource_pool == "_HDM_MIGRATEPOOL" and vm.power_state is PowerState.OFF


def _row(out: str, migration_id: str) -> str:
    """The table's row of the migration (it fits on one line)."""
    (row,) = [line for line in out.splitlines() if migration_id in line and "│" in line]
    return row


def _said(out: str) -> str:
    """What was printed, lines unwrapped."""
    return " ".join(out.split())


async def test_ferry_reset_needs_confirm_and_prints_each_vm_s_outcome_and_epoch(
    harness: Harness, start_appliance: StartAppliance, component_pids: list[int]
) -> None:
    vm = lab_vm(1, disks=1, disk_size=8 * MIB)
    await build_lab(harness.data_dir, [vm])
    running = await start_appliance(harness.settings(**TBC_SETTINGS))
    try:
        async with FerryClient(harness.client_settings()) as client, state_store(harness) as s:
            component_pids += (await components_up(s)).values()
            migration_id = await _in_cloud(
                await start_migration(client, tbc_request(client, [vm.vm_id]))
            )
        code, out = await ferry(harness, "reset")
        assert code == 2, out
        assert "--confirm" in out
        assert await _cloud_vms(harness) == [migration_id]  # nothing was sent

        code, out = await ferry(harness, "reset", "--confirm")
        assert code == 0, out
        row = _row(out, migration_id)
        assert vm.vm_id in row and "returned" in row and "│ 0 " in row  # epoch 0: the snapshot
        said = _said(out)
        assert f"{migration_id}: disk disk-0 at committed epoch 0" in said
        assert f"{migration_id}: deleted cloud VM {migration_id}" in said
        assert "1 brought home to their last committed epoch" in said
        assert await _cloud_vms(harness) == []
        await _parked(harness, vm.vm_id)
    finally:
        await running.shutdown()


async def test_ferry_reset_exits_1_when_a_vm_cannot_be_brought_all_the_way_home(
    harness: Harness, start_appliance: StartAppliance, component_pids: list[int]
) -> None:
    vm = lab_vm(1, disks=1, disk_size=8 * MIB)
    await build_lab(harness.data_dir, [vm])
    settings = harness.settings(
        **TBC_SETTINGS,
        component_timeout_s=5.0,
        component_repair=False,  # the killed I/O manager is not repaired, nor restarted
        component_restart_backoff_s=3600.0,
        component_restart_backoff_max_s=3600.0,
    )
    running = await start_appliance(settings)
    try:
        async with FerryClient(harness.client_settings()) as client, state_store(harness) as s:
            pids = await components_up(s)
            component_pids += pids.values()
            migration_id = await _in_cloud(
                await start_migration(client, tbc_request(client, [vm.vm_id]))
            )
            os.kill(pids[str(ONPREM)], signal.SIGKILL)
            health = ComponentHealth(s, 5.0)
            await health.wait_until(ONPREM, lambda r: r.liveness is Liveness.FAILED, 60)
        code, out = await ferry(harness, "reset", "--confirm")
        assert code == 1, out
        assert "returned" in _row(out, migration_id)
        said = _said(out)
        assert f"{migration_id}: error: the on-prem I/O manager {ONPREM} is down" in said
        assert f"down: {ONPREM}" in said
        assert await _cloud_vms(harness) == []  # the site-side steps need no component
        await _parked(harness, vm.vm_id)
    finally:
        await running.shutdown()
