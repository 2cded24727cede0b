"""Leftovers are found on the sites by their tags: undone before the cut-over, finished after
it, and a finished copy is never removed."""

from __future__ import annotations

from dataclasses import replace

import pytest

from appliance.datapath.nbd.channel import NbdAddress
from appliance.orchestrator import tags
from appliance.orchestrator.leftovers import Leftovers, ResetCleanup
from appliance.sites.model import DiskConfig
from messages.common import MigrationState, PowerState
from messages.events import SourceCloneResponse
from tests.support.lab import MIB
from tests.unit import test_clone_requests as cr

env = cr.env  # the same fixture: a real redis-server and real lab sites


class Exports:
    """The cloud's NBD exports, recorded."""

    def __init__(self) -> None:
        self.unexported: list[str] = []

    async def export(self, volume_id: str) -> tuple[NbdAddress, str]:
        raise AssertionError("cleanup exports nothing")

    async def unexport(self, volume_id: str) -> None:
        self.unexported.append(volume_id)


async def _tagged_source(env: cr.Env, migration_id: str, *, stage: str | None) -> None:
    onprem = env.deps.site("onprem")
    await onprem.tag_vm(
        "vm-0001",
        {
            tags.MIGRATION: migration_id,
            tags.PRIOR_POWER: PowerState.ON.value,
            tags.PRIOR_POOL: "Production",
            tags.STAGE: stage,
        },
    )
    await onprem.set_power("vm-0001", PowerState.OFF)


async def _cloud_copy(env: cr.Env, migration_id: str) -> None:
    cloud = env.deps.site("cloud")
    source = await env.deps.site("onprem").get_vm("vm-0001")
    volume = f"{migration_id}-disk-0"
    await cloud.create_volume(volume, 4 * MIB, tags={tags.MIGRATION: migration_id})
    vm = replace(
        source,
        vm_id=migration_id,
        disks=(DiskConfig("disk-0", "Hard disk 1", 4 * MIB, True, volume_id=volume),),
        annotations=(),
    )
    await cloud.create_vm(vm)


async def test_before_the_cut_over_everything_is_undone(env: cr.Env) -> None:
    exports = Exports()
    deps = replace(env.deps, cloud=exports)
    await _tagged_source(env, "m-before", stage=None)
    await _cloud_copy(env, "m-before")

    (undone,) = await Leftovers(deps).undo_all()

    assert undone.migration_id == "m-before" and undone.error is None
    assert "deleted cloud VM m-before" in undone.actions
    assert "powered source VM back on" in undone.actions
    assert await env.deps.site("cloud").list_vms() == []
    assert await env.deps.site("cloud").list_volumes() == []
    assert exports.unexported == ["m-before-disk-0"]
    source = await env.deps.site("onprem").get_vm("vm-0001")
    assert source.power_state is PowerState.ON and tags.pending_migration(source) is None
    assert await Leftovers(deps).undo_all() == []  # nothing left the second time


async def test_past_the_cut_over_the_finished_copy_is_kept(env: cr.Env) -> None:
    deps = replace(env.deps, cloud=Exports())
    await _tagged_source(env, "m-after", stage=tags.CUTOVER)
    await _cloud_copy(env, "m-after")

    (undone,) = await Leftovers(deps).undo_all()

    assert "kept the finished cloud copy" in undone.actions
    assert [vm.vm_id for vm in await env.deps.site("cloud").list_vms()] == ["m-after"]
    assert [v.volume_id for v in await env.deps.site("cloud").list_volumes()] == ["m-after-disk-0"]
    source = await env.deps.site("onprem").get_vm("vm-0001")
    assert source.power_state is PowerState.OFF
    assert source.resource_pool == deps.config.migrate_pool
    assert tags.pending_migration(source) is None and source.tag(tags.STAGE) is None


async def test_an_unattached_tagged_volume_no_source_names_is_removed_others_stay(
    env: cr.Env,
) -> None:
    deps = replace(env.deps, cloud=Exports())
    cloud = env.deps.site("cloud")
    await _cloud_copy(env, "m-done")  # a finished copy: attached to its cloud VM
    await cloud.create_volume("m-gone-disk-0", MIB, tags={tags.MIGRATION: "m-gone"})
    await cloud.create_volume("someone-elses", MIB)

    undone = await Leftovers(deps).undo_all()

    assert [(u.migration_id, u.actions) for u in undone] == [
        ("m-gone", ("deleted unattached cloud volume m-gone-disk-0",))
    ]
    remaining = sorted(v.volume_id for v in await cloud.list_volumes())
    assert remaining == ["m-done-disk-0", "someone-elses"]


async def _no_runs() -> None:
    return None


@pytest.mark.parametrize(
    ("stage", "state", "code"),
    [(None, MigrationState.FAILED, "state_lost"), (tags.CUTOVER, MigrationState.COMPLETED, None)],
)
async def test_a_migration_redis_lost_is_reported_to_its_requester_from_the_tags(
    env: cr.Env, stage: str | None, state: MigrationState, code: str | None
) -> None:
    deps = replace(env.deps, cloud=Exports())
    await _tagged_source(env, "m-lost", stage=stage)
    request = tags.RequestTag("req-9", "corr-9", "g-9", "cold")
    await env.deps.site("onprem").tag_vm("vm-0001", {tags.REQUEST: request.value()})
    await _cloud_copy(env, "m-lost")

    await ResetCleanup(deps, _no_runs).undo([])

    (answer,) = env.sink.events
    assert isinstance(answer, SourceCloneResponse)
    assert answer.correlation_id == "corr-9"
    assert (answer.body.migration_id, answer.body.request_id) == ("m-lost", "req-9")
    assert answer.body.state is state
    assert (answer.body.error.code if answer.body.error else None) == code
