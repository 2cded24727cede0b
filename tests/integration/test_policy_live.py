"""SetPolicyRequest takes effect: live bandwidth caps, per-cluster concurrency, and a refusal
for what nothing acts on yet (the RTO/RPO interval). LocalStack + a real redis-server."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import pytest

from clients.client import FerryClient
from messages.commands import SetPolicyRequest, SetPolicyRequestBody
from messages.common import MigrationState, Phase
from messages.events import CommandResponse, MigrationStatus
from tests.integration.conftest import Harness, RunningAppliance
from tests.integration.migration_helpers import Follower, clone_request, start_migration
from tests.support.lab import MIB, build_lab, lab_vm

StartAppliance = Callable[..., Awaitable[RunningAppliance]]
MBPS = 125_000  # bytes per second in a megabit per second
GATE_MBPS = 0.001  # 125 B/s: a first chunk would wait over two hours: a gate the test lifts


async def set_policy(client: FerryClient, **fields: object) -> CommandResponse:
    answer = await client.request(SetPolicyRequest(body=SetPolicyRequestBody(**fields)))  # type: ignore[arg-type]
    assert isinstance(answer, CommandResponse) and answer.body.accepted
    return answer


def transferring_at(cap_bps: float) -> Callable[[dict[str, MigrationStatus]], bool]:
    def seen(latest: dict[str, MigrationStatus]) -> bool:
        return any(
            s.phase is Phase.TRANSFER and s.bandwidth_cap_bps == pytest.approx(cap_bps)
            for s in latest.values()
        )

    return seen


async def test_a_bandwidth_cap_set_by_policy_reaches_a_running_transfer(
    harness: Harness, start_appliance: StartAppliance
) -> None:
    vm = lab_vm(1, disks=1, disk_size=16 * MIB)  # cluster-a
    await build_lab(harness.data_dir, [vm])
    running = await start_appliance(harness.settings(progress_interval_s=0.2))
    async with FerryClient(harness.client_settings()) as client:
        # The default policy is lower than the request's cap: the lower one holds.
        await set_policy(client, bandwidth_cap_mbps=0.8)
        request = clone_request(client, [vm.vm_id], bandwidth_mbps=40)
        follower = await start_migration(client, request)
        await follower.until(transferring_at(0.8 * MBPS))
        # Another cluster's policy does not apply; the VM's own cluster's overrides the default.
        await set_policy(client, cluster="cluster-b", bandwidth_cap_mbps=0.4)
        await set_policy(client, cluster="cluster-a", bandwidth_cap_mbps=1.6)
        await follower.until(transferring_at(1.6 * MBPS))
        # A policy above the request's cap leaves the request's: the lower of the two.
        await set_policy(client, cluster="cluster-a", bandwidth_cap_mbps=1000)
        await follower.until(transferring_at(40 * MBPS))
        (status,) = (await follower.finished(1)).values()
    await running.shutdown()
    assert status.state is MigrationState.COMPLETED, status.error
    caps = [s.bandwidth_cap_bps for s in follower.history if s.bandwidth_cap_bps is not None]
    assert 0.4 * MBPS not in caps  # cluster-b's cap never applied
    # The caps in force, in the order they were set (each reported at least once).
    distinct = [c for i, c in enumerate(caps) if i == 0 or caps[i - 1] != c]
    assert distinct == pytest.approx([0.8 * MBPS, 1.6 * MBPS, 40 * MBPS])


async def _state_of(client: FerryClient, migration_id: str) -> MigrationState:
    statuses = (await client.status()).body.migrations
    return next(s.state for s in statuses if s.migration_id == migration_id)


async def test_a_cluster_limit_of_one_queues_the_second_migration_until_the_first_ends(
    harness: Harness, start_appliance: StartAppliance
) -> None:
    first = lab_vm(1, disks=1, disk_size=4 * MIB)  # cluster-a
    second = lab_vm(2, disks=1, disk_size=4 * MIB)  # cluster-a
    elsewhere = lab_vm(3, disks=1, disk_size=4 * MIB, cluster="cluster-b")
    await build_lab(harness.data_dir, [first, second, elsewhere])
    running = await start_appliance(harness.settings(progress_interval_s=0.2))
    async with FerryClient(harness.client_settings()) as client:
        # One at a time in cluster-a, and a cap so low it holds the first one in transfer.
        await set_policy(
            client, cluster="cluster-a", max_concurrent_migrations=1, bandwidth_cap_mbps=GATE_MBPS
        )
        one = await start_migration(client, clone_request(client, [first.vm_id]))
        await one.until(transferring_at(GATE_MBPS * MBPS))
        two = await start_migration(client, clone_request(client, [second.vm_id]))
        (two_id,) = two.latest
        assert two.latest[two_id].state is MigrationState.QUEUED
        # Another cluster is not held by cluster-a's limit.
        three = await start_migration(client, clone_request(client, [elsewhere.vm_id]))
        (done,) = (await three.finished(1)).values()
        assert done.state is MigrationState.COMPLETED, done.error
        assert await _state_of(client, two_id) is MigrationState.QUEUED
        # Lift the gate: the first finishes, then the second runs.
        await set_policy(client, cluster="cluster-a", bandwidth_cap_mbps=10_000)
        (first_done,) = (await one.finished(1)).values()
        (second_done,) = (await two.finished(1)).values()
    await running.shutdown()
    assert first_done.state is second_done.state is MigrationState.COMPLETED
    started = _first_not_queued(two)
    assert started.updated_at >= first_done.updated_at
    assert any(s.queue_position == 1 for s in two.history if s.state is MigrationState.QUEUED)


def _first_not_queued(follower: Follower) -> MigrationStatus:
    return next(s for s in follower.history if s.state is not MigrationState.QUEUED)


async def test_the_rto_rpo_interval_is_stored_for_resting_tbc_runs_to_read(
    harness: Harness, start_appliance: StartAppliance
) -> None:
    await build_lab(harness.data_dir, [])
    running = await start_appliance(harness.settings())
    async with FerryClient(harness.client_settings()) as client:
        body = SetPolicyRequestBody(rto_rpo_interval_s=600, bandwidth_cap_mbps=50)
        await client.request(SetPolicyRequest(body=body))
        policy = (await client.status()).body.policy
    await running.shutdown()
    assert policy["rto_rpo_interval_s"] == 600 and policy["bandwidth_cap_mbps"] == 50
