"""Events: appliance to client, on the response queue."""

from __future__ import annotations

import re
from datetime import datetime
from enum import StrEnum
from typing import Annotated, ClassVar, Literal

from pydantic import (
    AwareDatetime,
    BeforeValidator,
    Field,
    JsonValue,
    StrictBool,
    StrictFloat,
    StrictInt,
)

from messages.common import (
    ErrorInfo,
    MigrationState,
    MigrationType,
    Phase,
    VmSummary,
)
from messages.envelope import Envelope, WireModel
from messages.errors import ErrorCode

_DATE_TIME = re.compile(r"^\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}")


def _date_time_text(value: object) -> object:
    """A date-time on the wire is RFC 3339 text, never a number (pydantic would take one)."""
    if isinstance(value, bool | int | float) or (
        isinstance(value, str) and not _DATE_TIME.match(value)
    ):
        raise ValueError("expected an RFC 3339 date-time with offset")
    return value


DateTime = Annotated[AwareDatetime, BeforeValidator(_date_time_text)]


class Event(Envelope):
    KIND: ClassVar[str] = "event"

    signature: str | None = Field(
        default=None,
        pattern=r"^[0-9a-f]{128}$",
        description="Ed25519 (lowercase hex) by the appliance's key over the JCS of the rest",
    )


class ReadyStatus(StrEnum):
    READY = "Ready"
    NOT_READY = "Not Ready"


class ComponentState(StrEnum):
    OK = "ok"
    DEGRADED = "degraded"
    FAILED = "failed"


class ComponentStatus(WireModel):
    name: str = Field(max_length=128)
    state: ComponentState
    detail: str = Field(default="", max_length=1024)
    last_ok_at: datetime | None = None
    required: StrictBool = True


class HeartbeatBody(WireModel):
    status: ReadyStatus
    status_details: tuple[str, ...] = ()
    appliance_id: str = Field(max_length=128)
    sequence: StrictInt = Field(ge=0)
    uptime_s: StrictFloat = Field(ge=0)
    version: str = Field(max_length=64)
    components: tuple[ComponentStatus, ...] = ()
    migration_counts: dict[str, StrictInt] = Field(
        default_factory=dict, description="Migrations by state; empty while state is unreachable"
    )
    commands_in_flight: StrictInt = Field(default=0, ge=0)
    appliance_key: str = Field(
        pattern=r"^[0-9a-f]{64}:[0-9a-f]{64}$",
        description="The appliance's public key, '<ed25519 hex>:<x25519 hex>': events are "
        "signed with the first, guest credentials are sealed to the second",
    )


class Heartbeat(Event):
    message_type: Literal["Heartbeat"] = "Heartbeat"
    body: HeartbeatBody


class InventorySkip(WireModel):
    """A VM left out of an inventory because it cannot be described on the wire."""

    vm_id: str = Field(max_length=255)
    code: str = Field(max_length=64)
    message: str = Field(max_length=1024)


class SourceInventoryResponseBody(WireModel):
    vms: tuple[VmSummary, ...]
    next_page_token: str | None = None
    total_count: StrictInt = Field(ge=0, description="Matching VMs across all pages")
    skipped: tuple[InventorySkip, ...] = Field(
        default=(),
        description="VMs that could not be listed (unreadable, or a name not fit for the "
        "wire): given on the first page of a listing",
    )


class SourceInventoryResponse(Event):
    message_type: Literal["SourceInventoryResponse"] = "SourceInventoryResponse"
    body: SourceInventoryResponseBody


class PrepareCheck(WireModel):
    name: str = Field(max_length=64)
    passed: StrictBool
    reason: str = Field(default="", max_length=1024)


class RecoveryInfo(WireModel):
    """Why a VM was sent back on-prem by itself, and where it landed."""

    component: str = Field(
        max_length=200, description="The lost component, e.g. cache/cache-1 (kind/name)"
    )
    reason: str = Field(max_length=4096, description="Why it counts as lost")
    pool: str | None = Field(
        default=None,
        max_length=255,
        description="Where the on-prem VM landed: _HDM_RECOVERYSUCCESS (its image is the "
        "last committed epoch) or _HDM_RECOVERYFAILED (restore it from the migrate-time "
        "snapshot, kept); null until decided",
    )
    verdict: str = Field(
        default="",
        max_length=4096,
        description="What the I/O manager's journal said of each disk (committed prefix, "
        "applied epoch), or why it could not say",
    )


class MigrationStatus(WireModel):
    """Everything a client needs to show one VM's migration."""

    migration_id: str
    request_id: str
    vm_id: str
    vm_name: str
    migration_type: MigrationType
    state: MigrationState
    phase: Phase
    group_id: str | None = None
    queue_position: StrictInt | None = Field(default=None, ge=1)
    progress_percent: StrictFloat = Field(default=0.0, ge=0, le=100)
    bytes_done: StrictInt = Field(default=0, ge=0)
    bytes_total: StrictInt = Field(default=0, ge=0)
    rate_bytes_per_s: StrictFloat = Field(default=0.0, ge=0)
    eta_seconds: StrictFloat | None = Field(default=None, ge=0)
    bandwidth_cap_bps: StrictFloat | None = Field(
        default=None,
        gt=0,
        description="While data moves: the cap in force now, bytes per second (the lower of "
        "the request's and the policy's); null when uncapped",
    )
    checks: tuple[PrepareCheck, ...] = ()
    error: ErrorInfo | None = None
    pause_reason: str | None = Field(
        default=None,
        max_length=1024,
        description="While paused: the components it waits for and why they are down",
    )
    updated_at: datetime
    # Warm and tbc, while the VM runs on the cloud cache (null for cold, and when the
    # cache's heartbeat does not say): how far on-prem is behind the VM.
    committed_epoch: StrictInt | None = Field(
        default=None, ge=0, description="The last flush epoch committed on-prem (every disk)"
    )
    last_epoch_at: DateTime | None = Field(
        default=None, description="When that epoch committed (the oldest of the VM's disks)"
    )
    rpo_lag_s: StrictFloat | None = Field(
        default=None,
        ge=0,
        description="Seconds since last_epoch_at: what a loss of the cloud now would lose, at most",
    )
    dirty_bytes: StrictInt | None = Field(
        default=None, ge=0, description="Bytes written in the cloud not yet committed on-prem"
    )
    cache_bytes: StrictInt | None = Field(
        default=None, ge=0, description="The VM's disks' use of the cloud cache"
    )
    cutover_s: StrictFloat | None = Field(
        default=None,
        ge=0,
        description="A warm VM cut over: seconds from its cloud VM powered off to powered on, "
        "on its volumes",
    )
    volumes: tuple[str, ...] = Field(
        default=(),
        description="The cloud volumes the VM's disks are copied into, in its disk order: "
        "<vm>_ARM, <vm>_ARM_2, ... (warm, tbc); <migration>-<disk> (cold)",
    )
    reconcile_pass: StrictInt | None = Field(
        default=None,
        ge=1,
        description="A warm VM: the reconcile pass under way (or the last one made); "
        "bytes, rate and ETA are then that pass's",
    )
    recovery: RecoveryInfo | None = Field(
        default=None,
        description="Set when a lost component sent the VM back on its own (state "
        "recovering, recovered or recovery_failed)",
    )


class SourceCloneResponse(Event):
    message_type: Literal["SourceCloneResponse"] = "SourceCloneResponse"
    body: MigrationStatus


class StatusResponseBody(WireModel):
    status: ReadyStatus
    migrations: tuple[MigrationStatus, ...] = ()
    next_page_token: str | None = None
    migration_counts: dict[str, StrictInt] = Field(default_factory=dict)
    policy: dict[str, StrictFloat | StrictInt | str | None] = Field(default_factory=dict)
    status_details: tuple[str, ...] = Field(
        default=(), description="As in the heartbeat: why Not Ready, naming what is down"
    )
    components: tuple[ComponentStatus, ...] = Field(
        default=(), description="Every component the appliance needs, with its state"
    )


class StatusResponse(Event):
    message_type: Literal["StatusResponse"] = "StatusResponse"
    body: StatusResponseBody


class ResetOutcome(StrEnum):
    """What a reset made of one unfinished migration."""

    UNDONE = "undone"
    """It had not started running in the cloud: its source is as it was before it."""
    RETURNED = "returned"
    """It ran in the cloud (tbc, or warm before its cut-over): brought home to its last
    committed epoch, powered off in the migrate pool, its migrate-time snapshot kept."""
    KEPT_IN_CLOUD = "kept_in_cloud"
    """Past its cut-over: the cloud copy is the finished one and keeps running; the
    source is finished as a commit would (migrate pool, off, no snapshot)."""


class UndoneMigration(WireModel):
    """What a reset did about one unfinished migration (its VM, the sites, the components)."""

    migration_id: str = Field(max_length=128)
    vm_id: str = Field(max_length=255)
    actions: tuple[str, ...] = ()
    error: str | None = Field(default=None, max_length=1024)
    outcome: ResetOutcome = ResetOutcome.UNDONE
    epoch: StrictInt | None = Field(
        default=None,
        ge=0,
        description="returned: the committed epoch its on-prem disks were left at (the lowest "
        "over its disks; 0: the migrate-time snapshot); absent when not known",
    )


class CommandResponseBody(WireModel):
    """The answer to a command that has no richer response of its own."""

    command_type: str = Field(max_length=64)
    accepted: StrictBool = True
    detail: str = Field(default="", max_length=4096)
    migration_ids: tuple[str, ...] = ()
    undone: tuple[UndoneMigration, ...] = Field(
        default=(),
        description="ResetRequest: each unfinished migration (Redis's, and those found on the "
        "sites), what was done about it and what became of it (a finished cloud copy is "
        "never removed)",
    )


class CommandResponse(Event):
    message_type: Literal["CommandResponse"] = "CommandResponse"
    body: CommandResponseBody


class ErrorResponseBody(WireModel):
    code: ErrorCode
    message: str = Field(max_length=4096)
    correlation_id: str | None = Field(
        default=None, max_length=128, description="The offending message's correlation id"
    )
    command_type: str | None = Field(default=None, max_length=64)
    retryable: StrictBool = False


class ErrorResponse(Event):
    message_type: Literal["ErrorResponse"] = "ErrorResponse"
    body: ErrorResponseBody


class LoggedEvent(WireModel):
    """One entry of the appliance's event log (the Redis Stream ``{prefix}:events``)."""

    event_id: str = Field(max_length=64, description="The stream entry id")
    kind: str = Field(max_length=64)
    at: str = Field(max_length=64)
    migration_id: str | None = Field(default=None, max_length=128)
    fields: dict[str, JsonValue] = Field(default_factory=dict)


class EventsResponseBody(WireModel):
    events: tuple[LoggedEvent, ...] = ()
    truncated: StrictBool = Field(
        default=False, description="Older matching events were left out to fit one message"
    )


class EventsResponse(Event):
    message_type: Literal["EventsResponse"] = "EventsResponse"
    body: EventsResponseBody


EVENTS: tuple[type[Event], ...] = (
    Heartbeat,
    SourceInventoryResponse,
    SourceCloneResponse,
    StatusResponse,
    CommandResponse,
    ErrorResponse,
    EventsResponse,
)
