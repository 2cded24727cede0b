"""Value types shared by several messages."""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated

from pydantic import Field, PlainSerializer, SecretStr, SerializationInfo
from pydantic.types import StrictBool, StrictInt

from messages.envelope import WireModel


def _reveal_on_wire(value: SecretStr, info: SerializationInfo) -> str:
    """Secrets leave the process only inside a message put on the wire."""
    context = info.context if isinstance(info.context, dict) else {}
    return value.get_secret_value() if context.get("wire") else "**********"


Secret = Annotated[SecretStr, PlainSerializer(_reveal_on_wire, return_type=str)]
"""A secret string: masked in repr, logs and ordinary dumps; revealed only on the wire."""

Name = Annotated[str, Field(min_length=1, max_length=255)]


class PowerState(StrEnum):
    ON = "poweredOn"
    OFF = "poweredOff"
    SUSPENDED = "suspended"


class ToolsStatus(StrEnum):
    RUNNING = "running"
    NOT_RUNNING = "notRunning"
    NOT_INSTALLED = "notInstalled"


class Firmware(StrEnum):
    BIOS = "bios"
    UEFI = "uefi"


class GuestOsFamily(StrEnum):
    LINUX = "linux"
    WINDOWS = "windows"
    OTHER = "other"


class MigrationType(StrEnum):
    COLD = "cold"
    WARM = "warm"
    TBC = "tbc"


class BulkTransferMode(StrEnum):
    ONLINE = "online"
    OFFLINE = "offline"


class VerifyMode(StrEnum):
    """How hard a transfer checks what it wrote."""

    CHUNK = "chunk"  # every chunk hashed at the source and checked at the target
    CERTIFY = "certify"  # and a full re-read and compare of both sides at the end


class MigrationState(StrEnum):
    """Where a migration stands, as clients see it."""

    QUEUED = "queued"
    RUNNING = "running"
    WAITING = "waiting"
    PAUSED = "paused"
    """A cold migration waiting for a component it needs (pause_reason says which); it
    resumes from its checkpoint once that component is back."""
    CANCELLING = "cancelling"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"
    MIGRATING_BACK = "migrating_back"
    MIGRATED_BACK = "migrated_back"
    COMMITTED = "committed"
    RECOVERING = "recovering"
    """A component the VM depended on is lost: going back to its last committed epoch."""
    RECOVERED = "recovered"
    """Back on-prem at its last committed epoch (pool ``_HDM_RECOVERYSUCCESS``)."""
    RECOVERY_FAILED = "recovery_failed"
    """Back on-prem, its image not proven a committed prefix (``_HDM_RECOVERYFAILED``;
    restore from the migrate-time snapshot, kept)."""


class Phase(StrEnum):
    """The step a migration is in; finer than its state."""

    QUEUED = "queued"
    PREPARE = "prepare"
    POWER_OFF = "power_off"
    SNAPSHOT = "snapshot"
    TRANSFER = "transfer"
    VERIFY = "verify"
    CREATE_TARGET = "create_target"
    POWER_ON = "power_on"
    FINALIZE = "finalize"
    OPEN_DISKS = "open_disks"
    PARK = "park"
    AWAIT_BULK_DONE = "await_bulk_done"  # warm offline: the package is shipped, then imported
    IN_CLOUD = "in_cloud"
    MIGRATE_BACK = "migrate_back"
    RECOVER = "recover"
    CLEANUP = "cleanup"
    DONE = "done"


class DiskInfo(WireModel):
    disk_id: Name
    label: str = Field(max_length=255)
    capacity_bytes: StrictInt = Field(ge=0)
    boot: StrictBool = False


class NicInfo(WireModel):
    nic_id: Name
    mac: str = Field(pattern=r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")
    network: Name


class VmSummary(WireModel):
    """One VM as the source site describes it."""

    vm_id: Name
    name: str = Field(max_length=255)
    guest_os: str = Field(max_length=255)
    guest_os_family: GuestOsFamily
    firmware: Firmware
    cpus: StrictInt = Field(ge=1)
    memory_mib: StrictInt = Field(ge=1)
    disks: tuple[DiskInfo, ...]
    nics: tuple[NicInfo, ...]
    resource_pool: Name
    cluster: Name
    power_state: PowerState
    tools_status: ToolsStatus
    migration_state: MigrationState | None = None


class ErrorInfo(WireModel):
    code: str = Field(max_length=64)
    message: str = Field(max_length=4096)
