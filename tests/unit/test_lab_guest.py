"""``ferry-appliance lab check``: the demo's proof that a migrate back lost nothing."""

from __future__ import annotations

from pathlib import Path

from appliance.lab_guest import check_onprem
from appliance.sites.lab.site import LabSite
from appliance.sites.lab.workload import GuestWorkload, WorkloadSpec, WriteLog
from appliance.storage.file import FileBackend
from tests.support.lab import MIB, build_lab, lab_vm


async def _guest_log(path: Path, size: int) -> WriteLog:
    return await WriteLog.create(path, seed=3, disk_size=size, batch=4)


async def test_check_names_a_disk_missing_the_guest_s_writes_and_passes_one_holding_them(
    tmp_path: Path,
) -> None:
    vm = lab_vm(1, disks=1, disk_size=2 * MIB)
    await build_lab(tmp_path, [vm])
    log_path = tmp_path / "guest.log"

    # The guest's writes went to another disk: the on-prem one does not hold them.
    other = FileBackend.create(tmp_path / "elsewhere.raw", 2 * MIB)
    log = await _guest_log(log_path, other.size)
    await GuestWorkload(other, WorkloadSpec(seed=3, max_length=64 * 1024), log).run(
        count=40, flush_every=4
    )
    await log.close()
    await other.close()
    missing = await check_onprem(tmp_path, vm.name, log_path, "disk-0")
    assert missing.mismatches > 0 and missing.first_offset is not None

    # The same writes on the on-prem disk itself: every one is found.
    site = LabSite.open(tmp_path / "sites" / "onprem")
    disk = await site.open_disk(vm.vm_id, "disk-0")
    log_path = tmp_path / "guest-on-prem.log"
    log = await _guest_log(log_path, disk.size)
    await GuestWorkload(disk, WorkloadSpec(seed=3, max_length=64 * 1024), log).run(
        count=40, flush_every=4
    )
    await log.close()
    await site.close()
    held = await check_onprem(tmp_path, vm.name, log_path, "disk-0")
    assert held.writes == missing.writes > 0  # the same seed: the same writes
    assert (held.mismatches, held.first_offset) == (0, None)
