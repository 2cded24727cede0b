"""Reconcile passes through the control channel, with the components as real processes.

The on-prem I/O manager serves a lab disk and its migrate-time snapshot; the
snapshot is bulk-copied from its ``snap/`` export into a raw file, the cloud
volume, served over NBD by this test (as the cloud site's data plane would).
The lab's workload generator writes through the cache's export, with its
write log. The test is the control plane: it holds the lease and gives
``reconcile`` orders (``reconcile_until``, ``reconcile_pass``). ``qemu-img
compare``, an independent peer, checks the volume at the cutover.
"""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from appliance.components.cache.image import image_export
from appliance.components.cache.reconcile import VolumeTarget
from appliance.components.heartbeat import ComponentReport
from appliance.components.orders import (
    ComponentKeys,
    Order,
    OrderAction,
    OutcomeCode,
    OutcomeKind,
)
from appliance.components.reconciling import (
    ReconcileDisk,
    check_volume,
    cutover_pass,
    reconcile_order,
    reconcile_pass,
    reconcile_until,
)
from appliance.datapath.nbd import NbdBackend, nbd_url
from appliance.datapath.nbd.channel import TcpAddress
from appliance.embedded import RedisServer, free_port
from appliance.errors import CertificationFailed, ReconcileUnavailable
from appliance.sites.lab.workload import GuestWorkload, WorkloadSpec, WriteLog, read_write_log
from appliance.state.keys import Keys
from appliance.state.leases import Leases
from tests.interop.test_onprem_compare_replay import qemu_img_compare
from tests.support.components import (
    CACHE,
    ONPREM,
    WAIT_S,
    CachedDisk,
    cached_disk,
    copy_export,
    take_lease,
)
from tests.support.onprem import MIB, make_lab_disk
from tests.support.replay import replay
from tests.support.volumes import ServedVolume, served_volume

SIZE = 4 * MIB
CHUNK = 64 * 1024
DISK = "disk-1"
SPEC = WorkloadSpec(seed=29, read_ratio=0.2, max_length=192 * 1024, hot_fraction=0.2)


@dataclass
class Warm:
    cached: CachedDisk
    volume: ServedVolume
    snapshot: bytes
    workload: GuestWorkload
    log: WriteLog
    log_path: Path
    disk: ReconcileDisk

    async def expected(self) -> bytearray:
        """The snapshot with every write the guest made so far: what the cloud disk holds."""
        await self.log.sync()
        log = await read_write_log(self.log_path)
        return replay(self.snapshot, log, self.workload.stats().last_sequence)

    async def chunks_written(self, after: int, through: int) -> set[int]:
        """Chunks the writes numbered (after, through] touched."""
        await self.log.sync()
        log = await read_write_log(self.log_path)
        return {
            c
            for w in log.writes
            if after < w.sequence <= through
            for c in range(w.offset // CHUNK, (w.offset + w.length - 1) // CHUNK + 1)
        }


@asynccontextmanager
async def warm_disk(
    redis_server: RedisServer, keys: Keys, tmp_path: Path, *, fixed_cache_port: bool = False
) -> AsyncIterator[Warm]:
    snapshot_id, snapshot = await make_lab_disk(tmp_path / "lab-disk", SIZE, seed=31)
    binds = {CACHE: f"127.0.0.1:{free_port()}"} if fixed_cache_port else None
    async with cached_disk(
        redis_server,
        keys,
        tmp_path,
        disk_dir=tmp_path / "lab-disk",
        snapshot_id=snapshot_id,
        size=SIZE,
        disk_id=DISK,
        nbd_binds=binds,
    ) as cached:
        bulk = await copy_export(cached.onprem_address, f"snap/{DISK}", tmp_path / "volume.raw")
        async with (
            served_volume(bulk, None) as volume,
            await WriteLog.create(tmp_path / "writes.log", seed=SPEC.seed, disk_size=SIZE) as log,
            await NbdBackend.connect(cached.cache_address, cached.export) as vm,
        ):
            lease = cached.lease
            disk = ReconcileDisk(DISK, "m-1", lease.token, lease.resource)
            workload = GuestWorkload(vm, SPEC, log)
            yield Warm(cached, volume, snapshot, workload, log, tmp_path / "writes.log", disk)


async def test_passes_while_the_guest_writes_then_the_cutover_pass_and_checks(
    redis: aioredis.Redis, redis_server: RedisServer, keys: Keys, tmp_path: Path
) -> None:
    async with warm_disk(redis_server, keys, tmp_path) as warm:
        orders = warm.cached.pair.orders(CACHE)
        await warm.workload.run(count=40, flush_every=5)
        before = warm.workload.stats().last_sequence

        # Pass 1 is held at its first write to the volume while the guest writes on.
        volume = warm.volume.backend
        gate = volume.gate = asyncio.Event()
        first_run = asyncio.create_task(
            reconcile_until(orders, warm.disk, warm.volume.target, threshold=0, max_passes=1)
        )
        await volume.write_started.wait()
        await warm.workload.run(count=30, flush_every=5)
        during = warm.workload.stats().last_sequence
        # The pass's progress, in the heartbeat, while it is held.
        total = len(await warm.chunks_written(0, before)) * CHUNK

        def progressing(report: ComponentReport) -> bool:
            progress = report.figures.get("reconcile_progress", {})
            found = progress.get(DISK) if isinstance(progress, dict) else None
            return isinstance(found, dict) and found["pass"] == 1 and found["bytes_total"] > 0

        held = await warm.cached.pair.wait(CACHE, progressing)
        progress = held.figures["reconcile_progress"]
        assert isinstance(progress, dict)
        assert progress[DISK]["bytes_total"] == total  # no chunk is the disk's clipped last
        assert progress[DISK]["bytes_done"] < total
        gate.set()
        first = await first_run
        assert not first.converged and first.next_pass == 2
        (one,) = first.passes
        assert one.chunks == len(await warm.chunks_written(0, before))
        assert one.remainder_chunks == len(await warm.chunks_written(before, during)) > 0

        # The guest stops: the next pass copies what it wrote during pass 1, and the
        # remainder falls to nothing.
        await warm.workload.flush()
        volume.writes.clear()
        seen: list[int] = []
        second = await reconcile_until(
            orders,
            warm.disk,
            warm.volume.target,
            threshold=0,
            max_passes=3,
            first_pass=first.next_pass,
            on_pass=lambda result: seen.append(result.pass_no),
        )
        assert second.converged and seen == [2] and second.next_pass == 3
        (two,) = second.passes
        assert two.chunks == one.remainder_chunks and two.remainder_bytes == 0
        assert volume.chunks_written(CHUNK) == await warm.chunks_written(before, during)

        # Cutover: the cloud VM is off; the last pass; the whole-image check before power on.
        image = image_export(DISK)  # the cache's view, hashed where each chunk lies
        cutover = await cutover_pass(
            orders,
            warm.disk,
            warm.volume.target,
            second.next_pass,
            cache=warm.cached.cache_address,
            image=image,
        )
        assert (cutover.last.chunks, cutover.last.remainder_bytes) == (0, 0)
        assert cutover.check.equal and cutover.check.left_digest == cutover.check.right_digest
        expected = await warm.expected()
        assert warm.volume.read() == expected
        reference = tmp_path / "replay.raw"
        reference.write_bytes(expected)
        code, output = await qemu_img_compare(
            nbd_url(warm.volume.server.address, "volume"), reference
        )
        assert code == 0, output
        code, output = await qemu_img_compare(warm.cached.url, warm.volume.path)
        assert code == 0, output
        stale = tmp_path / "snapshot.raw"
        stale.write_bytes(warm.snapshot)
        code, output = await qemu_img_compare(warm.cached.url, stale)
        assert code == 1, output  # and qemu-img does see a difference where there is one

        # A volume that differs (a byte changed behind the passes' back) fails the cutover,
        # naming that byte.
        spoiled = 3 * MIB + 12345
        await warm.volume.backend.write(spoiled, bytes([expected[spoiled] ^ 0xFF]))
        with pytest.raises(CertificationFailed) as differs:
            await cutover_pass(
                orders,
                warm.disk,
                warm.volume.target,
                second.next_pass + 1,
                cache=warm.cached.cache_address,
                image=image,
            )
        assert differs.value.offset == spoiled


async def test_sigkill_of_the_cache_mid_pass_redoes_the_pass_exactly(
    redis: aioredis.Redis, redis_server: RedisServer, keys: Keys, tmp_path: Path
) -> None:
    async with warm_disk(redis_server, keys, tmp_path, fixed_cache_port=True) as warm:
        pair = warm.cached.pair
        await warm.workload.run(count=50, flush_every=5)
        await warm.workload.flush()
        written = await warm.chunks_written(0, warm.workload.stats().last_sequence)

        volume = warm.volume.backend
        gate = volume.gate = asyncio.Event()
        # One worker: the killed process has one write in flight (held), never a second,
        # so a write that starts after the kill is the restarted cache's.
        order = reconcile_order(warm.disk, warm.volume.target, 1, workers=1)
        await pair.orders(CACHE).give(order)
        await volume.write_started.wait()  # the pass is under way, its mark durable
        pid = await pair.supervisor.wait_running(CACHE, timeout_s=WAIT_S)
        os.kill(pid, signal.SIGKILL)
        await pair.supervisor.wait_running(CACHE, not_pid=pid, timeout_s=WAIT_S)
        volume.write_started.clear()
        await volume.write_started.wait()  # the restarted cache took the order up again
        gate.set()
        outcome = await pair.orders(CACHE).wait(order, WAIT_S)
        assert outcome.kind is OutcomeKind.APPLIED, outcome
        result = outcome.result
        assert result["pass"] == 1 and result["redone"] is True
        assert result["chunks"] == len(written) and result["remainder_bytes"] == 0
        await volume.settled()
        assert warm.volume.read() == await warm.expected()
        check = await check_volume(
            warm.cached.cache_address, warm.cached.export, warm.volume.target
        )
        assert check.equal, check


async def test_orders_once_each_and_fenced(
    redis: aioredis.Redis, redis_server: RedisServer, keys: Keys, tmp_path: Path
) -> None:
    async with warm_disk(redis_server, keys, tmp_path) as warm:
        pair, target = warm.cached.pair, warm.volume.target
        orders = pair.orders(CACHE)
        await warm.workload.run(count=20, flush_every=5)
        first = await reconcile_pass(orders, warm.disk, target, 1)
        landed = len(warm.volume.backend.writes)
        assert first.chunks > 0 and landed > 0

        # The same pass again, as the same order or another (fewer workers): one pass.
        await warm.workload.run(count=10, flush_every=5)
        assert not await orders.give(reconcile_order(warm.disk, target, 1))
        again = await reconcile_pass(orders, warm.disk, target, 1, workers=1)
        assert again == first and len(warm.volume.backend.writes) == landed

        # Params that name no volume, and a reconcile for on-prem: refused as invalid.
        bad = Order(
            DISK, OrderAction.RECONCILE, "m-1", warm.disk.token, warm.disk.lease, params={"pass": 2}
        )
        outcome = await orders.give_and_wait(bad, WAIT_S)
        assert (outcome.kind, outcome.code) == (OutcomeKind.REFUSED, OutcomeCode.INVALID)
        onprem = await pair.orders(ONPREM).give_and_wait(
            reconcile_order(warm.disk, target, 1), WAIT_S
        )
        assert (onprem.kind, onprem.code) == (OutcomeKind.REFUSED, OutcomeCode.INVALID)

        # A new owner's pass; then the old owner's order, written past the fencing script,
        # is refused by the cache itself and copies nothing.
        await Leases(pair.store, "ferry-a", ttl_s=300).release(warm.cached.lease)
        owner_b = await take_lease(pair.store, "ferry-b")
        assert owner_b.token > warm.disk.token
        disk_b = ReconcileDisk(DISK, "m-1", owner_b.token, owner_b.resource)
        second = await reconcile_pass(orders, disk_b, target, 2)
        assert second.chunks > 0
        await warm.workload.run(count=10, flush_every=5)
        landed = len(warm.volume.backend.writes)
        stale = reconcile_order(warm.disk, target, 3)
        component = ComponentKeys(pair.store.keys, CACHE)
        await redis.hset(component.orders, DISK, stale.to_json())
        await redis.xadd(component.order_events, {"disk": DISK})
        refused = await orders.wait(stale, WAIT_S)
        assert (refused.kind, refused.code) == (OutcomeKind.REFUSED, OutcomeCode.STALE_TOKEN)
        assert len(warm.volume.backend.writes) == landed
        third = await reconcile_pass(orders, disk_b, target, 3)
        assert third.chunks > 0 and warm.volume.read() == await warm.expected()
        # Where a workflow that lost count resumes: the heartbeat names the last pass.
        await pair.wait(CACHE, lambda r: r.figures.get("reconcile_pass") == {DISK: 3})


async def test_an_unreachable_volume_fails_a_pass_for_now_and_the_next_makes_up_for_it(
    redis: aioredis.Redis, redis_server: RedisServer, keys: Keys, tmp_path: Path
) -> None:
    async with warm_disk(redis_server, keys, tmp_path) as warm:
        orders, target = warm.cached.pair.orders(CACHE), warm.volume.target
        await warm.workload.run(count=20, flush_every=5)
        first = await reconcile_pass(orders, warm.disk, target, 1)
        before = warm.workload.stats().last_sequence
        await warm.workload.run(count=15, flush_every=5)
        await warm.workload.flush()
        nowhere = VolumeTarget(TcpAddress("127.0.0.1", free_port()), "volume")
        seen: list[int] = []
        with pytest.raises(ReconcileUnavailable) as failed:
            await reconcile_until(
                orders, warm.disk, nowhere, 0, 3, first_pass=2, on_pass=lambda r: seen.append(1)
            )
        assert failed.value.pass_no == 2 and seen == []
        warm.volume.backend.writes.clear()
        run = await reconcile_until(orders, warm.disk, target, 0, 3, first_pass=3)
        (third,) = run.passes
        missed = await warm.chunks_written(before, warm.workload.stats().last_sequence)
        assert third.chunks == len(missed) and first.chunks > 0
        assert warm.volume.backend.chunks_written(CHUNK) == missed
        assert warm.volume.read() == await warm.expected()
