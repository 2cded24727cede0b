"""Inventory: filters, keyset paging to the end, pages shrunk to fit, names as data."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from appliance.dispatch.inventory import Inventory
from appliance.errors import CommandRejected, UnknownVm, UnsafeName
from appliance.sites.lab.sample import SampleSpec, onprem_site_config, sample_vms
from appliance.sites.lab.site import LabSite
from appliance.sites.model import child_path
from messages.commands import InventoryFilter, SourceInventoryRequestBody
from messages.common import PowerState


@pytest.fixture
async def site(tmp_path: Path) -> LabSite:
    site = await LabSite.create(tmp_path / "onprem", onprem_site_config())
    for vm in sample_vms(SampleSpec(vms=25, seed=3)):
        await site.save_vm(vm)
    return site


async def _all_pages(inventory: Inventory, filters: InventoryFilter, size: int) -> list[str]:
    names: list[str] = []
    token = None
    pages = 0
    while True:
        body = await inventory.page(
            SourceInventoryRequestBody(filters=filters, page_size=size, page_token=token)
        )
        pages += 1
        names.extend(vm.name for vm in body.vms)
        token = body.next_page_token
        if token is None:
            assert body.total_count == len(names)
            return names
        assert pages < 100


async def test_paging_walks_every_vm_once_in_order(site: LabSite) -> None:
    inventory = Inventory(site, 256 * 1024)
    names = await _all_pages(inventory, InventoryFilter(), size=7)
    expected = sorted(vm.name for vm in await site.list_vms())
    assert names == expected


async def test_filters_by_glob_cluster_and_power(site: LabSite) -> None:
    inventory = Inventory(site, 256 * 1024)
    vms = await site.list_vms()
    filters = InventoryFilter(name_glob="lnx-*", cluster="cluster-a", power_state=PowerState.ON)
    names = await _all_pages(inventory, filters, size=4)
    expected = sorted(
        vm.name
        for vm in vms
        if vm.name.startswith("lnx-")
        and vm.cluster == "cluster-a"
        and vm.power_state is PowerState.ON
    )
    assert names == expected and names


async def test_a_vm_added_between_pages_does_not_shift_the_rest(site: LabSite) -> None:
    inventory = Inventory(site, 256 * 1024)
    first = await inventory.page(SourceInventoryRequestBody(page_size=5))
    newcomer = replace((await site.list_vms())[0], vm_id="vm-9999", name="aaa-first")
    await site.save_vm(newcomer)
    second = await inventory.page(
        SourceInventoryRequestBody(page_size=5, page_token=first.next_page_token)
    )
    assert first.vms[-1].name < second.vms[0].name
    assert "aaa-first" not in [vm.name for vm in second.vms]


async def test_a_token_for_other_filters_or_forged_is_refused(site: LabSite) -> None:
    inventory = Inventory(site, 256 * 1024)
    first = await inventory.page(SourceInventoryRequestBody(page_size=5))
    for token, filters in (
        (first.next_page_token, InventoryFilter(cluster="cluster-b")),
        ("bm90IGEgdG9rZW4", InventoryFilter()),
        ("%%%", InventoryFilter()),
    ):
        with pytest.raises(CommandRejected):
            await inventory.page(
                SourceInventoryRequestBody(page_size=5, page_token=token, filters=filters)
            )


async def test_pages_shrink_to_fit_the_message_limit_without_losing_vms(site: LabSite) -> None:
    small = Inventory(site, 6 * 1024)
    body = await small.page(SourceInventoryRequestBody(page_size=25))
    assert 0 < len(body.vms) < 25
    assert body.next_page_token is not None
    names = await _all_pages(small, InventoryFilter(), size=25)
    assert len(names) == 25


async def test_names_are_data_never_paths(site: LabSite, tmp_path: Path) -> None:
    vm = replace((await site.list_vms())[0], vm_id="vm-7777", name="../../etc/passwd\x00")
    await site.save_vm(vm)
    assert (await site.find_vm_by_name("../../etc/passwd\x00")).vm_id == "vm-7777"
    assert not (tmp_path / "etc").exists()
    for bad in ("../x", "vm/../../x", "", "VM-UPPER", "a" * 80, "x\x00y"):
        with pytest.raises(UnsafeName):
            child_path("onprem", tmp_path, bad)
    with pytest.raises(UnknownVm):
        await site.get_vm("../../etc")
    with pytest.raises(UnsafeName):
        await site.save_vm(replace(vm, vm_id="../escape"))
