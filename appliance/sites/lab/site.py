"""The lab site driver: a directory per site, a directory per VM, JSON configuration.

Layout (ids, never names, become path components)::

    {root}/site.json                         SiteConfig
    {root}/vms/{vm_id}/vm.json               VmConfig
    {root}/vms/{vm_id}/disks/{disk_id}/      a VM's own disk (LayeredDisk directory)
    {root}/volumes/{volume_id}/              a volume (cloud: copied disks, attached to VMs)

Disks are opened once and kept open while the site is (LayeredDisk holds an
exclusive lock on its directory), so every user in the process shares them.
"""

from __future__ import annotations

import asyncio
import json
import shutil
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Self

from pydantic import TypeAdapter, ValidationError

from appliance.errors import (
    AmbiguousVmName,
    InvalidCredentials,
    SiteError,
    UnknownVm,
    UnreadableVm,
)
from appliance.sites.lab.files import write_atomically
from appliance.sites.model import (
    DiskConfig,
    SiteConfig,
    VmConfig,
    VmProblem,
    VmScan,
    VmSnapshot,
    VolumeInfo,
    check_id,
    child_path,
    safe_label,
    volume_path,
)
from appliance.storage.backend import Backend
from appliance.storage.extents import Extent
from appliance.storage.layered import LayeredDisk
from messages.common import PowerState, ToolsStatus

_SITE = TypeAdapter(SiteConfig)
_VM = TypeAdapter(VmConfig)


class LabSite:
    """A site made of files under ``root``; the embedded default and what tests use."""

    def __init__(self, root: Path, name: str) -> None:
        self.root = root
        self._name = check_id(name, name)
        self._lock = asyncio.Lock()
        self._disks: dict[Path, LayeredDisk] = {}
        self._disk_lock = asyncio.Lock()

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

    def volume_dir(self, volume_id: str) -> Path:
        return volume_path(self._name, self.root / "volumes", volume_id)

    @classmethod
    async def create(cls, root: Path, config: SiteConfig) -> Self:
        site = cls(root, config.name)
        data = _SITE.dump_json(config, indent=2)
        await asyncio.to_thread(write_atomically, root / "site.json", data)
        await asyncio.to_thread((root / "vms").mkdir, parents=True, exist_ok=True)
        return site

    @classmethod
    def open(cls, root: Path) -> Self:
        path = root / "site.json"
        if not path.is_file():
            raise SiteError(root.name, f"no lab site at {root} (run 'ferry-appliance lab create')")
        config = _SITE.validate_json(path.read_bytes())
        return cls(root, config.name)

    async def config(self) -> SiteConfig:
        data = await asyncio.to_thread((self.root / "site.json").read_bytes)
        return _SITE.validate_json(data)

    # -- inventory ------------------------------------------------------------------

    async def list_vms(self) -> list[VmConfig]:
        return list((await self.scan_vms()).vms)

    async def scan_vms(self) -> VmScan:
        return await asyncio.to_thread(self._scan_vms)

    def _list_vms(self) -> list[VmConfig]:
        return list(self._scan_vms().vms)

    def _scan_vms(self) -> VmScan:
        """One unreadable vm.json (bad JSON, a lone surrogate) never hides the other VMs."""
        if not self.vms_dir.is_dir():
            return VmScan(())
        vms: list[VmConfig] = []
        problems: list[VmProblem] = []
        for entry in sorted(self.vms_dir.iterdir()):
            config = entry / "vm.json"
            if entry.is_dir() and config.is_file():
                try:
                    vms.append(self._parse_vm(entry.name, config.read_bytes()))
                except SiteError as error:
                    problems.append(VmProblem(safe_label(entry.name), error.reason))
        return VmScan(tuple(vms), tuple(problems))

    def _parse_vm(self, vm_id: str, data: bytes) -> VmConfig:
        try:
            return _VM.validate_json(data)
        except ValidationError as error:
            first = error.errors(include_input=False, include_url=False)[0]
            where = ".".join(str(part) for part in first["loc"]) or "vm.json"
            raise UnreadableVm(self._name, safe_label(vm_id), f"{where}: {first['msg']}") from None

    async def get_vm(self, vm_id: str) -> VmConfig:
        try:
            path = self.vm_dir(vm_id) / "vm.json"
        except SiteError:
            raise UnknownVm(vm_id, self._name) from None
        try:
            data = await asyncio.to_thread(path.read_bytes)
        except FileNotFoundError:
            raise UnknownVm(vm_id, self._name) from None
        return self._parse_vm(vm_id, data)

    async def find_vm_by_name(self, name: str) -> VmConfig:
        """By exact name only (names are data, possibly shared); ids go to get_vm."""
        matches = [vm for vm in await self.list_vms() if vm.name == name]
        if len(matches) == 1:
            return matches[0]
        if matches:
            raise AmbiguousVmName(name, self._name, sorted(vm.vm_id for vm in matches))
        raise UnknownVm(name, self._name)

    async def free_bytes(self) -> int:
        config = await self.config()
        capacity = sum(store.capacity_bytes for store in config.datastores)
        used = sum(d.capacity_bytes for vm in await self.list_vms() for d in vm.disks)
        used += await asyncio.to_thread(self._unattached_volume_bytes)
        return max(0, capacity - used)

    def _unattached_volume_bytes(self) -> int:
        attached = {d.volume_id for vm in self._list_vms() for d in vm.disks if d.volume_id}
        total = 0
        volumes = self.root / "volumes"
        for entry in volumes.iterdir() if volumes.is_dir() else ():
            size_file = entry / ".capacity"
            if entry.name not in attached and size_file.is_file():
                total += int(size_file.read_text())
        return total

    # -- VMs ------------------------------------------------------------------------

    async def save_vm(self, vm: VmConfig) -> None:
        """Create or replace a VM's configuration, durably."""
        path = self.vm_dir(vm.vm_id) / "vm.json"
        async with self._lock:
            await asyncio.to_thread(write_atomically, path, _VM.dump_json(vm, indent=2))

    async def set_power(self, vm_id: str, state: PowerState) -> VmConfig:
        vm = await self.get_vm(vm_id)
        tools = vm.tools_status
        if tools is not ToolsStatus.NOT_INSTALLED:
            tools = ToolsStatus.RUNNING if state is PowerState.ON else ToolsStatus.NOT_RUNNING
        changed = replace(vm, power_state=state, tools_status=tools)
        if changed != vm:
            if state is not PowerState.ON:
                await self._flush_vm_disks(vm)
            await self.save_vm(changed)
        return changed

    async def prepare_guest(self, vm_id: str, username: str, password: str) -> None:
        """The lab has no guest to log into: it notes that the guest was prepared, and
        neither the username nor the password (neither is ever stored or echoed)."""
        vm = await self.get_vm(vm_id)
        if not username or not password:
            raise InvalidCredentials(f"empty guest username or password for {vm_id}")
        notes = dict(vm.annotations)
        if notes.get("ferry.guest_prepared") != "true":
            notes["ferry.guest_prepared"] = "true"
            await self.save_vm(replace(vm, annotations=tuple(sorted(notes.items()))))

    async def tag_vm(self, vm_id: str, tags: Mapping[str, str | None]) -> VmConfig:
        vm = await self.get_vm(vm_id)
        notes = dict(vm.annotations)
        for key, value in tags.items():
            if value is None:
                notes.pop(key, None)
            else:
                notes[key] = value
        changed = replace(vm, annotations=tuple(sorted(notes.items())))
        if changed != vm:
            await self.save_vm(changed)
        return changed

    async def move_to_pool(self, vm_id: str, pool: str) -> VmConfig:
        vm = await self.get_vm(vm_id)
        await self._ensure_pool(pool)
        changed = vm.in_pool(pool)
        if changed != vm:
            await self.save_vm(changed)
        return changed

    async def _ensure_pool(self, pool: str) -> None:
        async with self._lock:  # read-modify-write: concurrent finalizes add the pool once
            config = await self.config()
            if pool not in config.resource_pools:
                updated = replace(config, resource_pools=(*config.resource_pools, pool))
                await asyncio.to_thread(
                    write_atomically, self.root / "site.json", _SITE.dump_json(updated, indent=2)
                )

    async def create_vm(self, vm: VmConfig) -> VmConfig:
        try:
            existing = await self.get_vm(vm.vm_id)
        except UnknownVm:
            existing = None
        if existing is not None:
            return existing
        for disk in vm.disks:
            if disk.volume_id and not self.volume_dir(disk.volume_id).is_dir():
                raise SiteError(self._name, f"volume {disk.volume_id} of {vm.vm_id} is missing")
        await self._ensure_pool(vm.resource_pool)
        await self.save_vm(vm)
        return vm

    async def replace_disks(self, vm_id: str, disks: tuple[DiskConfig, ...]) -> VmConfig:
        vm = await self.get_vm(vm_id)
        if vm.disks == disks:
            return vm
        if vm.power_state is not PowerState.OFF:
            raise SiteError(self._name, f"{vm_id} is powered on: its disks cannot be swapped")
        for disk in disks:
            if disk.volume_id and not self.volume_dir(disk.volume_id).is_dir():
                raise SiteError(self._name, f"volume {disk.volume_id} of {vm_id} is missing")
        changed = replace(vm, disks=disks)
        await self.save_vm(changed)
        return changed

    async def delete_vm(self, vm_id: str) -> None:
        try:
            vm = await self.get_vm(vm_id)
        except UnknownVm:
            return
        for disk in vm.disks:
            await self._forget_disk(self._disk_path(vm.vm_id, disk))
            if disk.volume_id:
                await self.delete_volume(disk.volume_id)
        await asyncio.to_thread(shutil.rmtree, self.vm_dir(vm_id), True)

    # -- disks ----------------------------------------------------------------------

    def _disk_path(self, vm_id: str, disk: DiskConfig) -> Path:
        if disk.volume_id:
            return self.volume_dir(disk.volume_id)
        return self.disk_dir(vm_id, disk.disk_id)

    async def create_disk(self, vm_id: str, disk: DiskConfig) -> LayeredDisk:
        """A VM's own new, empty disk (used when building a site)."""
        path = self._disk_path(vm_id, disk)
        async with self._disk_lock:
            if path in self._disks:
                return self._disks[path]
            layered = await LayeredDisk.create(path, disk.capacity_bytes)
            self._disks[path] = layered
            return layered

    async def layered_disk(self, vm_id: str, disk_id: str) -> LayeredDisk:
        vm = await self.get_vm(vm_id)
        disk = next((d for d in vm.disks if d.disk_id == disk_id), None)
        if disk is None:
            raise SiteError(self._name, f"VM {vm_id} has no disk {disk_id!r}")
        return await self._open(self._disk_path(vm_id, disk))

    async def _open(self, path: Path) -> LayeredDisk:
        async with self._disk_lock:
            layered = self._disks.get(path)
            if layered is None:
                if not (path / "manifest.json").is_file():
                    raise SiteError(self._name, f"no disk at {path.relative_to(self.root)}")
                layered = await LayeredDisk.open(path)
                self._disks[path] = layered
            return layered

    async def _forget_disk(self, path: Path) -> None:
        async with self._disk_lock:
            layered = self._disks.pop(path, None)
        if layered is not None:
            await layered.close()

    async def _flush_vm_disks(self, vm: VmConfig) -> None:
        for disk in vm.disks:
            path = self._disk_path(vm.vm_id, disk)
            if path in self._disks:
                await self._disks[path].flush()

    async def open_disk(self, vm_id: str, disk_id: str, snapshot_id: str | None = None) -> Backend:
        layered = await self.layered_disk(vm_id, disk_id)
        return layered.active() if snapshot_id is None else layered.at(snapshot_id)

    async def snapshot_vm(self, vm_id: str, name: str) -> VmSnapshot:
        vm = await self.get_vm(vm_id)
        taken = []
        for disk in vm.disks:
            layered = await self.layered_disk(vm_id, disk.disk_id)
            existing = next((s for s in layered.snapshots() if s.name == name), None)
            info = existing or await layered.snapshot(name)
            taken.append((disk.disk_id, info.id))
        return VmSnapshot(vm_id, name, tuple(taken))

    async def delete_vm_snapshot(self, vm_id: str, name: str) -> None:
        vm = await self.get_vm(vm_id)
        for disk in vm.disks:
            layered = await self.layered_disk(vm_id, disk.disk_id)
            for info in layered.snapshots():
                if info.name == name:
                    await layered.delete_snapshot(info.id)

    async def vm_snapshot_names(self, vm_id: str) -> list[str]:
        vm = await self.get_vm(vm_id)
        names: dict[str, None] = {}
        for disk in vm.disks:
            layered = await self.layered_disk(vm_id, disk.disk_id)
            names.update(dict.fromkeys(info.name for info in layered.snapshots()))
        return list(names)

    async def changed_extents(
        self, vm_id: str, disk_id: str, from_snapshot_id: str, to_snapshot_id: str | None
    ) -> list[Extent]:
        layered = await self.layered_disk(vm_id, disk_id)
        return await layered.changed_extents(from_snapshot_id, to_snapshot_id)

    # -- volumes --------------------------------------------------------------------

    async def create_volume(
        self, volume_id: str, capacity_bytes: int, tags: Mapping[str, str] | None = None
    ) -> Backend:
        path = self.volume_dir(volume_id)
        if (path / "manifest.json").is_file():
            return (await self._open(path)).active()
        free = await self.free_bytes()
        if capacity_bytes > free:
            raise SiteError(self._name, f"no room for {capacity_bytes} bytes ({free} free)")
        async with self._disk_lock:
            # Tags first: a volume that exists is one that can be traced to what made it.
            data = json.dumps(dict(tags or {}), sort_keys=True).encode()
            await asyncio.to_thread(write_atomically, path / ".tags.json", data)
            layered = await LayeredDisk.create(path, capacity_bytes)
            # Atomically: free_bytes() of a concurrent migration reads it any time.
            await asyncio.to_thread(write_atomically, path / ".capacity", b"%d" % capacity_bytes)
            self._disks[path] = layered
        return layered.active()

    async def list_volumes(self) -> list[VolumeInfo]:
        return await asyncio.to_thread(self._list_volumes)

    def _list_volumes(self) -> list[VolumeInfo]:
        volumes = self.root / "volumes"
        if not volumes.is_dir():
            return []
        attached = {d.volume_id: vm.vm_id for vm in self._list_vms() for d in vm.disks}
        found = []
        for entry in sorted(volumes.iterdir()):
            if entry.is_dir():
                found.append(
                    VolumeInfo(
                        entry.name, _read_tags(entry / ".tags.json"), attached.get(entry.name)
                    )
                )
        return found

    async def open_volume(self, volume_id: str) -> Backend:
        return (await self._open(self.volume_dir(volume_id))).active()

    async def delete_volume(self, volume_id: str) -> None:
        path = self.volume_dir(volume_id)
        await self._forget_disk(path)
        await asyncio.to_thread(shutil.rmtree, path, True)

    def disk_location(self, vm_id: str, disk_id: str) -> str:
        return str(self.disk_dir(vm_id, disk_id).resolve())

    async def release_volume(self, volume_id: str) -> None:
        await self._forget_disk(self.volume_dir(volume_id))

    async def release(self, vm_id: str) -> None:
        try:
            vm = await self.get_vm(vm_id)
        except UnknownVm:
            return
        for disk in vm.disks:
            await self._forget_disk(self._disk_path(vm.vm_id, disk))

    async def close(self) -> None:
        async with self._disk_lock:
            disks, self._disks = list(self._disks.values()), {}
        for layered in disks:
            await layered.close()


def _read_tags(path: Path) -> tuple[tuple[str, str], ...]:
    """A volume's tags; an unreadable file (a crash while writing) counts as none."""
    try:
        document = json.loads(path.read_bytes())
    except (OSError, ValueError):
        return ()
    if not isinstance(document, dict):
        return ()
    return tuple(sorted((str(k), str(v)) for k, v in document.items()))
