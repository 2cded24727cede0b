"""A VM reference is an id or a name, never guessed; a name two VMs share is a request error."""

from __future__ import annotations

from dataclasses import replace

import pytest

from appliance.errors import CommandRejected
from appliance.sites.lab.site import LabSite
from messages.commands import CloneVm, MigrationSelector, SourceCloneRequest, VmRef
from messages.errors import ErrorCode
from tests.support.lab import MIB, lab_vm
from tests.unit import test_clone_requests as cr

env = cr.env  # the same fixture: a real redis-server and a real lab site


def _request(*vms: CloneVm, groups: tuple[tuple[VmRef, ...], ...] = ()) -> SourceCloneRequest:
    command = cr.clone(["vm-0004"])  # a valid body to start from
    body = command.body.model_copy(update={"vms": vms, "application_dependency": groups})
    return command.model_copy(update={"body": body})


async def _name_another_vm(env: cr.Env, vm_id: str, name: str) -> None:
    site = env.deps.site("onprem")
    assert isinstance(site, LabSite)
    await site.save_vm(replace(lab_vm(50, disks=1, disk_size=4 * MIB), vm_id=vm_id, name=name))


async def test_a_name_that_looks_like_an_id_migrates_the_vm_with_that_name(env: cr.Env) -> None:
    # vm-0001 exists (named lnx-test-01), and another VM is *named* "vm-0001".
    await _name_another_vm(env, "vm-0050", "vm-0001")
    answers = await env.clones.handle(_request(CloneVm(name="vm-0001")))
    assert [(a.body.vm_id, a.body.vm_name) for a in answers] == [("vm-0050", "vm-0001")]


async def test_an_id_migrates_the_vm_with_that_id(env: cr.Env) -> None:
    await _name_another_vm(env, "vm-0050", "vm-0001")
    answers = await env.clones.handle(_request(CloneVm(vm_id="vm-0001")))
    assert [(a.body.vm_id, a.body.vm_name) for a in answers] == [("vm-0001", "lnx-test-01")]


async def test_a_name_is_never_taken_for_an_id(env: cr.Env) -> None:
    with pytest.raises(CommandRejected) as raised:
        await env.clones.handle(_request(CloneVm(name="vm-0002")))
    assert raised.value.code is ErrorCode.UNKNOWN_VM
    assert await env.every_key() == set()


async def test_an_id_is_never_taken_for_a_name(env: cr.Env) -> None:
    with pytest.raises(CommandRejected) as raised:
        await env.clones.handle(_request(CloneVm(vm_id="lnx-test-02")))
    assert raised.value.code is ErrorCode.UNKNOWN_VM


async def test_a_name_two_vms_share_is_a_request_error_with_its_code(env: cr.Env) -> None:
    await _name_another_vm(env, "vm-0050", "lnx-test-02")
    with pytest.raises(CommandRejected) as raised:
        await env.clones.handle(_request(CloneVm(name="lnx-test-02")))
    assert raised.value.code is ErrorCode.AMBIGUOUS_VM_NAME
    assert "vm-0002" in str(raised.value) and "vm-0050" in str(raised.value)
    assert await env.every_key() == set()
    # By id, each of the two is found.
    answers = await env.clones.handle(_request(CloneVm(vm_id="vm-0050")))
    assert [a.body.vm_id for a in answers] == ["vm-0050"]


async def test_dependency_members_match_request_entries_of_the_same_kind(env: cr.Env) -> None:
    by_name = await env.clones.handle(
        _request(
            CloneVm(name="lnx-test-01"),
            CloneVm(vm_id="vm-0002"),
            groups=((VmRef(name="lnx-test-01"), VmRef(vm_id="vm-0002")),),
        )
    )
    assert len({a.body.group_id for a in by_name}) == 1


@pytest.mark.parametrize(
    "member",
    [VmRef(name="vm-0001"), VmRef(vm_id="lnx-test-01"), VmRef(vm_id="vm-0003")],
)
async def test_a_dependency_member_not_named_so_in_the_request_is_refused(
    env: cr.Env, member: VmRef
) -> None:
    # vm-0001 is in the request by id: naming it by its name (or an id as a name) is not it.
    group = ((member, VmRef(vm_id="vm-0002")),)
    request = _request(CloneVm(vm_id="vm-0001"), CloneVm(vm_id="vm-0002"), groups=group)
    with pytest.raises(CommandRejected, match="not in the request") as raised:
        await env.clones.handle(request)
    assert raised.value.code is ErrorCode.INVALID_REQUEST
    assert await env.every_key() == set()


def test_a_reference_names_exactly_one_of_id_and_name() -> None:
    with pytest.raises(ValueError, match="exactly one"):
        VmRef(vm_id="vm-0001", name="lnx-test-01")
    with pytest.raises(ValueError, match="exactly one"):
        VmRef()
    assert MigrationSelector(vms=(VmRef(name="lnx-test-01"),)).vms[0].name == "lnx-test-01"
