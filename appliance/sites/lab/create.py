"""``ferry-appliance lab create``: a sample on-prem site with filled disks, an empty cloud site."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from appliance.sites.lab.content import fill_disk
from appliance.sites.lab.sample import (
    SampleSpec,
    cloud_site_config,
    onprem_site_config,
    sample_vms,
)
from appliance.sites.lab.site import LabSite


def site_root(data_dir: Path, name: str) -> Path:
    return data_dir / "sites" / name


@dataclass(frozen=True, slots=True)
class LabSummary:
    root: Path
    vms: int
    disks: int
    capacity_bytes: int
    allocated_bytes: int

    def __str__(self) -> str:
        return (
            f"lab site at {self.root}: {self.vms} VMs, {self.disks} disks, "
            f"{self.capacity_bytes / 2**30:.2f} GiB capacity, "
            f"{self.allocated_bytes / 2**30:.2f} GiB allocated"
        )


async def create_lab(data_dir: Path, spec: SampleSpec, *, fill: bool = True) -> LabSummary:
    """Build both sites; every disk gets seeded, realistic content unless ``fill`` is off."""
    await LabSite.create(site_root(data_dir, "cloud"), cloud_site_config())
    site = await LabSite.create(site_root(data_dir, "onprem"), onprem_site_config())
    vms = sample_vms(spec)
    allocated = 0
    try:
        for number, vm in enumerate(vms):
            await site.save_vm(vm)
            for index, disk in enumerate(vm.disks):
                layered = await site.create_disk(vm.vm_id, disk)
                if fill:
                    seed = spec.seed * 1_000_003 + number * 16 + index
                    summary = await fill_disk(layered.active(), seed=seed)
                    allocated += summary.allocated_bytes
    finally:
        await site.close()
    disks = [disk for vm in vms for disk in vm.disks]
    return LabSummary(
        site.root, len(vms), len(disks), sum(d.capacity_bytes for d in disks), allocated
    )
