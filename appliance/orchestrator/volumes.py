"""What a migration's cloud volumes are called, and the check that no two migrations share one.

A warm (or tbc, which may become warm) VM's disks are copied into volumes named
after its cloud VM, as HDM names them:

* its first disk (usually its only one): ``<vm>_ARM``; its n-th disk (n from 2,
  in the VM's disk order): ``<vm>_ARM_<n>``; e.g. ``web-01_ARM``,
  ``web-01_ARM_2``. No first-disk name ends in ``_<digits>``, so the two forms
  never meet, and the names of two VMs differ when the VMs' names do.
* ``<vm>``: the cloud VM's name (the request's ``target_name``, else the VM's own)
  as it is when it is a safe name (letters, digits, ``_ . -``, starting with a
  letter or digit, at most 64 characters). Any other name is made safe: every
  other character becomes ``-``, it is cut to 55 characters and ``-`` plus 8 hex
  digits of the SHA-256 of the whole name is appended (``my vm/1`` →
  ``my-vm-1-99d63c05_ARM``), so the name stays readable and two names that differ
  keep different volumes.
* Cold migrations keep ``<migration>-<disk>``.

The components (the cloud cache, the I/O manager) know each disk by
``<migration>-<disk>`` (``DiskPlan.component_id``), and checkpoints are keyed by the
migration too: a second migration of a VM (after a migrate back) never meets
what the first left in the cache, even though its volume has the same name.

A name is checked when the request is planned: a volume of that name in the
cloud made for another migration (a finished copy, or leftovers), or planned by
another migration in progress, or by another VM of the same request, refuses
the request (``conflict``, naming the holder) rather than write over it. The
operator gives the VM another ``target_name``, or removes the old volume. One
request at a time checks its names and makes its records (:func:`naming`, a short
lease), so two requests never both find a name free; one that finds the lease
held is delivered again (``VolumeNamesBusy``, transient).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import re
from collections.abc import AsyncIterator, Sequence

from appliance.errors import Conflict, VolumeNamesBusy
from appliance.orchestrator import tags
from appliance.orchestrator.context import Deps
from appliance.orchestrator.record import load
from messages.common import MigrationType

SUFFIX = "_ARM"
NAMING = "volume-names"
"""The lease a request holds while it checks its names and makes its records."""
_SAFE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_UNSAFE_CHAR = re.compile(r"[^A-Za-z0-9_.-]")
_KEPT = 55


def volume_base(vm_name: str) -> str:
    """``vm_name`` when it is safe as it is, else a safe rendering with its hash."""
    if _SAFE.fullmatch(vm_name):
        return vm_name
    cleaned = _UNSAFE_CHAR.sub("-", vm_name).lstrip("_.-")[:_KEPT]
    digest = hashlib.sha256(vm_name.encode("utf-8", "surrogatepass")).hexdigest()[:8]
    return f"{cleaned}-{digest}" if cleaned else digest


def volume_names(vm_name: str, disks: int) -> tuple[str, ...]:
    """The volumes of a VM's ``disks`` disks, in its disk order."""
    base = f"{volume_base(vm_name)}{SUFFIX}"
    return tuple(base if n == 1 else f"{base}_{n}" for n in range(1, disks + 1))


def cold_volume(migration_id: str, disk_id: str) -> str:
    return f"{migration_id}-{disk_id}"


def component_id(migration_id: str, disk_id: str) -> str:
    """The disk's id on the components: unique per migration."""
    return f"{migration_id}-{disk_id}"


def planned_volumes(
    migration_type: MigrationType, migration_id: str, vm_name: str, disk_ids: Sequence[str]
) -> tuple[str, ...]:
    if migration_type is MigrationType.COLD:
        return tuple(cold_volume(migration_id, disk_id) for disk_id in disk_ids)
    return volume_names(vm_name, len(disk_ids))


async def _holders(deps: Deps, cloud: str) -> dict[str, str]:
    """Every volume name in use: in the cloud (by its migration tag), or planned by a
    migration in progress; the migration that holds it."""
    holders: dict[str, str] = {}
    for volume in await deps.site(cloud).list_volumes():
        holders[volume.volume_id] = volume.tag(tags.MIGRATION) or "(not made by Ferry)"
    for group_id in await deps.migrations.active_groups():
        group = await deps.migrations.group(group_id)
        if group is None:
            continue
        for stored in await deps.migrations.get_many(list(group.members)):
            record = load(stored.record)
            for disk in record.disks:
                holders.setdefault(disk.volume_id, record.migration_id)
    return holders


async def check_free(deps: Deps, cloud: str, planned: Sequence[tuple[str, str, str]]) -> None:
    """``planned``: (volume name, the migration that will make it, its VM's name). Conflict
    when a name is another migration's, or planned twice."""
    if not planned:
        return
    holders = await _holders(deps, cloud)
    for name, migration_id, vm_name in planned:
        holder = holders.setdefault(name, migration_id)
        if holder != migration_id:
            raise Conflict(
                f"cloud volume {name!r} for VM {vm_name!r} is taken by migration {holder}: "
                "give the VM another target_name, or remove that volume first"
            )


@contextlib.asynccontextmanager
async def naming(
    deps: Deps, migration_type: MigrationType, here: asyncio.Lock
) -> AsyncIterator[None]:
    """Warm and tbc: while the names are checked and the records (which then hold the
    names) are made, hold ``here`` (the handlers of this process) and the naming lease
    (other appliances; it is this appliance's, so it does not part this process's
    handlers); VolumeNamesBusy when another appliance holds it."""
    if migration_type is MigrationType.COLD:  # its names carry the migration id
        yield
        return
    async with here:
        lease = await deps.leases.acquire(NAMING)
        if lease is None:
            raise VolumeNamesBusy(await deps.leases.holder(NAMING))
        try:
            yield
        finally:
            await deps.leases.release(lease)
