"""Cloud volume names: ``<vm>_ARM`` and ``<vm>_ARM_<n>`` for warm and tbc, safe whatever the
VM is called, never another migration's (a real redis-server and a real lab site)."""

from __future__ import annotations

import asyncio

import pytest

from appliance.components.heartbeat import HeartbeatWriter
from appliance.components.orders import ComponentId
from appliance.errors import Conflict, TransientError, UnsafeName, VolumeNamesBusy
from appliance.orchestrator.requests import migration_id_for
from appliance.orchestrator.volumes import NAMING, check_free, planned_volumes, volume_names
from appliance.sites.lab.site import LabSite
from appliance.sites.model import check_volume_id
from appliance.state.leases import Leases
from messages.commands import CloneVm, SourceCloneRequest
from messages.common import MigrationType
from tests.support.lab import MIB
from tests.unit.test_clone_requests import Env, clone, env, records

__all__ = ["env"]  # the fixture


def test_the_first_disk_is_vm_arm_and_the_nth_vm_arm_n() -> None:
    assert volume_names("web-01", 1) == ("web-01_ARM",)
    assert volume_names("Web.01", 3) == ("Web.01_ARM", "Web.01_ARM_2", "Web.01_ARM_3")
    # Cold keeps one per migration and disk.
    assert planned_volumes(MigrationType.COLD, "m-1", "web", ["disk-0"]) == ("m-1-disk-0",)
    assert planned_volumes(MigrationType.WARM, "m-1", "web", ["disk-0", "disk-1"]) == (
        "web_ARM",
        "web_ARM_2",
    )


@pytest.mark.parametrize(
    "name", ["../x", "a/b", "my vm", "nul\x00byte", "", ".hidden", "é", "x" * 200, "_ARM"]
)
def test_any_vm_name_becomes_a_safe_distinct_volume_name(name: str) -> None:
    (volume,) = volume_names(name, 1)
    assert check_volume_id("cloud", volume) == volume  # a path component, never a path
    assert volume.endswith("_ARM") and "/" not in volume and len(volume) <= 80
    # Names made safe keep a hash of the whole name: two that differ stay apart.
    assert volume_names(name + "!", 1) != (volume,)


def test_two_vms_whose_names_render_alike_get_different_volumes() -> None:
    assert volume_names("my vm", 1) != volume_names("my/vm", 1)
    assert volume_names("a", 2)[1] != volume_names("a_ARM", 1)[0]


def test_a_volume_id_that_would_leave_the_volumes_directory_is_refused() -> None:
    for bad in ("../x_ARM", "a/b", ".", "..", "x" * 81, "a b"):
        with pytest.raises(UnsafeName):
            check_volume_id("cloud", bad)


async def test_a_name_held_by_another_migration_refuses_the_request(env: Env) -> None:
    """A volume of that name in the cloud (a finished copy, leftovers) or planned by a
    migration in progress is never written over: the request is refused, naming it."""
    cloud = env.deps.site("cloud")
    assert isinstance(cloud, LabSite)
    await cloud.create_volume("lnx-test-01_ARM", MIB, tags={"ferry.migration": "m-old"})
    mine = migration_id_for("req-9", "vm-0001")
    with pytest.raises(Conflict) as taken:
        await check_free(env.deps, "cloud", [("lnx-test-01_ARM", mine, "lnx-test-01")])
    assert "lnx-test-01_ARM" in str(taken.value) and "m-old" in str(taken.value)
    # Its own name (a redelivery of the request) and a free one pass.
    await check_free(env.deps, "cloud", [("lnx-test-02_ARM", mine, "lnx-test-02")])
    # Two VMs of one request with the same cloud name: refused.
    with pytest.raises(Conflict):
        await check_free(env.deps, "cloud", [("x_ARM", "m-a", "x"), ("x_ARM", "m-b", "x")])


async def test_a_migration_in_progress_holds_its_planned_names(env: Env) -> None:
    (answer,) = await env.clones.handle(clone(["vm-0003"]))  # cold: m-...-disk-0, active
    (record,) = await records(env, [answer.body.migration_id])
    planned = record.disks[0].volume_id
    assert record.disks[0].component_id == f"{record.migration_id}-disk-0"
    with pytest.raises(Conflict) as taken:
        await check_free(env.deps, "cloud", [(planned, "m-other", "lnx-test-03")])
    assert record.migration_id in str(taken.value)
    await check_free(env.deps, "cloud", [(planned, record.migration_id, "lnx-test-03")])


async def test_a_warm_request_whose_volume_is_taken_is_refused_and_locks_nothing(
    env: Env,
) -> None:
    for name in (env.deps.config.onprem_component, env.deps.config.cache_component):
        writer = HeartbeatWriter(
            env.deps.store, ComponentId.parse(name), dict, interval_s=1, ttl_s=30
        )
        await writer.beat()  # both components alive, as a warm request needs
    cloud = env.deps.site("cloud")
    await cloud.create_volume("lnx-test-02_ARM", MIB, tags={"ferry.migration": "m-done"})
    request = clone(["vm-0001", "vm-0002"], migration_type=MigrationType.WARM)
    with pytest.raises(Conflict) as taken:
        await env.clones.handle(request)
    assert "lnx-test-02_ARM" in str(taken.value) and "m-done" in str(taken.value)
    assert set((await env.locks()).values()) == {None}  # no VM stays locked
    # Under another cloud name it goes: its volumes are that name's.
    body = request.body.model_copy(
        update={"vms": (CloneVm(vm_id="vm-0002", target_name="lnx-test-02b"),)}
    )
    (answer,) = await env.clones.handle(SourceCloneRequest(body=body))
    (record,) = await records(env, [answer.body.migration_id])
    assert [d.volume_id for d in record.disks] == ["lnx-test-02b_ARM"]
    assert [d.served_as for d in record.disks] == [f"{record.migration_id}-disk-0"]


async def _components_alive(env: Env) -> None:
    for name in (env.deps.config.onprem_component, env.deps.config.cache_component):
        writer = HeartbeatWriter(
            env.deps.store, ComponentId.parse(name), dict, interval_s=1, ttl_s=30
        )
        await writer.beat()


def _named(request_id: str, vm_id: str, target_name: str) -> SourceCloneRequest:
    body = clone([vm_id], request_id=request_id, migration_type=MigrationType.WARM).body
    vms = (CloneVm(vm_id=vm_id, target_name=target_name),)
    return SourceCloneRequest(body=body.model_copy(update={"vms": vms}))


async def test_two_requests_at_once_for_one_name_one_wins(env: Env) -> None:
    """Two warm requests handled at the same moment, two VMs given one cloud name: the names
    are checked and the records made one request at a time, so exactly one is refused."""
    await _components_alive(env)
    outcomes = await asyncio.gather(
        env.clones.handle(_named("req-a", "vm-0001", "shared")),
        env.clones.handle(_named("req-b", "vm-0003", "shared")),
        return_exceptions=True,
    )
    refused = [o for o in outcomes if isinstance(o, Conflict)]
    made = [o for o in outcomes if isinstance(o, list)]
    assert len(refused) == 1 and len(made) == 1, outcomes
    assert "shared_ARM" in str(refused[0])


async def test_while_another_appliance_takes_names_the_request_comes_again(env: Env) -> None:
    await _components_alive(env)
    other = Leases(env.deps.store, "ferry-other", 15.0)
    lease = await other.acquire(NAMING)
    assert lease is not None
    with pytest.raises(VolumeNamesBusy) as busy:
        await env.clones.handle(_named("req-c", "vm-0001", "web"))
    assert busy.value.holder == "ferry-other" and isinstance(busy.value, TransientError)
    await other.release(lease)
    (answer,) = await env.clones.handle(_named("req-c", "vm-0001", "web"))  # redelivered
    (record,) = await records(env, [answer.body.migration_id])
    assert [d.volume_id for d in record.disks] == ["web_ARM", "web_ARM_2"]
