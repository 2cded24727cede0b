"""One bad VM never hides the others: it is skipped, reported in the response, and logged."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from appliance.dispatch.inventory import Inventory, wire_summary
from appliance.errors import UnreadableVm
from appliance.sites.lab.sample import SampleSpec, onprem_site_config, sample_vms
from appliance.sites.lab.site import LabSite
from messages.commands import InventoryFilter, SourceInventoryRequestBody
from messages.errors import ErrorCode
from messages.events import InventorySkip, SourceInventoryResponse


@pytest.fixture
async def site(tmp_path: Path) -> LabSite:
    site = await LabSite.create(tmp_path / "onprem", onprem_site_config())
    for vm in sample_vms(SampleSpec(vms=6, seed=5)):
        await site.save_vm(vm)
    return site


async def _good_names(site: LabSite) -> list[str]:
    return sorted(vm.name for vm in await site.list_vms())


def _wire_roundtrip(body: object) -> None:
    """The answer must be a message that can be put on the wire."""
    message = SourceInventoryResponse(correlation_id="c-1", body=body)  # type: ignore[arg-type]
    message.to_wire().encode("utf-8")


async def test_a_vm_with_a_ten_thousand_character_name_is_skipped_and_reported(
    site: LabSite,
) -> None:
    expected = await _good_names(site)
    first = (await site.list_vms())[0]
    await site.save_vm(replace(first, vm_id="vm-long", name="x" * 10_000))
    reports: list[tuple[str, str]] = []

    async def report(skip: InventorySkip) -> None:
        reports.append((skip.vm_id, skip.code))

    inventory = Inventory(site, 256 * 1024, on_skipped=report)

    body = await inventory.page(SourceInventoryRequestBody())

    assert sorted(vm.name for vm in body.vms) == expected
    assert body.total_count == len(expected)
    assert [(s.vm_id, s.code) for s in body.skipped] == [("vm-long", "invalid_vm")]
    assert "name" in body.skipped[0].message
    assert reports == [("vm-long", "invalid_vm")]
    _wire_roundtrip(body)


async def test_a_lone_surrogate_in_a_vm_json_breaks_no_inventory(site: LabSite) -> None:
    expected = await _good_names(site)
    first = (await site.list_vms())[0]
    path = site.vm_dir("vm-bad") / "vm.json"
    path.parent.mkdir(parents=True)
    document = json.loads((site.vm_dir(first.vm_id) / "vm.json").read_text())
    document["vm_id"] = "vm-bad"
    text = json.dumps(document).replace(json.dumps(document["name"]), '"bad-\\ud800-name"')
    path.write_text(text)
    inventory = Inventory(site, 256 * 1024)

    unfiltered = await inventory.page(SourceInventoryRequestBody())
    filtered = await inventory.page(
        SourceInventoryRequestBody(filters=InventoryFilter(name_glob=expected[0]))
    )

    assert sorted(vm.name for vm in unfiltered.vms) == expected
    assert [s.vm_id for s in unfiltered.skipped] == ["vm-bad"]
    assert [vm.name for vm in filtered.vms] == [expected[0]]
    _wire_roundtrip(unfiltered)
    _wire_roundtrip(filtered)


async def test_an_unreadable_vm_json_is_skipped_and_reported(site: LabSite) -> None:
    expected = await _good_names(site)
    path = site.vm_dir("vm-junk") / "vm.json"
    path.parent.mkdir(parents=True)
    path.write_bytes(b"\xff\xfe not json")
    body = await Inventory(site, 256 * 1024).page(SourceInventoryRequestBody())
    assert sorted(vm.name for vm in body.vms) == expected
    assert [(s.vm_id, s.code) for s in body.skipped] == [("vm-junk", "invalid_vm")]
    _wire_roundtrip(body)


async def test_skipped_vms_are_listed_on_the_first_page_only(site: LabSite) -> None:
    expected = await _good_names(site)
    first = (await site.list_vms())[0]
    await site.save_vm(replace(first, vm_id="vm-long", name="y" * 300))
    inventory = Inventory(site, 256 * 1024)
    page = await inventory.page(SourceInventoryRequestBody(page_size=2))
    assert [s.vm_id for s in page.skipped] == ["vm-long"]
    seen = [vm.name for vm in page.vms]
    while page.next_page_token is not None:
        page = await inventory.page(
            SourceInventoryRequestBody(page_size=2, page_token=page.next_page_token)
        )
        assert page.skipped == ()
        seen.extend(vm.name for vm in page.vms)
    assert seen == expected


@pytest.mark.parametrize("char", ["\u00e9", "\u4e2d", "\U0001f600"])
async def test_a_long_name_in_any_script_at_a_page_boundary_pages_on(
    site: LabSite, char: str
) -> None:
    """The page token pins the last name: it must fit the request's token limit."""
    for index, vm in enumerate(await site.list_vms()):
        await site.save_vm(replace(vm, name=char * 254 + str(index)))
    inventory = Inventory(site, 256 * 1024)
    names: list[str] = []
    token = None
    while True:
        request = SourceInventoryRequestBody.model_validate({"page_size": 1, "page_token": token})
        page = await inventory.page(request)
        names.extend(vm.name for vm in page.vms)
        token = page.next_page_token
        if token is None:
            break
    assert names == await _good_names(site)


async def test_an_unreadable_vm_asked_for_by_id_is_invalid_vm(site: LabSite) -> None:
    path = site.vm_dir("vm-junk") / "vm.json"
    path.parent.mkdir(parents=True)
    path.write_bytes(b'{"name": "bad-\\ud800"}')
    with pytest.raises(UnreadableVm) as raised:
        await site.get_vm("vm-junk")
    assert raised.value.code is ErrorCode.INVALID_VM
    assert len(await site.list_vms()) == 6


@pytest.mark.parametrize("name", ["a\ud800b", "z" * 256, "ok\udfff"])
async def test_a_described_vm_unfit_for_the_wire_is_refused_by_field(
    site: LabSite, name: str
) -> None:
    vm = replace((await site.list_vms())[0], name=name)
    assert wire_summary(vm, None) == "not fit for the wire: name"
