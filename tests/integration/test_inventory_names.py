"""Over SQS: VMs with unfit names never hide the others; each is reported and logged."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable

from appliance.state.events import EventLog
from appliance.state.keys import Keys
from appliance.state.store import StateStore, connect
from clients.client import FerryClient
from messages.commands import InventoryFilter, SourceInventoryRequest, SourceInventoryRequestBody
from messages.events import SourceInventoryResponse
from tests.integration.conftest import Harness, RunningAppliance
from tests.support.lab import MIB, build_lab, lab_vm

StartAppliance = Callable[..., Awaitable[RunningAppliance]]


async def test_inventories_serve_the_good_vms_and_report_the_bad(
    harness: Harness, start_appliance: StartAppliance
) -> None:
    good = [lab_vm(n, disks=1, disk_size=MIB) for n in (1, 2)]
    long_name = lab_vm(3, disks=1, disk_size=MIB, name="x" * 10_000)
    await build_lab(harness.data_dir, [*good, long_name], fill=False)
    bad = harness.data_dir / "sites" / "onprem" / "vms" / "vm-0004" / "vm.json"
    bad.parent.mkdir(parents=True)
    document = json.loads(bad.parent.with_name("vm-0001").joinpath("vm.json").read_text())
    document["vm_id"] = "vm-0004"
    bad.write_text(json.dumps(document).replace('"lnx-test-01"', '"bad-\\ud800"'))
    running = await start_appliance(harness.settings())
    try:
        async with FerryClient(harness.client_settings()) as client:
            everything = await client.inventory()
            filtered = await client.inventory(InventoryFilter(name_glob="lnx-test-02"))
            answer = await client.request(SourceInventoryRequest(body=SourceInventoryRequestBody()))
    finally:
        await running.shutdown()
    assert sorted(vm.vm_id for vm in everything) == ["vm-0001", "vm-0002"]
    assert [vm.vm_id for vm in filtered] == ["vm-0002"]
    assert isinstance(answer, SourceInventoryResponse)
    assert sorted((s.vm_id, s.code) for s in answer.body.skipped) == [
        ("vm-0003", "invalid_vm"),
        ("vm-0004", "invalid_vm"),
    ]
    store = StateStore(connect(harness.redis_url), Keys(harness.prefix))
    try:
        events = await EventLog(store).read(count=1000)
    finally:
        await store.close()
    skipped = {e.fields["vm_id"] for e in events if e.kind == "inventory_vm_skipped"}
    assert skipped == {"vm-0003", "vm-0004"}
