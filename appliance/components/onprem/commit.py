"""Committing one flush epoch to a disk, in an order a crash cannot break.

The steps, each finished (and durable where it says so) before the next:

1. *verify*: nothing landed outside the manifest; every entry's staged
   bytes hash to the entry's hash (``CommitStep.VERIFIED``);
2. *staging durable*: fdatasync the staged data, fsync its landing records
   (``STAGING_DURABLE``);
3. *commit record* appended to the disk's journal and fsynced
   (``COMMIT_RECORDED``): from here on the epoch *is* committed;
4. *apply*: every entry copied from the staging file to the disk's current
   layer (all-zero entries as zeroes), then the disk flushed
   (``PARTLY_APPLIED`` half-way, when a hook is set; ``APPLIED``);
5. *applied record* appended and fsynced (``APPLIED_RECORDED``);
6. the staging area dropped (``STAGING_DROPPED``).

A crash before 3 leaves the epoch uncommitted: its staging is discarded on
the next open and the disk was never touched. A crash after 3 leaves it
committed: the next open applies it again from the staging area, which is
kept until 5 is durable; applying writes every entry's full content, so
doing it twice is doing it once. Either way the disk ends with epoch N
wholly applied or not at all.

A :data:`CommitHook` is called after each step; tests use it to stop a
commit there (raise, or block while the process is killed).
"""

from __future__ import annotations

import asyncio
import enum
from collections.abc import Awaitable, Callable, Sequence

from appliance.components.onprem.manifest import EpochManifest, ManifestEntry
from appliance.components.onprem.staging import StagingBackend
from appliance.storage.hashing import chunk_hash, zero_hash
from appliance.storage.layered import LayeredDisk

APPLY_PIECE = 4 << 20
"""Entries up to this size are read, checked and written at once; larger ones in pieces."""
DEFAULT_APPLY_CONCURRENCY = 4


class CommitStep(enum.StrEnum):
    VERIFIED = "verified"
    STAGING_DURABLE = "staging_durable"
    COMMIT_RECORDED = "commit_recorded"
    PARTLY_APPLIED = "partly_applied"
    APPLIED = "applied"
    APPLIED_RECORDED = "applied_recorded"
    STAGING_DROPPED = "staging_dropped"


CommitHook = Callable[[str, int, CommitStep], Awaitable[None]]
"""Called with (disk_id, epoch, step) after each step of a commit."""


class StagedDamage(Exception):
    """A committed epoch's staged bytes no longer hash to its manifest (internal)."""

    def __init__(self, entry: ManifestEntry) -> None:
        super().__init__(f"staged bytes at {entry.offset}+{entry.length} changed after commit")
        self.entry = entry


async def _apply_entry(disk: LayeredDisk, staging: StagingBackend, entry: ManifestEntry) -> None:
    view = disk.active()
    if entry.hash == zero_hash(entry.length):
        await view.zero(entry.offset, entry.length, punch_hole=True)
        return
    if entry.length <= APPLY_PIECE:
        data = bytearray(entry.length)
        await staging.read_into(entry.offset, data)
        if chunk_hash(data) != entry.hash:
            raise StagedDamage(entry)
        await view.write(entry.offset, memoryview(data))
        return
    if await staging.entry_hash(entry) != entry.hash:
        raise StagedDamage(entry)
    for pos in range(entry.offset, entry.end, APPLY_PIECE):
        piece = bytearray(min(APPLY_PIECE, entry.end - pos))
        await staging.read_into(pos, piece)
        await view.write(pos, memoryview(piece))


async def apply_entries(
    disk: LayeredDisk,
    staging: StagingBackend,
    entries: Sequence[ManifestEntry],
    concurrency: int = DEFAULT_APPLY_CONCURRENCY,
) -> None:
    """Copy ``entries`` from the staging file to the disk, ``concurrency`` at a time."""
    slots = asyncio.Semaphore(concurrency)

    async def one(entry: ManifestEntry) -> None:
        async with slots:
            await _apply_entry(disk, staging, entry)

    async with asyncio.TaskGroup() as group:
        for entry in entries:
            group.create_task(one(entry))


async def apply_epoch(
    disk: LayeredDisk,
    staging: StagingBackend | None,
    manifest: EpochManifest,
    checkpoint: Callable[[CommitStep], Awaitable[None]] | None = None,
    concurrency: int = DEFAULT_APPLY_CONCURRENCY,
) -> None:
    """Step 4: the whole epoch written to the disk's current layer and flushed.

    With a ``checkpoint``, the first half is applied and flushed before it is
    called with ``PARTLY_APPLIED``: a crash there leaves a disk that is
    neither before nor after the epoch, which recovery must repair.
    """
    entries = manifest.entries
    if entries and staging is None:
        raise ValueError("an epoch with entries needs its staging area")
    if staging is not None:
        if checkpoint is not None:
            half = len(entries) // 2
            await apply_entries(disk, staging, entries[:half], concurrency)
            await disk.flush()
            await checkpoint(CommitStep.PARTLY_APPLIED)
            entries = entries[half:]
        await apply_entries(disk, staging, entries, concurrency)
    await disk.flush()
    if checkpoint is not None:
        await checkpoint(CommitStep.APPLIED)
