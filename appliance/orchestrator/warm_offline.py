"""A warm migration's offline bulk transfer (``bulk_transfer_mode: offline``).

* BULK_COPYING exports the migrate-time snapshot (read from the I/O manager's
  ``snap/<disk>`` export) as a package (``datapath/package``) at the request's location
  (a directory or ``s3://bucket/prefix``; each VM under its migration id); the
  manifest's SHA-256 is kept in the record (``extra["package_sha256"]``). A rerun
  resumes the export (chunks already there are not written again).
* AWAITING_BULK waits for a BulkMigrationDoneRequest (the ask ``bulk_done`` counts
  them; ``package_at`` is where it says the package was imported, else the export's
  location), then verifies every chunk and writes it into the volumes. A missing or
  corrupt chunk (``PackageNeedsCorrection``), or a location that names no package
  (``PackageLocationInvalid``), does not fail the VM: the record's error
  (``package_needs_correction``) names every bad chunk and the step waits for the next
  BulkMigrationDoneRequest, which reads and writes only what was missing or bad (the
  import's checkpoints). A store that cannot be reached now (``PackageStoreUnavailable``,
  transient) is retried by the run from this step.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Any

from appliance.datapath.checkpoint import CheckpointStore
from appliance.datapath.package import (
    ExportDisk,
    ExportOptions,
    ImportOptions,
    export_package,
    import_package,
    open_store,
)
from appliance.datapath.progress import TransferProgress
from appliance.errors import PackageLocationInvalid, PackageNeedsCorrection
from appliance.logs import get_logger
from appliance.orchestrator import tags
from appliance.orchestrator.context import Deps
from appliance.orchestrator.journal import Journal
from appliance.orchestrator.record import MigrationRecord
from appliance.storage.backend import Backend

log = get_logger(__name__)

ASK_BULK_DONE = "bulk_done"  # counted: each BulkMigrationDoneRequest adds one
ASK_PACKAGE_AT = "package_at"  # where the last one says the package was imported
PACKAGE_SHA256 = "package_sha256"  # extra: the exported manifest's SHA-256
BULK_DONE_HANDLED = "bulk_done_handled"  # extra: the BulkMigrationDoneRequests handled
NEEDS_CORRECTION = "package_needs_correction"  # the record's error_code while it waits


@contextlib.asynccontextmanager
async def _reporting(
    deps: Deps, journal: Journal, record: MigrationRecord
) -> AsyncIterator[Callable[[TransferProgress], None]]:
    """A progress callback whose figures are persisted and published every interval."""
    latest: list[TransferProgress] = []
    done = asyncio.Event()

    async def report() -> None:
        current = record
        while not done.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(deps.config.progress_interval_s):
                    await done.wait()
            if latest and not done.is_set():
                p = latest[-1]
                current = await journal.update(
                    current,
                    bytes_done=p.bytes_done,
                    bytes_total=p.bytes_total,
                    rate_bytes_per_s=p.rate_bytes_per_s,
                    eta_seconds=p.eta_s,
                )
                await deps.reporter.publish(current, False)

    task = asyncio.create_task(report())
    try:
        yield latest.append
    finally:
        done.set()
        await task  # not cancelled mid-command: it ends after its current report


async def export_bulk(
    deps: Deps,
    journal: Journal,
    record: MigrationRecord,
    sources: dict[str, Backend],
) -> MigrationRecord:
    """The package, exported (resumed when it was begun); its manifest hash kept."""
    if record.extra.get(PACKAGE_SHA256):
        return record
    assert record.package_location is not None  # an offline request names it (checked)
    disks = [ExportDisk(d.disk_id, sources[d.disk_id]) for d in record.disks]
    options = ExportOptions(chunk_size=record.options.chunk_size)
    async with (
        open_store(record.package_location, deps.config.package_s3) as store,
        _reporting(deps, journal, record) as progress,
    ):
        result = await export_package(
            record.migration_id, disks, store, options=options, progress=progress
        )
    log.info(
        "package exported",
        migration_id=record.migration_id,
        location=result.location,
        manifest_sha256=result.manifest_sha256,
    )
    total = sum(d.capacity_bytes for d in record.disks)
    extra = {**record.extra, PACKAGE_SHA256: result.manifest_sha256, BULK_DONE_HANDLED: 0}
    return await journal.update(
        record, extra=extra, bytes_done=total, bytes_total=total, eta_seconds=0.0
    )


async def await_bulk(deps: Deps, journal: Journal, record: MigrationRecord) -> MigrationRecord:
    """Offline: until a BulkMigrationDoneRequest's import verifies whole. Online: nothing
    to wait for (the bulk copy wrote the volumes)."""
    if not record.bulk_offline:
        return record
    while True:
        asks = await deps.migrations.asks(record.migration_id)
        asked = int(asks.get(ASK_BULK_DONE, "0"))
        if asked > int(record.extra.get(BULK_DONE_HANDLED, 0)):
            location = asks.get(ASK_PACKAGE_AT) or record.package_location or ""
            record, imported = await _import(deps, journal, record, location, asked)
            if imported:
                return record
        await deps.clock.sleep(deps.config.resting_poll_s)


async def _import(
    deps: Deps, journal: Journal, record: MigrationRecord, location: str, asked: int
) -> tuple[MigrationRecord, bool]:
    """One import of the package at ``location``; False when it needs correcting."""
    cloud = deps.site(record.target_site)
    targets: dict[str, Backend] = {}
    for disk in record.disks:
        volume_tags = {tags.MIGRATION: record.migration_id, tags.SOURCE_VM: record.vm_id}
        targets[disk.disk_id] = await cloud.create_volume(
            disk.volume_id, disk.capacity_bytes, tags=volume_tags
        )
    handled: dict[str, Any] = {**record.extra, BULK_DONE_HANDLED: asked}
    try:
        async with (
            open_store(location, deps.config.package_s3) as store,
            _reporting(deps, journal, record) as progress,
        ):
            await import_package(
                store,
                str(record.extra[PACKAGE_SHA256]),
                targets,
                checkpoints=_checkpoints(journal, record),
                options=ImportOptions(target_is_zero=True),
                progress=progress,
            )
    except (PackageNeedsCorrection, PackageLocationInvalid) as error:  # the VM waits
        log.warning("package needs correcting", migration_id=record.migration_id, error=str(error))
        record = await journal.update(
            record, extra=handled, error_code=NEEDS_CORRECTION, error_message=str(error)
        )
        await deps.reporter.publish(record, False)
        return record, False
    log.info("package imported", migration_id=record.migration_id, location=location)
    record = await journal.update(
        record,
        extra=handled,
        error_code=None,
        error_message=None,
        bytes_done=record.bytes_total,
        eta_seconds=0.0,
    )
    return record, True


def _checkpoints(journal: Journal, record: MigrationRecord) -> Callable[[str], CheckpointStore]:
    def for_disk(disk_id: str) -> CheckpointStore:
        return journal.checkpoints(f"{record.migration_id}/import/{disk_id}")

    return for_disk
