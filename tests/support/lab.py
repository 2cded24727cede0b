"""Building small lab sites for tests, and reading their disks back."""

from __future__ import annotations

import hashlib
from dataclasses import replace
from pathlib import Path

from appliance.sites.lab.content import fill_disk
from appliance.sites.lab.sample import cloud_site_config, onprem_site_config
from appliance.sites.lab.site import LabSite
from appliance.sites.model import DiskConfig, NicConfig, VmConfig
from appliance.storage.layered import LayeredDisk
from messages.common import Firmware, GuestOsFamily, PowerState, ToolsStatus

MIB = 1024 * 1024
NETWORK_MAP = {"VM Network": "cloud-default", "prod-app": "cloud-app", "prod-db": "cloud-db"}


def lab_vm(index: int, disks: int, disk_size: int, **changes: object) -> VmConfig:
    vm = VmConfig(
        vm_id=f"vm-{index:04d}",
        name=f"lnx-test-{index:02d}",
        guest_os="Debian GNU/Linux 12 (64-bit)",
        guest_os_family=GuestOsFamily.LINUX,
        firmware=Firmware.UEFI if index % 2 else Firmware.BIOS,
        cpus=2,
        memory_mib=2048,
        disks=tuple(
            DiskConfig(f"disk-{n}", f"Hard disk {n + 1}", disk_size // (1 + n), boot=n == 0)
            for n in range(disks)
        ),
        nics=(NicConfig("nic-0", f"00:50:56:00:00:{index:02x}", "prod-app"),),
        resource_pool="Production",
        cluster="cluster-a",
        power_state=PowerState.ON,
        tools_status=ToolsStatus.RUNNING,
    )
    return replace(vm, **changes)  # type: ignore[arg-type]


async def build_lab(
    data_dir: Path, vms: list[VmConfig], *, seed: int = 1, fill: bool = True
) -> None:
    """Both sites, with these on-prem VMs and their disks filled with seeded content."""
    await LabSite.create(data_dir / "sites" / "cloud", cloud_site_config())
    site = await LabSite.create(data_dir / "sites" / "onprem", onprem_site_config())
    try:
        for number, vm in enumerate(vms):
            await site.save_vm(vm)
            for index, disk in enumerate(vm.disks):
                layered = await site.create_disk(vm.vm_id, disk)
                if fill:
                    await fill_disk(layered.active(), seed=seed * 1000 + number * 10 + index)
    finally:
        await site.close()


async def disk_digest(directory: Path) -> str:
    """sha256 of a LayeredDisk's current content (the disk must not be open elsewhere)."""
    digest = hashlib.sha256()
    async with await LayeredDisk.open(directory) as disk:
        view = disk.active()
        offset = 0
        while offset < disk.size:
            length = min(4 * MIB, disk.size - offset)
            digest.update(await view.read(offset, length))
            offset += length
    return digest.hexdigest()


def onprem_disk(data_dir: Path, vm_id: str, disk_id: str) -> Path:
    return data_dir / "sites" / "onprem" / "vms" / vm_id / "disks" / disk_id


def cloud_volume(data_dir: Path, volume_id: str) -> Path:
    return data_dir / "sites" / "cloud" / "volumes" / volume_id
