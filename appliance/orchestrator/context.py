"""What the workflows are handed at startup (the orchestrator imports no layer above it)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from appliance.clock import Clock
from appliance.datapath.buffers import BufferBudget
from appliance.datapath.checkpoint import CheckpointStore
from appliance.datapath.nbd.channel import NbdAddress
from appliance.datapath.package import S3Access
from appliance.health import HealthBoard
from appliance.orchestrator.reporting import Reporter
from appliance.sealing import Sealer
from appliance.sites.protocol import Site
from appliance.state.events import EventLog
from appliance.state.leases import Lease, Leases
from appliance.state.migrations import MigrationStore
from appliance.state.policy import Policies
from appliance.state.store import StateStore


class CloudExports(Protocol):
    """The cloud side's NBD server: volumes are exported while data is copied into them."""

    async def export(self, volume_id: str) -> tuple[NbdAddress, str]:
        """Export a cloud volume; returns where to connect and the export name."""
        ...

    async def unexport(self, volume_id: str) -> None: ...


@dataclass(frozen=True, slots=True)
class OrchestratorConfig:
    appliance_id: str
    lease_ttl_s: float = 15.0
    progress_interval_s: float = 2.0
    cancel_poll_s: float = 1.0
    scheduler_tick_s: float = 1.0
    step_delay_s: float = 0.0  # a pause after each persisted step: for crash-safety tests
    transfer_workers: int = 8
    migrate_pool: str = "_HDM_MIGRATEPOOL"
    vm_lock_pending_s: float = 600.0
    """A VM lock lapses after this long unless its migration's record was created."""
    onprem_component: str = "onprem/onprem-1"
    """The I/O manager and the cloud cache that serve tbc VMs' disks."""
    cache_component: str = "cache/cache-1"
    component_order_timeout_s: float = 60.0
    component_timeout_s: float = 120.0
    epoch_commit_timeout_s: float = 600.0
    """How long a sync or a migrate back waits for an epoch to commit on-prem."""
    default_epoch_interval_s: float = 1200.0
    """The RTO/RPO interval when no policy sets one."""
    resting_poll_s: float = 1.0
    """How often a resting group looks for asks (migrate back, sync) and policy changes."""
    reconcile_threshold_bytes: int = 64 * 1024 * 1024
    """A warm VM cuts over once a reconcile pass leaves at most this to copy."""
    reconcile_max_passes: int = 20
    """Passes before a warm VM cuts over whatever remains (its last pass, VM off, copies it)."""
    package_s3: S3Access | None = None
    """Where offline packages on S3 are reached (endpoint, credentials)."""
    wan_upstream: str = ""
    """HOST:PORT the cloud cache dials to reach the I/O manager (empty: the address it gives)."""
    recovery_success_pool: str = "_HDM_RECOVERYSUCCESS"
    """Where a recovered on-prem VM lands when its image is a committed prefix."""
    recovery_failed_pool: str = "_HDM_RECOVERYFAILED"
    """... and when it is not (or cannot be told): restore from its migrate-time snapshot."""
    cutover_gate: bool = False
    """Tests only: a warm VM waits for the ask ``cutover`` before it cuts over, and for
    ``cutover_off`` once its cloud VM is off (a crash test holds it there)."""
    holds: frozenset[str] = frozenset()
    """Tests only: where a warm VM holds until the ask ``<point>_go`` (``export``,
    ``commit``: orchestrator/warm.py, warm_offline.py), a crash test killing it there."""


@dataclass(frozen=True, slots=True)
class Deps:
    config: OrchestratorConfig
    store: StateStore
    migrations: MigrationStore
    leases: Leases
    policies: Policies
    events: EventLog
    reporter: Reporter
    sites: dict[str, Site]
    cloud: CloudExports
    checkpoints: Callable[[str, Lease | None], CheckpointStore]
    """A transfer's checkpoint store, fenced by the lease when one is given."""
    sealer: Sealer
    clock: Clock
    buffers: BufferBudget
    """Chunk buffers shared by every transfer: the data path's memory, whatever runs."""
    health: HealthBoard | None = None
    """What is up and what is down (a cold copy pauses while what it needs is down)."""

    def site(self, name: str) -> Site:
        return self.sites[name]
