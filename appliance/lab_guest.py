"""A stand-in guest for a lab VM running in the cloud, and the check of what it wrote.

``ferry-appliance lab guest --vm NAME`` finds the cloud VM's disk in the lab
cloud site (a try-before-commit VM's disk is the cache's NBD export) and runs
the workload generator on it, flushing like a guest's fsync, with its durable
write log. ``ferry-appliance lab check --vm NAME --log LOG`` reads the on-prem
VM's disk afterwards and says whether it holds the last write the log records
for every byte the guest wrote: what a migrate back must bring home.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from appliance.datapath.nbd.backend import NbdBackend
from appliance.datapath.nbd.channel import TcpAddress
from appliance.errors import NotConfigured
from appliance.sites.lab.site import LabSite
from appliance.sites.lab.workload import (
    GuestWorkload,
    WorkloadSpec,
    WriteLog,
    read_write_log,
    verify,
)


@dataclass(frozen=True, slots=True)
class GuestRun:
    writes: int
    flushes: int
    bytes_written: int
    export: str


@dataclass(frozen=True, slots=True)
class GuestCheck:
    writes: int
    mismatches: int
    first_offset: int | None


async def _cloud_disk(site_root: Path, vm_name: str, disk_id: str) -> str:
    cloud = LabSite.open(site_root)
    try:
        vm = await cloud.find_vm_by_name(vm_name)
    finally:
        await cloud.close()
    for disk in vm.disks:
        if disk.disk_id == disk_id and disk.nbd_export:
            return disk.nbd_export
    raise NotConfigured("--vm", f"cloud VM {vm_name!r} has no disk {disk_id} on an NBD export")


async def run_guest(
    data_dir: Path, vm_name: str, log_path: Path, *, seconds: float, seed: int, disk_id: str
) -> GuestRun:
    """Write to the cloud VM's disk for ``seconds``, flushing every 8 writes."""
    url = await _cloud_disk(data_dir / "sites" / "cloud", vm_name, disk_id)
    parsed = urlparse(url)
    if parsed.hostname is None or parsed.port is None:
        raise NotConfigured("--vm", f"unusable NBD address {url!r}")
    export = parsed.path.lstrip("/")
    backend = await NbdBackend.connect(TcpAddress(parsed.hostname, parsed.port), export)
    try:
        log = await WriteLog.create(log_path, seed=seed, disk_size=backend.size, batch=16)
        workload = GuestWorkload(backend, WorkloadSpec(seed=seed, max_length=256 * 1024), log)
        await workload.run(duration=seconds, rate=200, flush_every=8)
        await workload.flush()
        await log.close()
    finally:
        await backend.close()
    stats = workload.stats()
    return GuestRun(stats.writes, stats.flushes, stats.bytes_written, url)


async def check_onprem(data_dir: Path, vm_name: str, log_path: Path, disk_id: str) -> GuestCheck:
    """Does the on-prem VM's disk hold every write of the log (the last one per byte)?"""
    onprem = LabSite.open(data_dir / "sites" / "onprem")
    try:
        vm = await onprem.find_vm_by_name(vm_name)
        log = await read_write_log(log_path)
        mismatches = await verify(await onprem.open_disk(vm.vm_id, disk_id), log)
    finally:
        await onprem.close()
    first = mismatches[0].first_difference if mismatches else None
    return GuestCheck(len(log.writes), len(mismatches), first)
