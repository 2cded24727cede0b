"""A cold migration pauses while the WAN link its copy crosses is down, and resumes after.

Over SQS, with the data path through a blackholing proxy held down past the WAN
threshold: the copy hangs (nothing refused, nothing retried), the link turns failed on
the health board, the run stops its copy and pauses (state ``paused``, the reason, its
progress kept, the heartbeat Not Ready naming the link); once the link is back it
resumes from its transfer checkpoint, not from zero, and the target equals the source.
"""

from __future__ import annotations

import pytest

from appliance.datapath.nbd.channel import NbdAddress, TcpAddress
from appliance.orchestrator.pausing import PauseEvent
from appliance.service.health import WAN_LINK
from appliance.sites.lab.site import LabSite
from appliance.state.events import EventLog
from clients.client import FerryClient
from messages.commands import (
    CancelRequest,
    CancelRequestBody,
    MigrationSelector,
    StatusRequest,
    StatusRequestBody,
)
from messages.common import MigrationState, Phase
from messages.events import ComponentState, MigrationStatus, ReadyStatus, StatusResponse
from tests.integration.conftest import Harness
from tests.integration.migration_helpers import clone_request, start_migration
from tests.integration.tbc_helpers import state_store
from tests.integration.test_bus import StartAppliance
from tests.integration.test_health import beat_until, states
from tests.support.blackhole import BlackholeProxy
from tests.support.lab import MIB, build_lab, cloud_volume, disk_digest, lab_vm, onprem_disk

pytestmark = pytest.mark.timeout(300)
THRESHOLD_S = 3.0
"""The WAN threshold here: down longer than this, the link is failed."""


class BlackholedWan:
    """The data path's WAN link: the cloud NBD server reached through a blackholing proxy."""

    def __init__(self) -> None:
        self.proxy: BlackholeProxy | None = None

    async def __call__(self, address: NbdAddress) -> NbdAddress:
        assert isinstance(address, TcpAddress)
        if self.proxy is None:
            self.proxy = BlackholeProxy(address.host, address.port)
            await self.proxy.start()
        return TcpAddress("127.0.0.1", self.proxy.port)

    async def close(self) -> None:
        if self.proxy is not None:
            await self.proxy.stop()


def copying(latest: dict[str, MigrationStatus]) -> bool:
    return any(s.phase is Phase.TRANSFER and s.bytes_done > 0 for s in latest.values())


def halfway(latest: dict[str, MigrationStatus]) -> bool:
    return any(s.phase is Phase.TRANSFER and 2 * s.bytes_done >= s.bytes_total > 0
               for s in latest.values())  # fmt: skip


def paused(latest: dict[str, MigrationStatus]) -> bool:
    return any(s.state is MigrationState.PAUSED for s in latest.values())


async def test_a_cold_copy_pauses_while_the_wan_is_down_and_resumes_from_its_checkpoint(
    harness: Harness, start_appliance: StartAppliance
) -> None:
    vm = lab_vm(1, disks=1, disk_size=32 * MIB)
    await build_lab(harness.data_dir, [vm])
    wan = BlackholedWan()
    settings = harness.settings(
        wan_down_threshold_s=THRESHOLD_S,
        component_heartbeat_interval_s=0.5,
        progress_interval_s=0.3,
    )
    running = await start_appliance(settings, wan=wan)
    try:
        async with FerryClient(harness.client_settings()) as client:
            request = clone_request(client, [vm.vm_id], bandwidth_mbps=24)
            follower = await start_migration(client, request)
            # Half-way (the checkpoint is synced every second: some of it is durable).
            await follower.until(halfway)
            proxy = wan.proxy
            assert proxy is not None
            proxy.blackhole()

            (stopped,) = (await follower.until(paused, within_s=120)).values()
            assert stopped.phase is Phase.TRANSFER and stopped.error is None
            assert stopped.pause_reason is not None
            # Failed (the copy hung), or degraded when a new connection's timeout came first.
            assert stopped.pause_reason.startswith("waiting for wan_link ")
            assert "cloud data path" in stopped.pause_reason
            assert 0 < stopped.bytes_done < stopped.bytes_total  # its progress, kept
            down = await beat_until(
                client,
                lambda b: (
                    b.body.status is ReadyStatus.NOT_READY
                    and states(b).get(WAN_LINK) is ComponentState.FAILED
                ),
            )
            assert down.body.status_details[0] == "Services not ready or down wan_link"
            # Asked later, it is still paused (it did not give up; it is not failed).
            answer = await client.request(
                StatusRequest(body=StatusRequestBody(migration_ids=(stopped.migration_id,)))
            )
            assert isinstance(answer, StatusResponse)
            (later,) = answer.body.migrations
            assert later.state is MigrationState.PAUSED and later.error is None
            assert later.pause_reason == stopped.pause_reason

            proxy.heal()
            (status,) = (await follower.finished(1, within_s=180)).values()
        assert status.state is MigrationState.COMPLETED, status.error
        assert status.bytes_done == status.bytes_total
        migration_id = status.migration_id
        async with state_store(harness) as store:
            events = await EventLog(store).read(migration_id, count=1000)
    finally:
        await running.shutdown()
        await wan.close()

    kinds = [e.kind for e in events]
    assert kinds.count(PauseEvent.PAUSED) >= 1 and kinds.count(PauseEvent.RESUMED) >= 1
    assert kinds.index(PauseEvent.PAUSED) < kinds.index(PauseEvent.RESUMED)
    assert "failed" not in [e.fields.get("step") for e in events if e.kind == "step"]
    copied = [e for e in events if e.kind == "disk_copied"]
    assert len(copied) == 1
    stats = copied[0].fields
    # Resumed from the checkpoint: what was durable before the pause is not sent again.
    assert stats["chunks_skipped"] > 0
    assert stats["bytes_written"] < stopped.bytes_total
    source = onprem_disk(harness.data_dir, vm.vm_id, "disk-0")
    target = cloud_volume(harness.data_dir, f"{migration_id}-disk-0")
    assert await disk_digest(source) == await disk_digest(target)
    paused_event = next(e for e in events if e.kind == PauseEvent.PAUSED)
    print(
        f"cold pause: paused at {paused_event.fields['bytes_done']} of {stopped.bytes_total} "
        f"bytes; after resuming, {stats['bytes_written']} written, "
        f"{stats['chunks_skipped']} chunks skipped"
    )


async def test_a_copy_whose_retries_run_out_on_a_link_still_within_its_threshold_waits(
    harness: Harness, start_appliance: StartAppliance
) -> None:
    """A link that refuses everything (every connection cut at once) for longer than the
    copy's retries last, but less than the WAN threshold: the link is degraded, not
    failed; the copy's failure is put down to it, so the run pauses instead of failing."""
    vm = lab_vm(1, disks=1, disk_size=16 * MIB)
    await build_lab(harness.data_dir, [vm])
    wan = BlackholedWan()
    settings = harness.settings(
        wan_down_threshold_s=240.0, component_heartbeat_interval_s=0.5, progress_interval_s=0.3
    )
    running = await start_appliance(settings, wan=wan)
    try:
        async with FerryClient(harness.client_settings()) as client:
            request = clone_request(client, [vm.vm_id], bandwidth_mbps=20)
            follower = await start_migration(client, request)
            await follower.until(copying)
            proxy = wan.proxy
            assert proxy is not None
            proxy.drop_every(0)
            proxy.drop_now()
            (stopped,) = (await follower.until(paused, within_s=120)).values()
            assert stopped.pause_reason is not None
            assert stopped.pause_reason.startswith("waiting for wan_link degraded:")
            beat = await beat_until(
                client, lambda b: states(b).get(WAN_LINK) is ComponentState.DEGRADED
            )
            assert beat.body.status is ReadyStatus.READY  # within the threshold: tolerated
            proxy.drop_every(None)
            (status,) = (await follower.finished(1, within_s=180)).values()
        assert status.state is MigrationState.COMPLETED, status.error
    finally:
        await running.shutdown()
        await wan.close()
    source = onprem_disk(harness.data_dir, vm.vm_id, "disk-0")
    target = cloud_volume(harness.data_dir, f"{status.migration_id}-disk-0")
    assert await disk_digest(source) == await disk_digest(target)


async def test_a_cancel_while_paused_rolls_back_and_leaves_the_source_as_it_was(
    harness: Harness, start_appliance: StartAppliance
) -> None:
    vm = lab_vm(1, disks=1, disk_size=16 * MIB)
    await build_lab(harness.data_dir, [vm])
    wan = BlackholedWan()
    settings = harness.settings(
        wan_down_threshold_s=THRESHOLD_S,
        component_heartbeat_interval_s=0.5,
        progress_interval_s=0.3,
    )
    running = await start_appliance(settings, wan=wan)
    try:
        async with FerryClient(harness.client_settings()) as client:
            follower = await start_migration(
                client, clone_request(client, [vm.vm_id], bandwidth_mbps=20)
            )
            await follower.until(copying)
            assert wan.proxy is not None
            wan.proxy.blackhole()
            (stopped,) = (await follower.until(paused, within_s=120)).values()
            selector = MigrationSelector(migration_ids=(stopped.migration_id,))
            await client.request(CancelRequest(body=CancelRequestBody(select=selector)))
            (status,) = (await follower.finished(1, within_s=120)).values()
        assert status.state is MigrationState.CANCELLED, status.error
    finally:
        await running.shutdown()
        await wan.close()
    onprem = LabSite.open(harness.data_dir / "sites" / "onprem")
    try:
        back = await onprem.get_vm(vm.vm_id)
        assert back.power_state is vm.power_state and back.resource_pool == vm.resource_pool
    finally:
        await onprem.close()
    volumes = harness.data_dir / "sites" / "cloud" / "volumes"
    assert not volumes.exists() or list(volumes.iterdir()) == []
