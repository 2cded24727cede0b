"""The shared harness of the fault suite: one VM in try-before-commit, a guest, a fault, checks.

Every case runs the same life (``run_case``): a lab VM with one 4 MiB disk goes to
the cloud by TBC over SQS (LocalStack) with the appliance's embedded components
(real cache and I/O manager processes, supervised), state in a real Redis; the
guest (tests/faults/guest.py) writes to the cache's export with its write log; a
sync commits a first epoch; the case injects its fault and returns once it is over;
then either the planned way home (a sync proves the data path whole again, the
guest writes on, halts, and the VM migrates back) or, for the cases that need
automatic recovery, the wait for the VM to land on-prem in ``_HDM_RECOVERYSUCCESS``.
The on-prem image then gets the prefix check and the lost-writes count
(tests/faults/checks.py), and the case's row goes to build/faults/rows/ (rows.py).

Times are taken with ``time.monotonic()`` by the test: detection is the first
appliance heartbeat (as a monitor reads it from the response queue) naming the
component failed after the fault began; repair is the fault's start to the
answer of the first sync sent after it (an epoch cut after the fault, committed
on-prem: the data path whole again).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from appliance.components.epochs import parse_address
from appliance.components.heartbeat import ComponentHealth, ComponentReport, Liveness
from appliance.components.onprem import current_export
from appliance.components.orders import ComponentId
from appliance.datapath.nbd import NbdBackend
from appliance.embedded import RedisServer
from appliance.sites.lab.site import LabSite
from appliance.sites.lab.workload import read_write_log
from appliance.state.keys import Keys
from appliance.state.store import StateStore, connect
from clients.client import FerryClient
from messages.common import MigrationState, Phase
from messages.events import ComponentState, Heartbeat, MigrationStatus
from tests.faults import scale
from tests.faults.checks import ImageCheck, check_image
from tests.faults.guest import FaultGuest
from tests.faults.runtime import RUNTIME, FaultPlan
from tests.faults.wan import WanLink
from tests.integration.conftest import Harness, RunningAppliance
from tests.integration.migration_helpers import Follower, start_migration
from tests.integration.tbc_helpers import (
    CACHE,
    COMPONENTS,
    ONPREM,
    cloud_export,
    components_up,
    kill_pids,
    migrate_back,
    read_onprem,
    sync,
    tbc_request,
)
from tests.support.lab import MIB, build_lab, lab_vm

RECOVERY_SUCCESS_POOL = "_HDM_RECOVERYSUCCESS"
ENDED = {
    MigrationState.MIGRATED_BACK,
    MigrationState.COMPLETED,
    MigrationState.FAILED,
    MigrationState.CANCELLED,
    MigrationState.RECOVERED,
    MigrationState.RECOVERY_FAILED,
}
StartAppliance = Callable[..., Awaitable[RunningAppliance]]


def settings_overrides() -> dict[str, object]:
    """The appliance's settings for a case: every fault threshold scaled (tests/faults/scale.py)."""
    return {
        "embedded_components": COMPONENTS,
        "component_runtime": RUNTIME,
        "test_mode": True,
        "component_heartbeat_interval_s": scale.HEARTBEAT_INTERVAL_S,
        "component_timeout_s": scale.COMPONENT_TIMEOUT_S,
        "component_restart_backoff_s": scale.RESTART_BACKOFF_S,
        "component_restart_backoff_max_s": scale.scaled(30.0),
        "component_epoch_timeout_s": scale.scaled(60.0),
        "cache_upstream_timeout_s": scale.WAN_THRESHOLD_S,
        "wan_down_threshold_s": scale.WAN_THRESHOLD_S,
        "component_repair_backoff_s": scale.scaled(10.0),
        "component_repair_backoff_max_s": scale.scaled(120.0),
        "component_repair_timeout_s": scale.REPAIR_TIMEOUT_S,
        "recovery_repair_allowance_s": scale.REPAIR_TIMEOUT_S,
        "cache_retry_delay_s": max(0.1, scale.scaled(1.0)),
        "heartbeat_interval_s": 0.25,  # the measuring resolution of detection, not a threshold
        "resting_poll_s": 0.2,
        "component_order_timeout_s": 30.0,
        "epoch_commit_timeout_s": 60.0,
    }


class Timeline:
    """The appliance's heartbeats as a monitor reads them (SQS), each with when it arrived."""

    def __init__(self, client: FerryClient) -> None:
        self._client = client
        self.beats: list[tuple[float, Heartbeat]] = []
        self._changed = asyncio.Condition()

    async def run(self) -> None:
        async for beat in self._client.heartbeats():
            self.beats.append((time.monotonic(), beat))
            async with self._changed:
                self._changed.notify_all()

    def first_failed(self, names: Sequence[str], since: float) -> float | None:
        for at, beat in self.beats:
            if at < since:
                continue
            states = {c.name: c.state for c in beat.body.components}
            if any(states.get(name) is ComponentState.FAILED for name in names):
                return at
        return None

    async def caught_up(self, since: datetime, within_s: float) -> None:
        """Until a beat sent at or after ``since`` has arrived: the beats sent before it have
        too (the queue delivers in order in practice; a late one only blurs a figure)."""
        async with asyncio.timeout(within_s), self._changed:
            await self._changed.wait_for(
                lambda: any(beat.sent_at >= since for _, beat in self.beats)
            )

    async def wait_failed(self, names: Sequence[str], since: float, within_s: float) -> float:
        async with asyncio.timeout(within_s), self._changed:
            await self._changed.wait_for(lambda: self.first_failed(names, since) is not None)
        found = self.first_failed(names, since)
        assert found is not None
        return found


@dataclass
class Measures:
    fault_at: float | None = None
    held_s: float | None = None
    detected_at: float | None = None
    repaired_at: float | None = None
    back_s: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def since_fault(self, at: float | None) -> float | None:
        if at is None or self.fault_at is None:
            return None
        return round(at - self.fault_at, 2)


@dataclass(frozen=True, slots=True)
class Midway:
    image: bytes
    bound: int
    at: float  # wall clock, as the write log's times


@dataclass
class Rig:
    """One case's running system, as its fault and its checks see it."""

    harness: Harness
    client: FerryClient
    store: StateStore
    appliance: RunningAppliance
    timeline: Timeline
    tmp: Path
    vm_id: str
    vm_name: str
    base: bytes
    follower: Follower
    migration_id: str = ""
    guest: FaultGuest | None = None
    wan: WanLink | None = None
    redis: RedisServer | None = None
    bound: int = 0
    """Every guest write up to this sequence is in an epoch committed on-prem."""
    guest_resumes: asyncio.Event | None = None
    """Set by a case whose guest must wait for it (not for the cache) after a disk error."""
    measures: Measures = field(default_factory=Measures)
    pids: set[int] = field(default_factory=set)
    midway: Midway | None = None
    """The on-prem image right after the repair, while the VM still runs in the cloud."""

    @property
    def disk(self) -> str:
        return f"{self.migration_id}-disk-0"

    @property
    def g(self) -> FaultGuest:
        assert self.guest is not None
        return self.guest

    def health(self) -> ComponentHealth:
        return ComponentHealth(self.store, scale.COMPONENT_TIMEOUT_S)

    async def report(self, instance: ComponentId) -> ComponentReport:
        return await self.health().report(instance)

    async def wait_component(
        self, instance: ComponentId, wanted: Callable[[ComponentReport], bool]
    ) -> ComponentReport:
        report = await self.health().wait_until(instance, wanted, scale.WAIT_S)
        if report.pid is not None:
            self.pids.add(report.pid)
        return report

    async def pid(self, instance: ComponentId) -> int:
        report = await self.wait_component(instance, _beating)
        assert report.pid is not None
        return report.pid

    async def pid_other_than(self, instance: ComponentId, pids: set[int]) -> int:
        """Until ``instance`` beats from a process not in ``pids`` (a restart); its pid."""
        report = await self.wait_component(instance, lambda r: _beating(r) and r.pid not in pids)
        assert report.pid is not None
        return report.pid

    async def serving_again(self, instance: ComponentId, *, not_pids: set[int]) -> int:
        """Until ``instance`` beats from a process other than ``not_pids`` (and, for the
        cache, serves the disk); its pid."""

        def back(report: ComponentReport) -> bool:
            if not _beating(report) or report.pid in not_pids:
                return False
            return instance != CACHE or self.disk in report.figures.get("exports", [])

        report = await self.wait_component(instance, back)
        assert report.pid is not None
        return report.pid

    def fault_begins(self) -> None:
        self.measures.fault_at = time.monotonic()

    async def hold(self, production_s: float) -> None:
        """A fault held for a duration (scaled): the one place the suite waits on a clock,
        because the duration *is* the fault ("SIGSTOP for just under the timeout")."""
        held = scale.scaled(production_s)
        self.measures.held_s = round(held, 3)
        await asyncio.sleep(held)

    async def sync(self, within_s: float = scale.WAIT_S) -> None:
        """A sync answered: every write acknowledged before it is in a committed epoch."""
        upto = self.g.last_sequence
        await self.client.request(sync([self.migration_id]), timeout_s=within_s)
        self.bound = max(self.bound, upto)

    def sync_soon(self) -> asyncio.Task[None]:
        """A sync sent now, answered in the background (a fault may hold its commit)."""
        return asyncio.create_task(self.sync())

    async def recover_guest(self, error: BaseException) -> None:
        """How the guest waits after a disk error: for the case's event, or for a fresh
        heartbeat of the cache serving the disk."""
        if self.guest_resumes is not None:
            await self.guest_resumes.wait()
            return
        before = await self.report(CACHE)
        mark = (before.pid, before.sequence)

        def fresh(report: ComponentReport) -> bool:
            exported = self.disk in report.figures.get("exports", [])
            return _beating(report) and exported and (report.pid, report.sequence) != mark

        await self.wait_component(CACHE, fresh)


def _beating(report: ComponentReport) -> bool:
    return report.liveness is Liveness.OK and report.pid is not None


# -- the environment of a case --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Environment:
    """What a case needs around the appliance."""

    wan: bool = False
    own_redis: bool = False
    cache_tmpfs_mib: int | None = None
    settings: tuple[tuple[str, object], ...] = ()
    component_env: tuple[tuple[str, str], ...] = ()
    """FERRY_* settings for the component processes: the embedded supervisor hands them the
    appliance's environment, and only some of its settings (appliance/service/components.py,
    ``component_env``: not the cache's sizing), so these go through the environment."""


@contextlib.contextmanager
def environment_set(values: tuple[tuple[str, str], ...]) -> Any:
    """``os.environ`` with ``values`` for the case (the children inherit it), then as it was."""
    saved = {name: os.environ.get(name) for name, _ in values}
    os.environ.update(dict(values))
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@contextlib.contextmanager
def tmpfs(path: Path, size_mib: int) -> Any:
    """A small tmpfs at ``path`` (we run as root), unmounted afterwards."""
    path.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size_mib}m", "tmpfs", str(path)],
        capture_output=True,
        text=True,
        check=False,
    )
    if mounted.returncode != 0:
        raise AssertionError(
            f"cannot mount a {size_mib} MiB tmpfs at {path} (needs root and mount(8)): "
            f"{mounted.stderr.strip()}"
        )
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False, capture_output=True)


async def _onprem_address(store: StateStore) -> tuple[str, int]:
    """Where the I/O manager really listens (its heartbeat's ``nbd_address``), now."""

    def known(report: ComponentReport) -> bool:
        return ":" in str(report.figures.get("nbd_address", ""))

    report = await ComponentHealth(store, scale.COMPONENT_TIMEOUT_S).wait_until(
        ONPREM, known, scale.WAIT_S
    )
    host, _, port = str(report.figures["nbd_address"]).rpartition(":")
    return host, int(port)


# -- one case, start to finish --------------------------------------------------------------------


@contextlib.asynccontextmanager
async def running_rig(
    environment: Environment,
    harness: Harness,
    start_appliance: StartAppliance,
    tmp_path: Path,
) -> AsyncIterator[Rig]:
    """The system of one case, up, with its VM resting in the cloud and the guest writing."""
    async with contextlib.AsyncExitStack() as stack:
        if environment.own_redis:
            redis = RedisServer(tmp_path / "own-redis")
            await redis.start()
            stack.push_async_callback(redis.stop)
            harness = Harness(
                harness.endpoint, redis.url, harness.prefix, harness.data_dir, harness.suffix
            )
        else:
            redis = None
        stack.enter_context(environment_set(environment.component_env))
        if environment.cache_tmpfs_mib is not None:
            cache_dir = harness.data_dir / "components" / "cache" / "cache-1"
            stack.enter_context(tmpfs(cache_dir, environment.cache_tmpfs_mib))
        store = StateStore(connect(harness.redis_url), Keys(harness.prefix))
        stack.push_async_callback(store.close)
        wan = None
        if environment.wan:
            wan = await stack.enter_async_context(WanLink(lambda: _onprem_address(store)))
        FaultPlan(wan=wan.address if wan else "").save(harness.data_dir)

        vm = lab_vm(1, disks=1, disk_size=4 * MIB)
        await build_lab(harness.data_dir, [vm])
        base = await read_onprem(harness.data_dir, vm.vm_id, "disk-0")
        overrides = {**settings_overrides(), **dict(environment.settings)}
        appliance = await start_appliance(harness.settings(**overrides))
        client = await stack.enter_async_context(FerryClient(harness.client_settings()))
        timeline = Timeline(client)
        watching = asyncio.create_task(timeline.run())
        stack.callback(watching.cancel)
        pids = await components_up(store, within_s=scale.WAIT_S)
        stack.callback(kill_pids, list(pids.values()), harness.data_dir)
        follower = await start_migration(client, tbc_request(client, [vm.vm_id]))
        rig = Rig(
            harness, client, store, appliance, timeline, tmp_path, vm.vm_id, vm.name, base,
            follower, wan=wan, redis=redis,
        )  # fmt: skip
        stack.callback(_pids_killer, lambda: sorted(rig.pids), harness.data_dir)
        try:
            await follower.until(
                lambda latest: all(s.phase is Phase.IN_CLOUD for s in latest.values()),
                within_s=scale.WAIT_S,
            )
            (status,) = follower.latest.values()
            rig.migration_id = status.migration_id
            address, export = await cloud_export(harness.data_dir, rig.migration_id, "disk-0")
            rig.guest = await FaultGuest.start(
                address, export, tmp_path / "guest.log", seed=17, recover=rig.recover_guest
            )
            await rig.g.wait_writes(20, within_s=scale.WAIT_S)
            await rig.sync()  # a first epoch committed: the bound the checks start from
            await rig.g.wait_writes(10, within_s=scale.WAIT_S)
            yield rig
        finally:
            if rig.guest is not None and not rig.g.stop.is_set():
                await rig.g.abandon()
            with contextlib.suppress(Exception):
                await appliance.shutdown()


def _pids_killer(pids: Callable[[], list[int]], data_dir: Path) -> None:
    kill_pids(pids(), data_dir)


async def planned_way_home(rig: Rig) -> None:
    """The data path whole again (a sync after the fault), the guest writes on, and the VM
    migrates back as planned: nothing it wrote may be lost."""
    await rig.sync()
    rig.measures.repaired_at = time.monotonic()
    rig.midway = Midway(await onprem_current(rig), rig.bound, time.time())
    await rig.g.wait_writes(20, within_s=scale.WAIT_S)
    last = await rig.g.halt()
    started = time.monotonic()
    await rig.client.request(migrate_back([rig.migration_id]), timeout_s=scale.WAIT_S)
    latest = await rig.follower.until(
        lambda latest: all(s.state in ENDED for s in latest.values()), within_s=scale.WAIT_S
    )
    rig.measures.back_s[rig.vm_name] = round(time.monotonic() - started, 2)
    (status,) = latest.values()
    assert status.state is MigrationState.MIGRATED_BACK, status.error
    rig.bound = last  # the final epoch holds everything the guest wrote


async def onprem_current(rig: Rig) -> bytes:
    """The I/O manager's current image of the disk (snapshot + committed epochs), read from
    its ``cur/`` export. Right after a sync is answered no commit is under way (no policy
    interval is set and no dirty threshold is near), so the read sees whole epochs."""
    figures = (await rig.report(ONPREM)).figures
    address = parse_address(str(figures.get("nbd_address") or figures["address"]))
    async with await NbdBackend.connect(address, current_export(rig.disk)) as current:
        return await current.read(0, current.size)


async def recovered_home(rig: Rig) -> MigrationStatus:
    """The VM migrated back by itself to its last committed epoch: ``_HDM_RECOVERYSUCCESS``."""
    latest = await rig.follower.until(
        lambda latest: all(s.state in ENDED for s in latest.values()), within_s=scale.WAIT_S
    )
    assert rig.measures.fault_at is not None
    rig.measures.back_s[rig.vm_name] = round(time.monotonic() - rig.measures.fault_at, 2)
    await rig.g.abandon()
    (status,) = latest.values()
    # Recovered, not ended some other way: a migration that failed or migrated back as
    # planned is no proof that the trigger and the recovery run did their part.
    assert status.state is MigrationState.RECOVERED, (status.state, status.error)
    assert status.recovery is not None and status.recovery.pool == RECOVERY_SUCCESS_POOL, status
    onprem = LabSite.open(rig.harness.data_dir / "sites" / "onprem")
    try:
        vm = await onprem.get_vm(rig.vm_id)
    finally:
        await onprem.close()
    assert vm.resource_pool == RECOVERY_SUCCESS_POOL, (vm.resource_pool, status)
    return status


async def final_check(rig: Rig, *, planned: bool) -> tuple[ImageCheck, ImageCheck | None]:
    """The image on-prem at the end, and (planned way) the one right after the repair."""
    await rig.appliance.shutdown()
    image = await read_onprem(rig.harness.data_dir, rig.vm_id, "disk-0")
    log = await read_write_log(rig.g.log_path)
    final = await check_image(image, rig.base, log, rig.bound, planned=planned)
    midway = None
    if rig.midway is not None:
        mid = rig.midway
        midway = await check_image(mid.image, rig.base, log, mid.bound, planned=False, at=mid.at)
    return final, midway
