"""Commands: client to appliance, on the command queue."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, StrictBool, StrictFloat, StrictInt, model_validator

from messages.common import (
    BulkTransferMode,
    MigrationType,
    Name,
    PowerState,
    VerifyMode,
)
from messages.envelope import Envelope, WireModel

REPLY_TO_PATTERN = (
    r"^(?:[A-Za-z0-9_-]{1,80}"
    r"|https?://[A-Za-z0-9.-]{1,253}(?::[0-9]{1,5})?(?:/queue/[a-z0-9-]{1,32})?"
    r"/[0-9]{12}/[A-Za-z0-9_-]{1,80})$"
)
"""A standard (not FIFO) SQS queue: its name, or its URL (``/queue/<region>`` for LocalStack)."""


class Command(Envelope):
    KIND: ClassVar[str] = "command"

    reply_to: str | None = Field(
        default=None,
        pattern=REPLY_TO_PATTERN,
        description=(
            "The queue this command's answers (and a migration's progress) go to, in the "
            "appliance's own account and endpoint, named after the response queue and a dash "
            "(ferry-responses-reply-1f2e); absent or unusable: the shared response queue. "
            "Heartbeats always go to the shared response queue."
        ),
    )


# --- inventory ---------------------------------------------------------------


class InventoryFilter(WireModel):
    name_glob: str | None = Field(default=None, max_length=255)
    cluster: str | None = Field(default=None, max_length=255)
    power_state: PowerState | None = None


class SourceInventoryRequestBody(WireModel):
    filters: InventoryFilter = InventoryFilter()
    page_size: StrictInt = Field(default=100, ge=1, le=1000)
    # Room for a token that pins a 255 character name of any script (UTF-8, base64).
    page_token: str | None = Field(default=None, max_length=2048)


class SourceInventoryRequest(Command):
    message_type: Literal["SourceInventoryRequest"] = "SourceInventoryRequest"
    body: SourceInventoryRequestBody = SourceInventoryRequestBody()


# --- migration ---------------------------------------------------------------


class GuestCredentials(WireModel):
    """Used by prepare-to-migrate inside the guest; never logged, echoed or stored in clear.

    The client seals ``{"username": ..., "password": ...}`` (UTF-8 JSON) to the
    appliance's X25519 key with a libsodium sealed box; only the appliance can open it.
    """

    sealed: str = Field(
        min_length=64,
        max_length=4096,
        pattern=r"^[A-Za-z0-9+/]+={0,2}$",
        description="base64 of crypto_box_seal(JSON {username, password}, appliance X25519 key)",
    )


class NetworkMapping(WireModel):
    source: Name
    target: Name


class TargetResources(WireModel):
    site: Name = "cloud"
    cluster: str | None = Field(default=None, max_length=255)
    resource_pool: str | None = Field(default=None, max_length=255)
    datastore: str | None = Field(default=None, max_length=255)
    instance_type: str | None = Field(default=None, max_length=255)


class CloneOptions(WireModel):
    verify: VerifyMode = VerifyMode.CHUNK
    bandwidth_cap_mbps: StrictFloat | None = Field(default=None, gt=0)
    io_queue_depth: StrictInt = Field(default=4, ge=1, le=64)
    chunk_size_mib: StrictInt = Field(default=1, ge=1, le=64)
    compress: StrictBool = False
    power_on_target: StrictBool = True


class VmRef(WireModel):
    """A VM, by id or by name (exactly one): a name is never taken for an id, nor the reverse."""

    vm_id: str | None = Field(default=None, min_length=1, max_length=255)
    name: str | None = Field(default=None, min_length=1, max_length=255)

    @model_validator(mode="after")
    def _one_reference(self) -> VmRef:
        if (self.vm_id is None) == (self.name is None):
            raise ValueError("give exactly one of vm_id or name")
        return self

    @property
    def key(self) -> tuple[str, str]:
        """("vm_id", id) or ("name", name): what the reference says, and of which kind."""
        return ("vm_id", self.vm_id) if self.vm_id is not None else ("name", str(self.name))

    def __str__(self) -> str:
        kind, value = self.key
        return f"{kind} {value!r}"


class CloneVm(VmRef):
    """A VM to migrate, by id or by name (exactly one)."""

    target_name: str | None = Field(default=None, min_length=1, max_length=255)


class SourceCloneRequestBody(WireModel):
    request_id: str | None = Field(
        default=None,
        min_length=1,
        max_length=128,
        description="Idempotency key; default: message_id",
    )
    vms: tuple[CloneVm, ...] = Field(min_length=1, max_length=1000)
    migration_type: MigrationType
    bulk_transfer_mode: BulkTransferMode = BulkTransferMode.ONLINE
    package_location: str | None = Field(
        default=None,
        min_length=1,
        max_length=2048,
        description="bulk_transfer_mode offline: where the appliance exports the package "
        "(a directory on its host, or s3://bucket/prefix)",
    )
    guest_credentials: GuestCredentials | None = None
    target: TargetResources = TargetResources()
    network_map: tuple[NetworkMapping, ...] = ()
    application_dependency: tuple[tuple[VmRef, ...], ...] = Field(
        default=(),
        description="Groups of VMs that migrate and cut over together; each member names a VM "
        "of `vms` the same way (by vm_id, or by name) as `vms` does.",
    )
    options: CloneOptions = CloneOptions()

    @model_validator(mode="after")
    def _package_for_offline(self) -> SourceCloneRequestBody:
        if self.package_location is not None and (
            self.bulk_transfer_mode is not BulkTransferMode.OFFLINE
        ):
            raise ValueError("package_location is for bulk_transfer_mode offline")
        return self


class SourceCloneRequest(Command):
    message_type: Literal["SourceCloneRequest"] = "SourceCloneRequest"
    body: SourceCloneRequestBody


class MigrationSelector(WireModel):
    """Which migrations a command is about: by id, by request, or by VM."""

    migration_ids: tuple[str, ...] = Field(default=(), max_length=1000)
    request_id: str | None = Field(default=None, max_length=128)
    vms: tuple[VmRef, ...] = Field(default=(), max_length=1000)

    @model_validator(mode="after")
    def _not_empty(self) -> MigrationSelector:
        if not (self.migration_ids or self.request_id or self.vms):
            raise ValueError("name migration_ids, a request_id or vms")
        return self


class BulkMigrationDoneRequestBody(WireModel):
    select: MigrationSelector
    package_location: str | None = Field(default=None, max_length=2048)


class BulkMigrationDoneRequest(Command):
    message_type: Literal["BulkMigrationDoneRequest"] = "BulkMigrationDoneRequest"
    body: BulkMigrationDoneRequestBody


class MigrateBackRequestBody(WireModel):
    select: MigrationSelector
    planned: StrictBool = True
    power_on: StrictBool = Field(
        default=False, description="power the on-prem VM on once back (default: off)"
    )
    keep_snapshot: StrictBool = Field(
        default=False, description="keep the migrate-time snapshot (default: consolidated)"
    )


class MigrateBackRequest(Command):
    message_type: Literal["MigrateBackRequest"] = "MigrateBackRequest"
    body: MigrateBackRequestBody


class CommitRequestBody(WireModel):
    select: MigrationSelector


class CommitRequest(Command):
    message_type: Literal["CommitRequest"] = "CommitRequest"
    body: CommitRequestBody


class SyncRequestBody(WireModel):
    select: MigrationSelector


class SyncRequest(Command):
    message_type: Literal["SyncRequest"] = "SyncRequest"
    body: SyncRequestBody


class CancelRequestBody(WireModel):
    select: MigrationSelector


class CancelRequest(Command):
    message_type: Literal["CancelRequest"] = "CancelRequest"
    body: CancelRequestBody


class SetPolicyRequestBody(WireModel):
    """Every field given is stored and used; absent (null) fields keep their value."""

    cluster: str | None = Field(default=None, max_length=255, description="None: the default")
    rto_rpo_interval_s: StrictInt | None = Field(
        default=None,
        ge=10,
        le=86400,
        description="A VM resting in the cloud (tbc, warm) commits a flush epoch on-prem at "
        "least this often (default 1200 s)",
    )
    rpo_dirty_bytes: StrictInt | None = Field(
        default=None,
        ge=1024 * 1024,
        le=2**53 - 1,
        description="... and as soon as this many bytes are dirty in its cache (default 10 GB)",
    )
    max_concurrent_migrations: StrictInt | None = Field(
        default=None, ge=1, le=256, description="Cold migrations in progress (default 8)"
    )
    max_in_progress_per_cache_node: StrictInt | None = Field(
        default=None,
        ge=1,
        le=256,
        description="Warm and tbc migrations in progress per cache node (default 4)",
    )
    max_resting_per_cache_node: StrictInt | None = Field(
        default=None,
        ge=1,
        le=10000,
        description="VMs resting in the cloud per cache node (default 20)",
    )
    bandwidth_cap_mbps: StrictFloat | None = Field(default=None, gt=0)


class SetPolicyRequest(Command):
    message_type: Literal["SetPolicyRequest"] = "SetPolicyRequest"
    body: SetPolicyRequestBody


class ResetRequestBody(WireModel):
    confirm: StrictBool = Field(description="Must be true: a reset forgets every migration record")


class ResetRequest(Command):
    message_type: Literal["ResetRequest"] = "ResetRequest"
    body: ResetRequestBody


class StatusRequestBody(WireModel):
    migration_ids: tuple[str, ...] = Field(default=(), max_length=1000)
    request_id: str | None = Field(default=None, max_length=128)
    include_finished: StrictBool = True
    page_size: StrictInt = Field(default=100, ge=1, le=1000)
    page_token: str | None = Field(default=None, max_length=512)


class StatusRequest(Command):
    message_type: Literal["StatusRequest"] = "StatusRequest"
    body: StatusRequestBody = StatusRequestBody()


class EventsRequestBody(WireModel):
    migration_id: str | None = Field(
        default=None, max_length=128, description="One migration's events (default: all)"
    )
    kinds: tuple[str, ...] = Field(
        default=(), max_length=32, description="Only these kinds (default: every kind)"
    )
    count: StrictInt = Field(default=100, ge=1, le=1000, description="The newest this many")


class EventsRequest(Command):
    """The appliance's event log (failures, recoveries, steps...), newest last."""

    message_type: Literal["EventsRequest"] = "EventsRequest"
    body: EventsRequestBody = EventsRequestBody()


COMMANDS: tuple[type[Command], ...] = (
    SourceInventoryRequest,
    SourceCloneRequest,
    BulkMigrationDoneRequest,
    MigrateBackRequest,
    CommitRequest,
    SyncRequest,
    CancelRequest,
    SetPolicyRequest,
    ResetRequest,
    StatusRequest,
    EventsRequest,
)
