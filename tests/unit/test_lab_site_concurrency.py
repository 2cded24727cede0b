"""The lab site under concurrent migrations: eight of them finalize or create volumes at once."""

from __future__ import annotations

import asyncio
from pathlib import Path

from appliance.sites.lab.sample import cloud_site_config
from appliance.sites.lab.site import LabSite
from tests.support.lab import MIB, build_lab, lab_vm

POOL = "_HDM_MIGRATEPOOL"


async def test_eight_vms_moved_at_once_to_a_new_pool_all_land_and_the_pool_is_added_once(
    tmp_path: Path,
) -> None:
    vms = [lab_vm(n, disks=1, disk_size=MIB) for n in range(1, 9)]
    await build_lab(tmp_path, vms, fill=False)
    site = LabSite.open(tmp_path / "sites" / "onprem")
    try:
        await asyncio.gather(*(site.move_to_pool(vm.vm_id, POOL) for vm in vms))
        assert (await site.config()).resource_pools.count(POOL) == 1
        assert {vm.resource_pool for vm in await site.list_vms()} == {POOL}
    finally:
        await site.close()


async def test_free_space_is_readable_while_volumes_are_being_created(tmp_path: Path) -> None:
    site = await LabSite.create(tmp_path / "cloud", cloud_site_config())
    free = await site.free_bytes()
    try:
        creating = [site.create_volume(f"volume-{n}", 2 * MIB) for n in range(8)]
        readers = [site.free_bytes() for _ in range(40)]
        results = await asyncio.gather(*creating, *readers)
        assert all(isinstance(value, int) for value in results[8:])
        assert await site.free_bytes() == free - 8 * 2 * MIB
    finally:
        await site.close()
