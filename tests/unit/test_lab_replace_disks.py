"""A warm cutover swaps a powered-off cloud VM's disks (cache exports → volumes) in the lab."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from appliance.errors import SiteError
from appliance.sites.lab.sample import cloud_site_config
from appliance.sites.lab.site import LabSite
from appliance.sites.model import DiskConfig
from messages.common import PowerState
from tests.support.lab import MIB, lab_vm


async def test_a_powered_off_vm_s_disks_swap_to_volumes_that_exist_and_only_then(
    tmp_path: Path,
) -> None:
    site = await LabSite.create(tmp_path / "cloud", cloud_site_config())
    try:
        on_cache = DiskConfig("disk-0", "Hard disk 1", MIB, True, nbd_export="nbd://h:1/x")
        vm = replace(lab_vm(1, disks=1, disk_size=MIB), disks=(on_cache,))
        await site.create_vm(replace(vm, power_state=PowerState.ON))
        on_volume = (DiskConfig("disk-0", "Hard disk 1", MIB, True, volume_id="m-1-disk-0"),)
        with pytest.raises(SiteError, match="powered on"):
            await site.replace_disks(vm.vm_id, on_volume)
        await site.set_power(vm.vm_id, PowerState.OFF)
        with pytest.raises(SiteError, match="missing"):
            await site.replace_disks(vm.vm_id, on_volume)
        await site.create_volume("m-1-disk-0", MIB)
        swapped = await site.replace_disks(vm.vm_id, on_volume)
        assert swapped.disks == on_volume
        assert (await site.get_vm(vm.vm_id)).disks == on_volume
        await site.set_power(vm.vm_id, PowerState.ON)
        assert await site.replace_disks(vm.vm_id, on_volume) == await site.get_vm(vm.vm_id)
    finally:
        await site.close()
