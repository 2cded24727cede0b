"""Where a flush epoch lands before it is committed: a sparse file and a landing record.

A staging area is a directory ``stage-<epoch>`` under the disk's directory in
the I/O manager's data dir, holding

* the *data file*: a sparse file of the disk's size; the sender's writes land
  at their disk offsets, so a range reads back exactly as the epoch holds it.
  The manager puts it in the disk's own directory (a file from
  ``LayeredDisk.staged_path``, named in ``data.path``) so that the commit
  makes it a layer of the disk without a copy; otherwise it is ``data.raw``
  in the staging area;
* ``landed.log``: what landed, one fixed record per write piece (see below) or zero request,
  ``kind:u8 offset:u64 length:u64 hash:16 check:8`` (kind 1 data, 2 zero;
  ``hash`` the xxh3-128 of the bytes as they landed, of zeroes for a zero
  request; ``check`` the xxh3-64 of the record's first 33 bytes).

:class:`StagingBackend` is that area through the block backend protocol,
exported writable over NBD: the sender writes with Ferry's hashed writes,
so each chunk is checked against the sender's hash as it lands (the server
answers with the digest of the bytes it wrote; a mismatch is sent again).
``flush`` fdatasyncs the file, then appends the landing records written
since and fsyncs them: data before the record that names it.

At commit the area is sealed (writes in flight are waited for, later ones
fail with EPERM) and checked against the manifest: nothing may have landed
outside the manifest's ranges, and every entry's staged bytes must hash to
the entry's hash. A write lands as one record per ``LANDING_BLOCK``-aligned
piece, each with the hash of the bytes as they were written, so an entry
that exactly one piece's records cover is checked from those hashes
without reading the file again; any other entry is read back and hashed.
The commit then links the data file into the disk (see ``commit``). A
staging area of an epoch that was never committed is discarded, data file
included, when the disk is opened again.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import enum
import errno
import os
import shutil
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Self

import xxhash

from appliance.components.onprem import durable
from appliance.components.onprem.manifest import EpochManifest, ManifestEntry
from appliance.storage.extents import Extent
from appliance.storage.file import FileBackend
from appliance.storage.hashing import chunk_hash, zero_hash

DATA_FILE = "data.raw"
DATA_PATH_FILE = "data.path"
LANDED_FILE = "landed.log"
_LANDED = struct.Struct(">BQQ16s")
_LANDED_CHECK = struct.Struct(">Q")
INLINE_HASH = 1 << 20
HASH_PIECE = 4 << 20
LANDING_BLOCK = 64 << 10
"""A write lands as one record per piece of it on this grid (the cache's chunk size)."""
VERIFY_CONCURRENCY = 4


class LandingKind(enum.IntEnum):
    DATA = 1
    ZERO = 2


@dataclass(frozen=True, slots=True)
class Landing:
    kind: LandingKind
    offset: int
    length: int
    hash: bytes

    def pack(self) -> bytes:
        head = _LANDED.pack(self.kind, self.offset, self.length, self.hash)
        return head + _LANDED_CHECK.pack(xxhash.xxh3_64_intdigest(head))


def staging_name(epoch: int) -> str:
    return f"stage-{epoch}"


def staged_epochs(disk_root: Path) -> list[int]:
    """The epochs with a staging area under ``disk_root`` (blocking)."""
    epochs: list[int] = []
    for entry in disk_root.glob("stage-*"):
        suffix = entry.name.removeprefix("stage-")
        if suffix.isdigit() and entry.is_dir():
            epochs.append(int(suffix))
    return sorted(epochs)


def data_path(directory: Path) -> Path:
    """Where the data file of the staging area ``directory`` is (blocking)."""
    try:
        return Path((directory / DATA_PATH_FILE).read_text())
    except FileNotFoundError:
        return directory / DATA_FILE


def discard(disk_root: Path, epoch: int, *, data: bool = True) -> None:
    """Remove a staging area (blocking), and its data file unless ``data`` is False (a
    committed epoch's file is the disk's now); absent is fine."""
    directory = disk_root / staging_name(epoch)
    if not directory.exists():
        return
    if data:
        data_path(directory).unlink(missing_ok=True)
    shutil.rmtree(directory)
    durable.fsync_dir(disk_root)


Span = tuple[int, int]
"""``(start, end)``: a plain byte range (plain tuples: an epoch has tens of thousands)."""


def _outside(landed: list[Span], wanted: list[Span]) -> Span | None:
    """The first landed range not inside ``wanted`` (both merged, sorted), or None."""
    index = 0
    for start, end in landed:
        while index < len(wanted) and wanted[index][1] <= start:
            index += 1
        if index == len(wanted):
            return start, end
        if wanted[index][0] > start or wanted[index][1] < end:
            return start, end
    return None


@dataclass(slots=True)
class ByteTally:
    """Data bytes landed, shared by the staging areas one manager opens (its figures)."""

    bytes: int = 0


class StagingBackend:
    """One epoch's staging area as a writable block backend; build with create."""

    def __init__(
        self, directory: Path, epoch: int, file: FileBackend, landed_fd: int, data: Path
    ) -> None:
        self._directory = directory
        self._epoch = epoch
        self._data = data
        self._file = file
        self._landed_fd = landed_fd
        self._landed: list[Landing] = []
        self._unsaved: list[Landing] = []
        self._flush_lock = asyncio.Lock()
        self._sealed = False
        self._closed = False
        self._inflight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self.tally = ByteTally()

    @classmethod
    async def create(
        cls, disk_root: Path, epoch: int, size: int, data: Path | None = None
    ) -> StagingBackend:
        """A new, empty staging area for ``epoch`` (an old one is replaced), its data file
        at ``data`` (the area's ``data.raw`` if None)."""
        directory = disk_root / staging_name(epoch)
        where = directory / DATA_FILE if data is None else data

        def build() -> tuple[FileBackend, int]:
            discard(disk_root, epoch)
            durable.make_dirs(directory)
            if data is not None:  # named before it exists: a discard always finds it
                durable.atomic_write(directory / DATA_PATH_FILE, str(data).encode())
            file = FileBackend.create(where, size)
            landed = os.open(
                directory / LANDED_FILE,
                os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC,
                0o600,
            )
            durable.fsync_dir(directory)
            return file, landed

        file, landed = await asyncio.to_thread(build)
        return cls(directory, epoch, file, landed, where)

    # -- the block backend protocol ---------------------------------------------------------

    @property
    def name(self) -> str:
        return f"staging:{self._directory}"

    @property
    def size(self) -> int:
        return self._file.size

    @property
    def readonly(self) -> bool:
        return False

    @property
    def epoch(self) -> int:
        return self._epoch

    @property
    def data_path(self) -> Path:
        """The data file: the epoch's bytes at their disk offsets."""
        return self._data

    @property
    def sealed(self) -> bool:
        return self._sealed

    @property
    def landed_bytes(self) -> int:
        return sum(landing.length for landing in self._landed)

    async def read(self, offset: int, length: int) -> bytes:
        return await self._file.read(offset, length)

    async def read_into(self, offset: int, buffer: bytearray | memoryview) -> None:
        await self._file.read_into(offset, buffer)

    async def write(self, offset: int, data: bytes | memoryview) -> None:
        with self._landing_write():
            await self._file.write(offset, data)
            view = memoryview(data).cast("B")
            if len(view) > INLINE_HASH:
                landings = await asyncio.to_thread(_data_landings, offset, view)
            else:
                landings = _data_landings(offset, view)
            for landing in landings:
                self._landing(landing)
            self.tally.bytes += len(view)

    async def zero(self, offset: int, length: int, *, punch_hole: bool = False) -> None:
        with self._landing_write():
            # Always a hole: the staging file only has to read back right, never keep space.
            await self._file.zero(offset, length, punch_hole=True)
            self._landing(Landing(LandingKind.ZERO, offset, length, zero_hash(length)))

    async def flush(self) -> None:
        """Make what landed durable: the data first, then the records naming it."""
        async with self._flush_lock:
            records, self._unsaved = self._unsaved, []
            await self._file.flush()
            if records:
                await asyncio.to_thread(self._append, b"".join(r.pack() for r in records))

    async def extents(self, offset: int = 0, length: int | None = None) -> list[Extent]:
        return await self._file.extents(offset, length)

    async def hash_blocks(self, offset: int, length: int, block: int) -> list[bytes] | None:
        return await self._file.hash_blocks(offset, length, block)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        await self._file.close()
        os.close(self._landed_fd)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # -- commit ------------------------------------------------------------------------------

    async def seal(self) -> None:
        """Refuse every later write and wait for those in flight: what the commit checks is
        what it applies."""
        self._sealed = True
        await self._idle.wait()

    def unseal(self) -> None:
        self._sealed = False

    def problem(self, manifest: EpochManifest) -> str | None:
        """Why what landed cannot be this manifest's epoch (ranges only), or None."""
        landed = _union(sorted((x.offset, x.offset + x.length) for x in self._landed))
        wanted = _union([(e.offset, e.end) for e in manifest.entries])
        stray = _outside(landed, wanted)
        if stray is not None:
            return f"{stray[1] - stray[0]} bytes at {stray[0]} landed outside the manifest"
        return None

    async def mismatch(
        self, manifest: EpochManifest, concurrency: int = VERIFY_CONCURRENCY
    ) -> ManifestEntry | None:
        """The first entry whose staged bytes do not hash to its hash, or None.

        Entries are hashed ``concurrency`` at a time (each holds one buffer of
        at most ``HASH_PIECE`` bytes).
        """
        slots = asyncio.Semaphore(concurrency)
        wrong: list[ManifestEntry] = []
        unproven = self.unproven(manifest)

        async def check(entry: ManifestEntry) -> None:
            async with slots:
                if await self.entry_hash(entry) != entry.hash:
                    wrong.append(entry)

        async with asyncio.TaskGroup() as group:
            for entry in unproven:
                group.create_task(check(entry))
        return min(wrong, key=lambda entry: entry.offset) if wrong else None

    def unproven(self, manifest: EpochManifest) -> list[ManifestEntry]:
        """The entries whose staged bytes the landing records do not prove.

        An entry is proven when every landing that touches its range covers
        exactly that range and carries the entry's hash: those bytes were
        hashed as they landed, and nothing else wrote there since (the
        staging file is only written through this backend). Any other entry
        (several writes in it, a wider zero request, nothing landed) must be
        read back and hashed.
        """
        exact: dict[tuple[int, int], list[bytes]] = {}
        for landing in self._landed:
            exact.setdefault((landing.offset, landing.length), []).append(landing.hash)
        starts = sorted(landing.offset for landing in self._landed)
        ends = sorted(landing.offset + landing.length for landing in self._landed)
        unproven: list[ManifestEntry] = []
        for entry in manifest.entries:
            hashes = exact.get((entry.offset, entry.length), [])
            # Landings touching [offset, end): started before its end, not ended by its start.
            touching = bisect.bisect_left(starts, entry.end) - bisect.bisect_right(
                ends, entry.offset
            )
            if not hashes or touching != len(hashes) or any(h != entry.hash for h in hashes):
                unproven.append(entry)
        return unproven

    async def entry_hash(self, entry: ManifestEntry) -> bytes:
        """chunk_hash of the staged bytes of one entry, hashed in the file's thread pool."""
        if entry.hash == zero_hash(entry.length):
            extents = await self._file.extents(entry.offset, entry.length)
            if all(extent.zero for extent in extents):
                return entry.hash
        hasher = xxhash.xxh3_128()
        buffer = bytearray(min(entry.length, HASH_PIECE))
        for pos in range(entry.offset, entry.end, len(buffer)):
            view = memoryview(buffer)[: min(len(buffer), entry.end - pos)]
            await self._file.read_into(pos, view)
            if len(view) > INLINE_HASH:
                await asyncio.to_thread(hasher.update, view)
            else:
                hasher.update(view)
        digest: bytes = hasher.digest()
        return digest

    async def durable(self) -> None:
        """fdatasync the staged data and fsync its landing records."""
        await self.flush()

    # -- internals ---------------------------------------------------------------------------

    @contextlib.contextmanager
    def _landing_write(self) -> Iterator[None]:
        """Count a write in flight, so that ``seal`` can wait for it to land."""
        self._check_open()
        self._inflight += 1
        self._idle.clear()
        try:
            yield
        finally:
            self._inflight -= 1
            if not self._inflight:
                self._idle.set()

    def _check_open(self) -> None:
        if self._closed:
            raise ValueError(f"{self.name} is closed")
        if self._sealed:
            raise PermissionError(errno.EPERM, f"epoch {self._epoch} is being committed")

    def _landing(self, landing: Landing) -> None:
        self._landed.append(landing)
        self._unsaved.append(landing)

    def _append(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(self._landed_fd, view) :]
        os.fsync(self._landed_fd)


def _data_landings(offset: int, data: memoryview) -> list[Landing]:
    """The landing records of one write: one per ``LANDING_BLOCK``-aligned piece of it, so
    that a manifest entry on that grid is proven by its own record (see ``unproven``)."""
    landings: list[Landing] = []
    pos, end = offset, offset + len(data)
    while pos < end:
        stop = min(end, (pos // LANDING_BLOCK + 1) * LANDING_BLOCK)
        piece = data[pos - offset : stop - offset]
        landings.append(Landing(LandingKind.DATA, pos, stop - pos, chunk_hash(piece)))
        pos = stop
    return landings


def _union(spans: list[Span]) -> list[Span]:
    """Sorted ranges with the overlapping and adjacent ones joined."""
    joined: list[Span] = []
    for start, end in spans:
        if joined and joined[-1][1] >= start:
            if end > joined[-1][1]:
                joined[-1] = (joined[-1][0], end)
        else:
            joined.append((start, end))
    return joined
