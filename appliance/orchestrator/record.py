"""What the orchestrator remembers about one migration (persisted as JSON, fenced writes)."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from pydantic import TypeAdapter

from appliance.orchestrator.states import Step
from messages.common import MigrationType, PowerState, VerifyMode
from messages.events import PrepareCheck

CUTOVER_SECONDS = "cutover_seconds"
"""``extra``: a warm VM's cutover, cloud VM off → on, on its volumes (seconds)."""
PAUSED_REASON = "paused_reason"
"""``extra``: a cold run paused for a component that is down: which, and why (pausing.py)."""


@dataclass(frozen=True, slots=True)
class DiskPlan:
    """One disk: where it comes from, which cloud volume it goes to, what we know of it."""

    disk_id: str
    label: str
    capacity_bytes: int
    boot: bool
    volume_id: str
    """The cloud volume's name: ``<vm>_ARM`` (warm, tbc), ``<migration>-<disk>`` (cold);
    see orchestrator/volumes.py."""
    component_id: str = ""
    """The id the components (the cache, the I/O manager) know the disk by, unique per
    migration: ``<migration>-<disk>``; empty in records made when it was the volume id."""
    snapshot_id: str | None = None
    bytes_to_copy: int = 0  # allocated bytes of the source snapshot (data and zero runs)
    source_digest: str | None = None  # whole-image digest (hash of chunk hashes), source
    target_digest: str | None = None  # the same, computed at the target
    # Served by the components (tbc): the disk's id there, where the cloud VM reaches it,
    # the cut epochs asked for (the order counter), the last cut and the last committed.
    cache_address: str | None = None  # HOST:PORT of the cache's NBD server
    cache_export: str | None = None
    onprem_address: str | None = None  # HOST:PORT of the I/O manager's NBD server
    epoch_requests: int = 0
    epoch_cut: int = 0
    epoch_committed: int = 0

    @property
    def served_as(self) -> str:
        """The disk's id on the components (:attr:`component_id`)."""
        return self.component_id or self.volume_id


@dataclass(frozen=True, slots=True)
class TransferOptions:
    verify: VerifyMode = VerifyMode.CHUNK
    bandwidth_cap_bps: float | None = None
    io_queue_depth: int = 4
    chunk_size: int = 1024 * 1024
    power_on_target: bool = True


@dataclass(frozen=True, slots=True)
class CheckResult:
    name: str
    passed: bool
    reason: str = ""

    def wire(self) -> PrepareCheck:
        return PrepareCheck(name=self.name, passed=self.passed, reason=self.reason)


@dataclass(frozen=True, slots=True)
class MigrationRecord:
    migration_id: str
    request_id: str
    correlation_id: str  # of the SourceCloneRequest: progress answers carry it
    group_id: str
    admission: int
    site: str
    vm_id: str
    vm_name: str
    migration_type: MigrationType
    step: Step
    target_site: str
    target_pool: str | None
    target_name: str
    network_map: tuple[tuple[str, str], ...]
    options: TransferOptions
    disks: tuple[DiskPlan, ...]
    has_credentials: bool = False
    guest_prepared: bool = False  # set before the sealed credentials are deleted
    prior_power: PowerState | None = None
    prior_pool: str | None = None
    snapshot_name: str | None = None
    cloud_vm_id: str | None = None
    checks: tuple[CheckResult, ...] = ()
    bytes_total: int = 0
    bytes_done: int = 0
    rate_bytes_per_s: float = 0.0
    eta_seconds: float | None = None
    bandwidth_cap_bps: float | None = None  # in force on the transfer (request's and policy's)
    rollback_to: Step | None = None  # FAILED or CANCELLED while rolling back
    error_code: str | None = None
    error_message: str | None = None
    created_at: str = ""
    updated_at: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    keep_for_resume: bool = False  # a rollback keeps the copied data and its checkpoints
    attempt: int = 0  # resumes after a failure that kept the data (SyncRequest)
    cache_node: str | None = None
    """Warm/tbc: the cloud cache instance (its component name, e.g. ``cache-1``) the VM's
    disks are cached on: the per-node limits count against it, and its heartbeat's figures
    give the VM's epoch, RPO lag, dirty bytes and cache use (orchestrator/limits.py,
    orchestrator/figures.py)."""
    source_cluster: str | None = None  # per-cluster policies apply by these
    target_cluster: str | None = None
    reply_to: str | None = None  # of the SourceCloneRequest: where progress answers go
    # Resting in the cloud (tbc): the epoch timer, persisted so it survives a restart.
    epoch_interval_s: float | None = None  # the interval the next due time was set with
    last_cut_at: str | None = None
    next_epoch_due: str | None = None
    last_commit_at: str | None = None
    syncs_done: int = 0  # SyncRequests answered (their epochs committed)
    back_power_on: bool = False  # migrate back: power the on-prem VM on at the end
    keep_snapshot: bool = False  # migrate back: keep the migrate-time snapshot
    # Warm offline bulk: the package exported there (a directory or s3://bucket/prefix).
    bulk_offline: bool = False
    package_location: str | None = None
    # Recovery (orchestrator/recovery.py): the component lost, why, the journal's verdict
    # and the pool the on-prem VM lands in (None until decided).
    recovery_component: str | None = None
    recovery_reason: str | None = None
    recovery_verdict: str = ""
    recovery_pool: str | None = None

    def with_step(self, step: Step, at: str) -> MigrationRecord:
        return replace(self, step=step, updated_at=at)

    def with_disk(self, disk: DiskPlan) -> MigrationRecord:
        disks = tuple(disk if d.disk_id == disk.disk_id else d for d in self.disks)
        return replace(self, disks=disks)


_ADAPTER = TypeAdapter(MigrationRecord)


def dump(record: MigrationRecord) -> str:
    return _ADAPTER.dump_json(record).decode()


def load(data: str) -> MigrationRecord:
    return _ADAPTER.validate_json(data)
