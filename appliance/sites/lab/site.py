"""The lab site driver: a directory per site, a directory per VM, JSON configuration.

Layout (ids, never names, become path components)::

    {root}/site.json                         SiteConfig
    {root}/vms/{vm_id}/vm.json               VmConfig
    {root}/vms/{vm_id}/disks/{disk_id}/      the disk (LayeredDisk directory)
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from pydantic import TypeAdapter

from appliance.errors import SiteError, UnknownVm
from appliance.sites.lab.files import write_atomically
from appliance.sites.model import SiteConfig, VmConfig, check_id, child_path

_SITE = TypeAdapter(SiteConfig)
_VM = TypeAdapter(VmConfig)


class LabSite:
    """A site made of files under ``root``; the embedded default and what tests use."""

    def __init__(self, root: Path, name: str) -> None:
        self.root = root
        self._name = check_id(name, name)
        self._lock = asyncio.Lock()

    @property
    def name(self) -> str:
        return self._name

    @property
    def vms_dir(self) -> Path:
        return self.root / "vms"

    def vm_dir(self, vm_id: str) -> Path:
        return child_path(self._name, self.vms_dir, vm_id)

    def disk_dir(self, vm_id: str, disk_id: str) -> Path:
        return child_path(self._name, self.vm_dir(vm_id) / "disks", disk_id)

    @classmethod
    async def create(cls, root: Path, config: SiteConfig) -> LabSite:
        site = cls(root, config.name)
        data = _SITE.dump_json(config, indent=2)
        await asyncio.to_thread(write_atomically, root / "site.json", data)
        await asyncio.to_thread((root / "vms").mkdir, parents=True, exist_ok=True)
        return site

    @classmethod
    def open(cls, root: Path) -> LabSite:
        path = root / "site.json"
        if not path.is_file():
            raise SiteError(root.name, f"no lab site at {root} (run 'ferry-appliance lab create')")
        config = _SITE.validate_json(path.read_bytes())
        return cls(root, config.name)

    async def config(self) -> SiteConfig:
        data = await asyncio.to_thread((self.root / "site.json").read_bytes)
        return _SITE.validate_json(data)

    async def list_vms(self) -> list[VmConfig]:
        return await asyncio.to_thread(self._list_vms)

    def _list_vms(self) -> list[VmConfig]:
        if not self.vms_dir.is_dir():
            return []
        vms = []
        for entry in sorted(self.vms_dir.iterdir()):
            config = entry / "vm.json"
            if entry.is_dir() and config.is_file():
                vms.append(_VM.validate_json(config.read_bytes()))
        return vms

    async def get_vm(self, vm_id: str) -> VmConfig:
        try:
            path = self.vm_dir(vm_id) / "vm.json"
        except SiteError:
            raise UnknownVm(vm_id, self._name) from None
        try:
            data = await asyncio.to_thread(path.read_bytes)
        except FileNotFoundError:
            raise UnknownVm(vm_id, self._name) from None
        return _VM.validate_json(data)

    async def find_vm(self, ref: str) -> VmConfig:
        """By id first, else by exact name (names are data, possibly ambiguous)."""
        try:
            return await self.get_vm(ref)
        except UnknownVm:
            pass
        matches = [vm for vm in await self.list_vms() if vm.name == ref]
        if len(matches) == 1:
            return matches[0]
        if matches:
            raise SiteError(self._name, f"{len(matches)} VMs are named {ref!r}; use the vm_id")
        raise UnknownVm(ref, self._name)

    async def save_vm(self, vm: VmConfig) -> None:
        """Create or replace a VM's configuration, durably."""
        path = self.vm_dir(vm.vm_id) / "vm.json"
        async with self._lock:
            await asyncio.to_thread(write_atomically, path, _VM.dump_json(vm, indent=2))
