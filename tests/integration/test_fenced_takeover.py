"""Fenced everywhere, end to end: an owner paused past its lease writes nothing when it resumes.

Two appliance processes share the queues and Redis (LocalStack + a real
redis-server). The one that drives the migration is stopped with SIGSTOP
mid-copy, once a durable checkpoint exists; the other takes the lease over;
only then is the first one resumed. Every fenced write is counted per token in
the fence hash, so "nothing the paused owner wrote after the takeover landed"
is read straight from Redis, and the disk must arrive byte for byte.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path

from appliance.state.keys import Keys
from appliance.state.store import StateStore, connect, text
from clients.client import FerryClient
from messages.common import MigrationState, Phase
from tests.integration.conftest import Harness
from tests.integration.migration_helpers import ApplianceProcess, clone_request, start_migration
from tests.support.lab import MIB, build_lab, cloud_volume, disk_digest, lab_vm, onprem_disk
from tests.support.redisfields import field_int, field_text

TTL_S = 2


async def until(check: Callable[[], Awaitable[bool]], within_s: float = 120) -> None:
    """Wait for a condition that can only be read from Redis (another process makes it)."""
    async with asyncio.timeout(within_s):
        done = await check()
        while not done:
            await asyncio.sleep(0.05)
            done = await check()


async def fence_count(store: StateStore, resource: str, field: str) -> int:
    value = await store.redis.hget(store.keys.fence(resource), field)
    return int(value or 0)


async def test_an_owner_paused_past_its_lease_writes_nothing_after_the_takeover(
    harness: Harness, tmp_path: Path
) -> None:
    vm = lab_vm(1, disks=1, disk_size=48 * MIB)
    await build_lab(harness.data_dir, [vm])
    common = {"lease_ttl_s": TTL_S, "progress_interval_s": 0.3}
    processes = {
        name: await ApplianceProcess(
            harness, tmp_path / f"{name}.log", appliance_id=name, **common
        ).start()
        for name in ("ferry-a", "ferry-b")
    }
    store = StateStore(connect(harness.redis_url), Keys(harness.prefix))
    try:
        async with FerryClient(harness.client_settings()) as client:
            request = clone_request(client, [vm.vm_id], bandwidth_mbps=24)
            follower = await start_migration(client, request)
            (started,) = (
                await follower.until(
                    lambda latest: any(
                        s.phase is Phase.TRANSFER and s.bytes_done > 0 for s in latest.values()
                    )
                )
            ).values()
            resource = f"group:{started.group_id}"
            lease_key = store.keys.lease(resource)
            checkpoint_key = store.keys.checkpoint(f"{started.migration_id}/disk-0")

            async def durable_checkpoint() -> bool:
                durable = await store.redis.hget(checkpoint_key, "durable")
                return int(durable or 0) >= 1 and await store.redis.hlen(checkpoint_key) > 3

            await until(durable_checkpoint)
            owner = await field_text(store.redis, lease_key, "owner")
            old_token = await field_int(store.redis, lease_key, "token")
            paused = owner.split("/")[0]  # "<appliance id>/<process>"
            other = next(name for name in processes if name != paused)
            processes[paused].pause()
            assert await store.redis.hget(checkpoint_key, "complete") is None  # mid-copy

            async def taken_over() -> bool:
                # A newer token was handed out: only the other appliance can have asked.
                # (It may hold the lease only for a moment: the disks are still held by
                # the paused process, so its run pauses and lets the lease go again.)
                return await fence_count(store, resource, "token") > old_token

            await until(taken_over)
            new_token = old_token + 1
            accepted_before = await fence_count(store, resource, f"accepted:{old_token}")
            processes[paused].resume()
            final = await follower.finished(1, within_s=240)
    finally:
        for process in processes.values():
            await process.stop()
    try:
        fence = {
            text(key): int(value)
            for key, value in (await store.redis.hgetall(store.keys.fence(resource))).items()
        }
    finally:
        await store.close()
    accepted_after = fence.get(f"accepted:{old_token}", 0)
    refused = fence.get(f"refused:{old_token}", 0)
    # The new owner may pause and come back (under a newer token) while the disk is let go.
    accepted_new = sum(
        count
        for field, count in fence.items()
        if field.startswith("accepted:") and int(field.split(":")[1]) >= new_token
    )

    (status,) = final.values()
    assert status.state is MigrationState.COMPLETED, status.error
    assert new_token > old_token
    # Not one write of the paused owner landed after the takeover; the new owner's did.
    assert accepted_after == accepted_before
    assert accepted_new > 0
    paused_log = (tmp_path / f"{paused}.log").read_text()
    # It did try (refused in Redis, or stopped before asking once it knew), and stopped.
    assert refused > 0 or "fenced write refused" in paused_log or "lease lost" in paused_log
    assert "lease lost" in paused_log
    # The other appliance carried on - which needs the resumed one to have let go of the
    # disks it held open - from the checkpoint made before the pause; the copy is exact.
    other_log = (tmp_path / f"{other}.log").read_text()
    assert "resumed=True" in other_log and "transfer done" in other_log
    assert "step=completed" in other_log and "step=completed" not in paused_log
    source = onprem_disk(harness.data_dir, vm.vm_id, "disk-0")
    target = cloud_volume(harness.data_dir, f"{status.migration_id}-disk-0")
    assert await disk_digest(source) == await disk_digest(target)
