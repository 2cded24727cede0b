"""``ferry-appliance lab create``: a sample on-prem site, its VMs and their disks."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from appliance.sites.lab.sample import SampleSpec, onprem_site_config, sample_vms
from appliance.sites.lab.site import LabSite


@dataclass(frozen=True, slots=True)
class LabSummary:
    root: Path
    vms: int
    disks: int
    capacity_bytes: int

    def __str__(self) -> str:
        return (
            f"lab site at {self.root}: {self.vms} VMs, {self.disks} disks, "
            f"{self.capacity_bytes / 2**30:.2f} GiB capacity"
        )


async def create_lab(data_dir: Path, spec: SampleSpec, *, fill: bool = True) -> LabSummary:
    root = data_dir / "sites" / "onprem"
    site = await LabSite.create(root, onprem_site_config())
    vms = sample_vms(spec)
    for vm in vms:
        await site.save_vm(vm)
    disks = [disk for vm in vms for disk in vm.disks]
    return LabSummary(root, len(vms), len(disks), sum(d.capacity_bytes for d in disks))
