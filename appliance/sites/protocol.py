"""The one protocol every site driver implements (lab today; vSphere and KVM later)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

from appliance.sites.model import DiskConfig, SiteConfig, VmConfig, VmScan, VmSnapshot, VolumeInfo
from appliance.storage.backend import Backend
from appliance.storage.extents import Extent
from messages.common import PowerState


class Site(Protocol):
    @property
    def name(self) -> str: ...

    async def config(self) -> SiteConfig: ...

    # -- inventory ------------------------------------------------------------------

    async def list_vms(self) -> list[VmConfig]:
        """Every readable VM of the site, whole: never cut at a limit."""
        ...

    async def scan_vms(self) -> VmScan:
        """Every readable VM, and every VM whose configuration cannot be read."""
        ...

    async def get_vm(self, vm_id: str) -> VmConfig:
        """Raises UnknownVm."""
        ...

    async def find_vm_by_name(self, name: str) -> VmConfig:
        """By exact name, never by id; raises UnknownVm, or AmbiguousVmName when shared."""
        ...

    async def free_bytes(self) -> int:
        """Room left for new disks on the site's datastores."""
        ...

    # -- VMs -----------------------------------------------------------------------------

    async def set_power(self, vm_id: str, state: PowerState) -> VmConfig: ...

    async def prepare_guest(self, vm_id: str, username: str, password: str) -> None:
        """Prepare-to-migrate inside the running guest (cloud drivers); never keeps the login."""
        ...

    async def move_to_pool(self, vm_id: str, pool: str) -> VmConfig: ...

    async def tag_vm(self, vm_id: str, tags: Mapping[str, str | None]) -> VmConfig:
        """Set (or, with None, remove) tags on a VM, durably: they survive a lost state store."""
        ...

    async def create_vm(self, vm: VmConfig) -> VmConfig:
        """Create (or, with the same id, return) a VM; its disks' volumes must exist."""
        ...

    async def replace_disks(self, vm_id: str, disks: tuple[DiskConfig, ...]) -> VmConfig:
        """A powered-off VM's disks, swapped (a warm cutover: from the cache's exports to
        its volumes, which must exist); the same disks again change nothing."""
        ...

    async def delete_vm(self, vm_id: str) -> None:
        """Remove a VM and its disks; a VM that is not there is already deleted."""
        ...

    # -- disks, volumes, snapshots -----------------------------------------------------

    async def open_disk(self, vm_id: str, disk_id: str, snapshot_id: str | None = None) -> Backend:
        """A disk of a VM, now (read-write) or at a snapshot (read-only)."""
        ...

    async def snapshot_vm(self, vm_id: str, name: str) -> VmSnapshot:
        """Snapshot every disk (idempotent by name: a second call returns the first)."""
        ...

    async def delete_vm_snapshot(self, vm_id: str, name: str) -> None: ...

    async def vm_snapshot_names(self, vm_id: str) -> list[str]:
        """The names of a VM's snapshots (any disk)."""
        ...

    async def changed_extents(
        self, vm_id: str, disk_id: str, from_snapshot_id: str, to_snapshot_id: str | None
    ) -> list[Extent]: ...

    async def create_volume(
        self, volume_id: str, capacity_bytes: int, tags: Mapping[str, str] | None = None
    ) -> Backend:
        """A new, empty volume (idempotent by id), to copy a disk into; its tags are kept with
        it, so what made it can be found without the state store."""
        ...

    async def list_volumes(self) -> list[VolumeInfo]:
        """Every volume, with its tags and the VM it is attached to."""
        ...

    async def open_volume(self, volume_id: str) -> Backend: ...

    async def delete_volume(self, volume_id: str) -> None: ...

    def disk_location(self, vm_id: str, disk_id: str) -> str:
        """Where a component on the site's host finds a VM's disk (lab: its directory)."""
        ...

    async def release(self, vm_id: str) -> None:
        """Let go of what the driver holds open for a VM (its disks); harmless if nothing."""
        ...

    async def release_volume(self, volume_id: str) -> None:
        """Let go of a volume this process holds open (kept as it is); harmless if nothing."""
        ...

    async def close(self) -> None: ...
