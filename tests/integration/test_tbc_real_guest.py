"""A real Linux guest through try-before-commit over SQS: its VM runs in the cloud on the
cache's export, writes files on ext4 and syncs; after a planned migrate back the on-prem
disk passes ``e2fsck -fn`` and holds every file the guest synced.

The guest is the one of tests/interop/test_real_guest.py (Debian's cloud kernel and
busybox under QEMU); here its disk comes from the tbc workflow itself: the lab VM's
on-prem disk holds a fresh ext4, the appliance opens it on the I/O manager and the cache,
creates the cloud VM on the cache's export, and the guest boots on that export.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from appliance.storage.layered import LayeredDisk
from clients.client import FerryClient
from messages.common import MigrationState, Phase
from tests.integration.conftest import Harness
from tests.integration.migration_helpers import start_migration
from tests.integration.tbc_helpers import (
    TBC_SETTINGS,
    cloud_export,
    components_up,
    kill_pids,
    migrate_back,
    state_store,
    tbc_request,
)
from tests.integration.test_bus import StartAppliance
from tests.interop.test_real_guest import RUN_TIMEOUT, SIZE, copy_in, copy_out
from tests.support.ext4 import check_disk, make_ext4, read_tree
from tests.support.guest import GuestImage, GuestVm, Workload, build_guest
from tests.support.lab import build_lab, lab_vm, onprem_disk

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="session")
def guest_image() -> GuestImage:
    return build_guest()


@pytest.fixture
def component_pids(data_dir: Path) -> Iterator[list[int]]:
    pids: list[int] = []
    yield pids
    kill_pids(pids, data_dir)


async def test_a_real_guest_in_the_cloud_over_tbc_migrates_back_with_a_clean_ext4(
    harness: Harness,
    start_appliance: StartAppliance,
    guest_image: GuestImage,
    tmp_path: Path,
    component_pids: list[int],
) -> None:
    vm = lab_vm(1, disks=1, disk_size=SIZE)
    await build_lab(harness.data_dir, [vm], fill=False)
    fresh = tmp_path / "mkfs.raw"
    await make_ext4(fresh, SIZE)
    async with await LayeredDisk.open(onprem_disk(harness.data_dir, vm.vm_id, "disk-0")) as disk:
        await copy_in(fresh, disk.active())

    running = await start_appliance(harness.settings(**TBC_SETTINGS))
    workload = Workload(batches=3, files=4, seed=11, end="unmount")
    async with FerryClient(harness.client_settings()) as client, state_store(harness) as store:
        component_pids += (await components_up(store)).values()
        follower = await start_migration(client, tbc_request(client, [vm.vm_id]))
        await follower.until(
            lambda latest: all(s.phase is Phase.IN_CLOUD for s in latest.values()), 120
        )
        (status,) = follower.latest.values()
        address, export = await cloud_export(harness.data_dir, status.migration_id, "disk-0")
        url = f"nbd://{address.host}:{address.port}/{export}"
        async with GuestVm(guest_image, url, workload, console=tmp_path / "console.log") as g:
            await g.wait_exit(RUN_TIMEOUT)
        assert (g.synced, g.done) == (3, True)

        await client.request(migrate_back([status.migration_id]))
        back = await follower.until(
            lambda latest: all(
                s.state in (MigrationState.MIGRATED_BACK, MigrationState.FAILED)
                for s in latest.values()
            ),
            180,
        )
        assert back[status.migration_id].state is MigrationState.MIGRATED_BACK
    await running.shutdown()

    async with await LayeredDisk.open(onprem_disk(harness.data_dir, vm.vm_id, "disk-0")) as disk:
        image = await copy_out(disk.active(), tmp_path / "onprem.raw")
    await check_disk(image, workload.expected(3))  # e2fsck -fn clean, every file exact
    assert len(await read_tree(image, "ferry")) == 12
