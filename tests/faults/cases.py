"""The fault cases, as data: one row each, one fault each, run by the same harness.

``inject(rig)`` starts the fault once the VM rests in the cloud with the guest
writing and a first epoch committed (``rig.fault_begins()`` marks the moment),
and returns once the fault is over (the case's own condition: a process back, a
link healed, a held commit finished). Then the harness takes the planned way home
(``needs_recovery`` False) or waits for the automatic recovery (True).

``watch``: the components whose *failed* state in the appliance's heartbeat counts
as the fault's detection. ``undetected``: the fault stays under the timeout and
must not be reported failed at all.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from appliance.components.heartbeat import ComponentReport, Liveness
from appliance.components.onprem import CommitStep
from appliance.components.orders import ComponentId
from tests.faults import scale
from tests.faults.harness import Environment, Rig, recovered_home
from tests.faults.runtime import RELEASE, held_stream, hold_key, release_key
from tests.integration.tbc_helpers import CACHE, ONPREM, read_onprem

Inject = Callable[[Rig], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class FaultCase:
    name: str
    fault: str
    inject: Inject
    watch: tuple[str, ...]
    environment: Environment = Environment()  # noqa: RUF009 - frozen: one shared default is safe
    needs_recovery: bool = False
    undetected: bool = False


async def _fresh_beat(rig: Rig, pid: int, instance: ComponentId = CACHE) -> None:
    """Until ``pid`` beats again (after a SIGCONT): a beat newer than the last one seen."""
    seen = (await rig.report(instance)).sequence

    def fresh(report: ComponentReport) -> bool:
        return report.liveness is Liveness.OK and report.pid == pid and report.sequence > seen

    await rig.wait_component(instance, fresh)


# -- sub-timeout faults: repaired in place, the VM stays in the cloud ------------------------------


async def cache_sigkill_restarted(rig: Rig) -> None:
    pid = await rig.pid(CACHE)
    os.kill(pid, signal.SIGKILL)
    rig.fault_begins()
    await rig.serving_again(CACHE, not_pids={pid})  # the supervisor's restart


async def onprem_killed_mid_commit(rig: Rig) -> None:
    """The I/O manager held mid-commit (the commit record durable, the staged layer prepared
    but not yet linked into the disk), then killed; the supervisor restarts it, the
    journal's replay links the epoch whole."""
    prefix = rig.harness.prefix
    await rig.store.redis.set(hold_key(prefix), CommitStep.LAYER_PREPARED.value)
    pending = rig.sync_soon()  # an epoch of the guest's writes, committed on-prem
    fields = await _held(rig)
    pid = int(fields[b"pid"])
    rig.measures.notes.append(
        f"held at {fields[b'step'].decode()} of epoch {fields[b'epoch'].decode()}"
    )
    os.kill(pid, signal.SIGKILL)
    rig.fault_begins()
    await rig.serving_again(ONPREM, not_pids={pid})
    await pending  # the sync whose commit was cut short: answered after the replay


async def _held(rig: Rig) -> dict[bytes, bytes]:
    """The I/O manager's word that it holds a commit (a blocking read of its stream)."""
    stream = held_stream(rig.harness.prefix)
    async with asyncio.timeout(scale.WAIT_S):
        while True:
            rows: Any = await rig.store.redis.xread({stream: "0"}, block=1000)
            for _, entries in rows or []:
                for _, fields in entries:
                    return dict(fields)


def sigstop_under_timeout(instance: ComponentId) -> Inject:
    async def inject(rig: Rig) -> None:
        pid = await rig.pid(instance)
        os.kill(pid, signal.SIGSTOP)
        rig.fault_begins()
        try:
            await rig.hold(0.6 * scale.PRODUCTION_COMPONENT_TIMEOUT_S)  # 72 s of 120 s
        finally:
            os.kill(pid, signal.SIGCONT)
        await _fresh_beat(rig, pid, instance)

    return inject


async def wan_blackhole_short(rig: Rig) -> None:
    """Half the WAN threshold (150 s of 300 s): past the component timeout, so the link is
    reported down, but short of the threshold: retried, no VM goes home."""
    wan = rig.wan
    assert wan is not None
    await wan.blackhole()
    rig.fault_begins()
    pending = rig.sync_soon()  # its epoch waits for the link
    try:
        await rig.hold(0.5 * scale.PRODUCTION_WAN_THRESHOLD_S)
    finally:
        await wan.heal()
    await pending


async def wan_resets_mid_chunk(rig: Rig) -> None:
    """Three resets, each 40 KiB into a connection's bytes towards on-prem (inside a 64 KiB
    chunk of an epoch being shipped); the link then heals by itself."""
    wan = rig.wan
    assert wan is not None
    wan.reset_mid_chunk(after=40 * 1024, times=3)
    rig.fault_begins()
    pending = rig.sync_soon()
    async with asyncio.timeout(scale.WAIT_S):
        await wan.reset_done.wait()
    await pending
    rig.measures.notes.append(f"{wan.resets} resets mid-chunk")


async def wan_latency(rig: Rig) -> None:
    """200 ms ± 100 ms each way: the guest writes on, an epoch ships and commits through it."""
    wan = rig.wan
    assert wan is not None
    wan.latency(0.2, 0.1)
    rig.fault_begins()
    try:
        await rig.g.wait_writes(30, within_s=scale.WAIT_S)
        started = time.monotonic()
        await rig.sync()
        rig.measures.notes.append(f"sync over the slow link {time.monotonic() - started:.2f} s")
    finally:
        await wan.heal()


def redis_stopped(production_s: float) -> Inject:
    async def inject(rig: Rig) -> None:
        redis = rig.redis
        assert redis is not None
        await redis.stop()  # SIGTERM: the append-only file is kept
        rig.fault_begins()
        port = _hold_port(redis.port)  # down, its port kept from other sockets meanwhile
        pending = rig.sync_soon()  # asked while it is down: taken once it is back
        try:
            await rig.hold(production_s)
        finally:
            port.close()
            await redis.start()
        await pending

    return inject


def _hold_port(port: int) -> socket.socket:
    """A socket bound to ``port`` (not listening: connects are refused), so that no
    outgoing connection takes it as its local port while its server is down."""
    holder = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    holder.bind(("127.0.0.1", port))
    return holder


async def cache_disk_full(rig: Rig) -> None:
    """Back-pressure, then a clear failure, nothing lost. An epoch's commit is held on-prem
    (after its verification; reads are still served), so no epoch commits: the guest's
    dirty data fills the cache (3 MiB here) up to its dirty limit and its writes wait
    (back-pressure, no error). The cache's data directory (a 16 MiB tmpfs) is then filled
    up by ballast and the commit let go: commits free room, the guest writes on, and the
    cache's disk has none: the guest gets a clear error (ENOSPC); space freed, it goes on
    (its failed write sent again). Nothing acknowledged and flushed is lost."""
    prefix = rig.harness.prefix
    ballast = rig.harness.data_dir / "components" / "cache" / "cache-1" / "ballast"
    rig.guest_resumes = asyncio.Event()
    await rig.store.redis.set(hold_key(prefix), CommitStep.VERIFIED.value + RELEASE)
    pending = rig.sync_soon()
    await _held(rig)
    rig.fault_begins()
    try:
        full = await rig.wait_component(CACHE, _at_dirty_limit)
        dirty, capacity = full.figures["dirty_bytes"], full.figures["capacity_bytes"]
        rig.measures.notes.append(
            f"back-pressure: {dirty} of {capacity} bytes dirty, "
            f"the guest held at write {rig.g.last_sequence} with no error"
        )
        assert not rig.g.disk.errors
        await asyncio.to_thread(_fill, ballast)
    finally:
        await rig.store.redis.rpush(release_key(prefix), "go")
    try:
        error = await rig.g.wait_error(within_s=scale.WAIT_S)
        rig.measures.detected_at = error.at
        rig.measures.notes.append(f"then the guest saw: {error.error[:110]}")
    finally:
        ballast.unlink(missing_ok=True)
        rig.guest_resumes.set()
    rig.guest_resumes = None
    await pending


def _at_dirty_limit(report: ComponentReport) -> bool:
    """Dirty data at the cache's dirty limit (90% of its slots): writers wait for room."""
    capacity = int(report.figures.get("capacity_bytes", 0) or 0)
    return capacity > 0 and int(report.figures.get("dirty_bytes", 0)) >= 0.85 * capacity


def _fill(path: Path) -> None:
    """Write until the file system is full, to the last page."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        for size in (1 << 20, 64 << 10, 4 << 10, 512):
            block = b"\xff" * size
            try:
                while True:
                    os.write(fd, block)
            except OSError:
                continue
        os.fsync(fd)
    finally:
        os.close(fd)


async def second_failure_during_repair(rig: Rig) -> None:
    """The cache killed; its restarted process killed again as soon as it beats (before it
    serves the disk again); the third one repairs."""
    first = await rig.pid(CACHE)
    os.kill(first, signal.SIGKILL)
    rig.fault_begins()
    second = await rig.pid_other_than(CACHE, {first})
    os.kill(second, signal.SIGKILL)
    rig.measures.notes.append("killed again during its restart")
    await rig.serving_again(CACHE, not_pids={first, second})


# -- faults past the timeout: the VMs go home by themselves (automatic recovery) -------------------


async def cache_killed_data_lost(rig: Rig) -> None:
    pid = await rig.pid(CACHE)
    os.kill(pid, signal.SIGSTOP)  # held while its directory goes: the next process finds none
    shutil.rmtree(rig.harness.data_dir / "components" / "cache" / "cache-1", ignore_errors=True)
    os.kill(pid, signal.SIGKILL)
    rig.fault_begins()
    await recovered_home(rig)


async def sigstop_cache_over_timeout_repaired(rig: Rig) -> None:
    """Paused past the timeout: the repair kills the hung process and starts it again on its
    data directory; it comes back with its dirty data and nothing goes home."""
    pid = await rig.pid(CACHE)
    os.kill(pid, signal.SIGSTOP)
    rig.fault_begins()
    try:
        await rig.serving_again(CACHE, not_pids={pid})
    finally:
        _resume(pid)


async def sigstop_cache_over_timeout(rig: Rig) -> None:
    """Paused past the timeout with no repair possible (``component_repair`` off, as for a
    remote cache whose host cannot be reached); resumed after its VM went home: it writes
    nothing on-prem."""
    pid = await rig.pid(CACHE)
    os.kill(pid, signal.SIGSTOP)
    rig.fault_begins()
    try:
        await recovered_home(rig)
        image = await read_onprem(rig.harness.data_dir, rig.vm_id, "disk-0")
    finally:
        _resume(pid)
    if _alive(pid):
        await _fresh_beat(rig, pid)
        await _fresh_beat(rig, pid)  # its shipper has had its retries: refused (stale token)
    assert await read_onprem(rig.harness.data_dir, rig.vm_id, "disk-0") == image


def _resume(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGCONT)
    except ProcessLookupError:
        pass


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


async def wan_blackhole_long(rig: Rig) -> None:
    """One and a half times the WAN threshold (450 s of 300 s); the VM goes home once the
    link is back."""
    wan = rig.wan
    assert wan is not None
    await wan.blackhole()
    rig.fault_begins()
    try:
        await rig.hold(1.5 * scale.PRODUCTION_WAN_THRESHOLD_S)
    finally:
        await wan.heal()
    await recovered_home(rig)


# -- the table -------------------------------------------------------------------------------------

WAN = Environment(wan=True)
OWN_REDIS = Environment(own_redis=True)
CASES: tuple[FaultCase, ...] = (
    FaultCase(
        "cache_sigkill_restarted",
        "cache SIGKILLed, restarted by the supervisor within the timeout",
        cache_sigkill_restarted,
        (str(CACHE),),
    ),
    FaultCase(
        "onprem_killed_mid_commit",
        "I/O manager SIGKILLed mid-commit (recorded, not yet linked)",
        onprem_killed_mid_commit,
        (str(ONPREM),),
    ),
    FaultCase(
        "sigstop_cache_under_timeout",
        "cache SIGSTOPped for 0.6 x the timeout",
        sigstop_under_timeout(CACHE),
        (str(CACHE),),
        undetected=True,
    ),
    FaultCase(
        "sigstop_onprem_under_timeout",
        "I/O manager SIGSTOPped for 0.6 x the timeout",
        sigstop_under_timeout(ONPREM),
        (str(ONPREM),),
        undetected=True,
    ),
    FaultCase(
        "wan_blackhole_short",
        "WAN blackhole for 0.5 x the WAN threshold",
        wan_blackhole_short,
        ("wan_link",),
        WAN,
    ),
    FaultCase(
        "wan_resets_mid_chunk",
        "WAN resets 40 KiB into an epoch's chunks, 3 times",
        wan_resets_mid_chunk,
        ("wan_link",),
        WAN,
    ),
    FaultCase(
        "wan_latency_200ms",
        "WAN latency 200 ms +- 100 ms each way",
        wan_latency,
        ("wan_link",),
        WAN,
    ),
    FaultCase(
        "redis_stopped_10s",
        "Redis stopped for 10 s (scaled) mid-epoch",
        redis_stopped(10.0),
        ("state_store",),
        OWN_REDIS,
    ),
    FaultCase(
        "redis_stopped_60s",
        "Redis stopped for 60 s (scaled) mid-epoch",
        redis_stopped(60.0),
        ("state_store",),
        OWN_REDIS,
    ),
    FaultCase(
        "cache_disk_full",
        "commits held to the cache's dirty limit, then the cache's disk (tmpfs) full",
        cache_disk_full,
        (str(CACHE),),
        Environment(cache_tmpfs_mib=16, component_env=(("FERRY_CACHE_SCALE", str(1 / 1024)),)),
    ),
    FaultCase(
        "second_failure_during_repair",
        "cache SIGKILLed, then its restarted process SIGKILLed again",
        second_failure_during_repair,
        (str(CACHE),),
    ),
    FaultCase(
        "cache_killed_data_lost",
        "cache SIGKILLed and its data directory removed",
        cache_killed_data_lost,
        (str(CACHE),),
        needs_recovery=True,
    ),
    FaultCase(
        "sigstop_cache_over_timeout_repaired",
        "cache SIGSTOPped past the timeout: killed and restarted by the repair",
        sigstop_cache_over_timeout_repaired,
        (str(CACHE),),
    ),
    FaultCase(
        "sigstop_cache_over_timeout",
        "cache SIGSTOPped past the timeout, not repairable, resumed after its VM went home",
        sigstop_cache_over_timeout,
        (str(CACHE),),
        Environment(settings=(("component_repair", False),)),
        needs_recovery=True,
    ),
    FaultCase(
        "wan_blackhole_long",
        "WAN blackhole for 1.5 x the WAN threshold",
        wan_blackhole_long,
        ("wan_link",),
        WAN,
        needs_recovery=True,
    ),
)
