"""Committing one flush epoch to a disk, in an order a crash cannot break.

The steps, each finished (and durable where it says so) before the next:

1. *verify*: nothing landed outside the manifest; every entry's staged
   bytes hash to the entry's hash, known from the hashes taken as they
   landed where those cover the entry exactly, else read back and hashed
   (``CommitStep.VERIFIED``);
2. *staging durable*: fdatasync the staged data, fsync its landing records
   (``STAGING_DURABLE``);
3. *commit record* appended to the disk's journal and fsynced
   (``COMMIT_RECORDED``): from here on the epoch *is* committed;
4. *apply*: every entry copied from the staging file to the disk's current
   layer, adjacent entries merged into runs of up to ``APPLY_PIECE`` (all-zero
   entries as zeroes); each entry's bytes are hashed again as they are read
   and written only if they still match (damage at rest after landing is
   refused here), then the disk flushed
   (``PARTLY_APPLIED`` half-way, when a hook is set; ``APPLIED``);
5. *applied record* appended and fsynced (``APPLIED_RECORDED``);
6. the staging area dropped (``STAGING_DROPPED``): renamed aside at once,
   its files removed in the background (or at the next open).

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
from appliance.components.onprem.staging import INLINE_HASH, StagingBackend
from appliance.storage.hashing import chunk_hash, zero_hash
from appliance.storage.layered import LayeredDisk

APPLY_PIECE = 4 << 20
"""Adjacent entries are read, checked and written together up to this size; a larger
entry alone, in pieces."""
DEFAULT_APPLY_CONCURRENCY = 4
FLUSH_EVERY = 64 << 20
"""The disk is flushed after about this many bytes applied (by the worker that passes it)."""


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


def apply_runs(entries: Sequence[ManifestEntry]) -> list[tuple[ManifestEntry, ...]]:
    """``entries`` grouped into runs applied as one: adjacent all-zero entries together,
    adjacent data entries together up to ``APPLY_PIECE`` bytes; a larger entry alone."""
    runs: list[list[ManifestEntry]] = []
    size = 0
    zero_run = False
    for entry in entries:
        zero = entry.hash == zero_hash(entry.length)
        joins = (
            runs
            and runs[-1][-1].end == entry.offset
            and zero == zero_run
            and (zero or size + entry.length <= APPLY_PIECE)
        )
        if joins:
            runs[-1].append(entry)
            size += entry.length
        else:
            runs.append([entry])
            size, zero_run = entry.length, zero
    return [tuple(run) for run in runs]


def _check_run(data: memoryview, run: tuple[ManifestEntry, ...]) -> ManifestEntry | None:
    """The first entry of ``run`` whose bytes in ``data`` (the run's) do not match its hash."""
    base = run[0].offset
    for entry in run:
        if chunk_hash(data[entry.offset - base : entry.end - base]) != entry.hash:
            return entry
    return None


async def _apply_run(
    disk: LayeredDisk,
    staging: StagingBackend,
    run: tuple[ManifestEntry, ...],
    buffer: bytearray,
) -> None:
    """One run read from the staging file into ``buffer``, every entry's bytes checked,
    then written."""
    view = disk.active()
    first, last = run[0], run[-1]
    length = last.end - first.offset
    if first.hash == zero_hash(first.length):
        await view.zero(first.offset, length, punch_hole=True)
        return
    if length <= APPLY_PIECE:
        data = memoryview(buffer)[:length]
        await staging.read_into(first.offset, data)
        if length > INLINE_HASH:
            wrong = await asyncio.to_thread(_check_run, data, run)
        else:
            wrong = _check_run(data, run)
        if wrong is not None:
            raise StagedDamage(wrong)
        await view.write(first.offset, data)
        return
    (entry,) = run  # only an entry larger than a piece makes a run this long
    if await staging.entry_hash(entry) != entry.hash:
        raise StagedDamage(entry)
    for pos in range(entry.offset, entry.end, APPLY_PIECE):
        piece = memoryview(buffer)[: min(APPLY_PIECE, entry.end - pos)]
        await staging.read_into(pos, piece)
        await view.write(pos, piece)


async def apply_entries(
    disk: LayeredDisk,
    staging: StagingBackend,
    entries: Sequence[ManifestEntry],
    concurrency: int = DEFAULT_APPLY_CONCURRENCY,
) -> None:
    """Copy ``entries`` from the staging file to the disk: ``concurrency`` workers, each
    applying one run at a time through a buffer of its own (reused, not reallocated)."""
    runs = iter(apply_runs(entries))
    unflushed = 0

    async def worker() -> None:
        nonlocal unflushed
        buffer = bytearray(APPLY_PIECE)
        for run in runs:
            await _apply_run(disk, staging, run, buffer)
            unflushed += run[-1].end - run[0].offset
            if unflushed >= FLUSH_EVERY:
                # Start the write-back of what is applied so far while the rest is copied,
                # instead of leaving all of it to the final flush (an earlier flush only
                # makes part of a committed epoch durable: recovery applies it again whole).
                unflushed = 0
                await disk.flush()

    try:
        async with asyncio.TaskGroup() as group:
            for _ in range(max(1, concurrency)):
                group.create_task(worker())
    except BaseExceptionGroup as failed:  # the caller wants the error, not a group of one
        raise _first_error(failed) from None


def _first_error(failed: BaseExceptionGroup[BaseException]) -> BaseException:
    """The error a failed apply reports: damage first, else the first failure."""
    damage = failed.subgroup(StagedDamage)
    chosen: BaseException = damage if damage is not None else failed
    while isinstance(chosen, BaseExceptionGroup):
        chosen = chosen.exceptions[0]
    return chosen


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
