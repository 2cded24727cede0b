"""The one protocol every site driver implements (lab today; vSphere and KVM later)."""

from __future__ import annotations

from typing import Protocol

from appliance.sites.model import SiteConfig, VmConfig, VmSnapshot
from appliance.storage.backend import Backend
from appliance.storage.extents import Extent
from messages.common import PowerState


class Site(Protocol):
    @property
    def name(self) -> str: ...

    async def config(self) -> SiteConfig: ...

    # -- inventory ------------------------------------------------------------------

    async def list_vms(self) -> list[VmConfig]:
        """Every VM of the site, whole: never cut at a limit."""
        ...

    async def get_vm(self, vm_id: str) -> VmConfig:
        """Raises UnknownVm."""
        ...

    async def find_vm(self, ref: str) -> VmConfig:
        """By id, else by exact name; raises UnknownVm, or SiteError when ambiguous."""
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

    async def create_vm(self, vm: VmConfig) -> VmConfig:
        """Create (or, with the same id, return) a VM; its disks' volumes must exist."""
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

    async def changed_extents(
        self, vm_id: str, disk_id: str, from_snapshot_id: str, to_snapshot_id: str | None
    ) -> list[Extent]: ...

    async def create_volume(self, volume_id: str, capacity_bytes: int) -> Backend:
        """A new, empty volume (idempotent by id), to copy a disk into."""
        ...

    async def open_volume(self, volume_id: str) -> Backend: ...

    async def delete_volume(self, volume_id: str) -> None: ...

    async def release(self, vm_id: str) -> None:
        """Let go of what the driver holds open for a VM (its disks); harmless if nothing."""
        ...

    async def release_volume(self, volume_id: str) -> None:
        """Let go of a volume this process holds open (kept as it is); harmless if nothing."""
        ...

    async def close(self) -> None: ...
