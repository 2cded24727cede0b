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

Progress: the export's and the import's, as the data path measures them (percent,
bytes, rate, ETA); between them, while the package travels, 100 % of the export at
rate 0. Tests only: the hold ``export`` (``holds.py``) stops the export once its first
``HELD_AFTER`` chunks are stored, so a crash test kills it there.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from functools import partial
from typing import Any

from appliance.datapath.checkpoint import CheckpointStore
from appliance.datapath.package import (
    MANIFEST_NAME,
    ExportDisk,
    ExportOptions,
    ImportOptions,
    PackageStore,
    export_package,
    import_package,
    open_store,
)
from appliance.datapath.progress import TransferProgress
from appliance.errors import PackageLocationInvalid, PackageNeedsCorrection
from appliance.logs import get_logger
from appliance.orchestrator import holds, tags
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


HELD_AFTER = 2
"""Tests only (the hold ``export``): chunks stored before the export holds."""


class _HeldStore:
    """Tests only: a package store that stores the first ``after`` chunks, then holds every
    other write at the hold ``export`` (once they are durable) until it is let go."""

    def __init__(
        self, store: PackageStore, after: int, held: Callable[[], Awaitable[None]]
    ) -> None:
        self._store = store
        self._after = after
        self._held = held
        self._started = 0
        self._stored = 0
        self._first = asyncio.Event()  # the first ``after`` chunks are stored
        self._gone_on = asyncio.Lock()  # one holder; the others wait behind it
        self._released = False

    @property
    def location(self) -> str:
        return self._store.location

    async def list(self) -> dict[str, int]:
        return await self._store.list()

    async def get(self, name: str) -> bytes | None:
        return await self._store.get(name)

    async def sync(self) -> None:
        await self._store.sync()

    async def put(self, name: str, data: bytes | memoryview) -> None:
        self._started += 1
        if self._started <= self._after and name != MANIFEST_NAME:
            await self._store.put(name, data)
            self._stored += 1
            if self._stored == self._after:
                self._first.set()
            return
        if name != MANIFEST_NAME:  # a package with fewer chunks holds at its manifest
            await self._first.wait()
        async with self._gone_on:
            if not self._released:
                await self._store.sync()
                await self._held()
                self._released = True
        await self._store.put(name, data)


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
        if holds.holding(deps, holds.EXPORT):
            store = _HeldStore(store, HELD_AFTER, partial(holds.hold, deps, record, holds.EXPORT))
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
        record,
        extra=extra,
        bytes_done=total,
        bytes_total=total,
        rate_bytes_per_s=0.0,  # nothing moves while the package travels
        eta_seconds=0.0,
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
        rate_bytes_per_s=0.0,
        eta_seconds=0.0,
    )
    return record, True


def _checkpoints(journal: Journal, record: MigrationRecord) -> Callable[[str], CheckpointStore]:
    def for_disk(disk_id: str) -> CheckpointStore:
        return journal.checkpoints(f"{record.migration_id}/import/{disk_id}")

    return for_disk
