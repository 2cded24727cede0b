"""What a site knows about a VM, as immutable values (the wire form lives in messages/)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from pathlib import Path

from appliance.errors import UnsafeName
from messages.common import Firmware, GuestOsFamily, PowerState, ToolsStatus

_SAFE_ID = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
_SAFE_VOLUME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,79}$")
"""Volume ids are names people read (``web-01_ARM``): a wider alphabet, still no path."""


def check_id(site: str, value: str) -> str:
    """Ids (never names) become path components; only a narrow alphabet is allowed."""
    if not _SAFE_ID.fullmatch(value):
        raise UnsafeName(site, value)
    return value


def check_volume_id(site: str, value: str) -> str:
    """A cloud volume's id: letters, digits, ``_ . -``, up to 80, starting with one of the
    first two (so never ``.`` or ``..``)."""
    if not _SAFE_VOLUME.fullmatch(value):
        raise UnsafeName(site, value)
    return value


def volume_path(site: str, root: Path, volume_id: str) -> Path:
    """``root/volume_id`` for a checked volume id, proven to stay inside ``root``."""
    path = root / check_volume_id(site, volume_id)
    if not path.resolve().is_relative_to(root.resolve()):
        raise UnsafeName(site, volume_id)
    return path


def child_path(site: str, root: Path, *ids: str) -> Path:
    """``root/id/id...`` for checked ids, proven to stay inside ``root``."""
    path = root.joinpath(*(check_id(site, value) for value in ids))
    if not path.resolve().is_relative_to(root.resolve()):
        raise UnsafeName(site, "/".join(ids))
    return path


@dataclass(frozen=True, slots=True)
class DiskConfig:
    disk_id: str
    label: str
    capacity_bytes: int
    boot: bool = False
    volume_id: str | None = None  # cloud VMs: the volume the data was copied into
    nbd_export: str | None = None  # cloud VMs on a cache: nbd://HOST:PORT/EXPORT


@dataclass(frozen=True, slots=True)
class NicConfig:
    nic_id: str
    mac: str
    network: str


@dataclass(frozen=True, slots=True)
class VmConfig:
    vm_id: str
    name: str
    guest_os: str
    guest_os_family: GuestOsFamily
    firmware: Firmware
    cpus: int
    memory_mib: int
    disks: tuple[DiskConfig, ...]
    nics: tuple[NicConfig, ...]
    resource_pool: str
    cluster: str
    power_state: PowerState
    tools_status: ToolsStatus
    annotations: tuple[tuple[str, str], ...] = field(default=())

    def with_power(self, state: PowerState) -> VmConfig:
        return replace(self, power_state=state)

    def in_pool(self, pool: str) -> VmConfig:
        return replace(self, resource_pool=pool)

    def tag(self, key: str) -> str | None:
        """An annotation's value (tags are annotations), or None."""
        return dict(self.annotations).get(key)


@dataclass(frozen=True, slots=True)
class VolumeInfo:
    """A volume of a site, with the tags it was created with and the VM it is attached to."""

    volume_id: str
    tags: tuple[tuple[str, str], ...] = ()
    attached_to: str | None = None

    def tag(self, key: str) -> str | None:
        return dict(self.tags).get(key)


@dataclass(frozen=True, slots=True)
class VmProblem:
    """A VM the site cannot describe (its configuration is unreadable): reported, not fatal."""

    vm_id: str  # a safe rendering of the VM's directory or key, never raw bytes
    reason: str


@dataclass(frozen=True, slots=True)
class VmScan:
    """Every VM of a site that could be read, and what could not."""

    vms: tuple[VmConfig, ...]
    problems: tuple[VmProblem, ...] = ()


def safe_label(value: str, limit: int = 64) -> str:
    """A name as printable ASCII of bounded length, fit for a report or a log."""
    shown = ascii(value)[1:-1]
    return shown if len(shown) <= limit else shown[: limit - 3] + "..."


@dataclass(frozen=True, slots=True)
class Datastore:
    name: str
    capacity_bytes: int


@dataclass(frozen=True, slots=True)
class VmSnapshot:
    """A crash-consistent point in time of every disk of a VM (disk id -> snapshot id)."""

    vm_id: str
    name: str
    disks: tuple[tuple[str, str], ...]

    def of(self, disk_id: str) -> str:
        return dict(self.disks)[disk_id]


@dataclass(frozen=True, slots=True)
class SiteConfig:
    name: str
    kind: str  # "onprem" | "cloud"
    clusters: tuple[str, ...]
    networks: tuple[str, ...]
    resource_pools: tuple[str, ...]
    datastores: tuple[Datastore, ...]
