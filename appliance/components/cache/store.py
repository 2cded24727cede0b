"""``CacheStore``: one disk's cached chunks in a bounded slot file, with journaled metadata.

A disk's cache directory holds::

    geometry.json   {"disk_size", "chunk_size", "slots"}: written once, at creation
    slots           slot i holds one chunk at [i * chunk_size, (i + 1) * chunk_size)
    journal         the metadata journal (format in :mod:`.journal`)

State (all in memory, rebuilt from the journal on open):

- ``live``: chunk -> (slot, epoch); epoch 0 is *clean* (its content is committed
  on-prem), N > 0 is *dirty* in epoch N.
- ``held``: for each cut but uncommitted epoch N, chunk -> slot: the content of
  the chunk as of N's cut. A write to a chunk whose live slot is held (or clean)
  goes to a fresh slot (copy on write), so a held or clean slot never changes.
- ``written``: a bitmap of every chunk written since the migration began.
- an LRU of clean chunks, the only ones ever evicted.

Slot I/O is synchronous in the event loop's thread: each call moves at most
one chunk (64 KiB by default) through the page cache, and doing it without
an await between the map lookup and the ``pread`` is what keeps a read from
racing an eviction. The exception: a large read of cached chunks copies out
in a worker thread, with its slots *pinned* (``pin``/``unpin``): a slot that
loses its last record meanwhile is freed only once unpinned. Everything that
waits on the device (fdatasync, journal writes) runs in a thread.

Durability: data goes to the slot file first; the records that point at it
are queued and reach the journal only in :meth:`CacheStore.sync`, after the
slot file was fsynced. ``sync`` is a group commit: callers arriving while one
runs share the next, and one with nothing changed since costs nothing. A
slot freed by a queued record (eviction, a rewrite, a commit) is reused only
once that record is durable, so a replayed journal never points at a slot
that was overwritten since. Writes in place only ever touch a slot that is
dirty in the open epoch, whose content no durable record calls clean or held.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Self

from appliance.components.cache.journal import Journal, Kind, Record
from appliance.errors import DiskCorrupt

COMPACT_AFTER_RECORDS = 65536


@dataclass(slots=True)
class Entry:
    slot: int
    epoch: int


@dataclass(frozen=True, slots=True)
class Geometry:
    disk_size: int
    chunk_size: int
    slots: int

    @property
    def chunks(self) -> int:
        return -(-self.disk_size // self.chunk_size)


def _load_geometry(directory: Path, wanted: Geometry) -> Geometry:
    path = directory / "geometry.json"
    if not path.exists():
        fresh = path.with_name("geometry.json.new")
        fresh.write_text(json.dumps(asdict(wanted)))
        with fresh.open("rb+") as file:
            os.fsync(file.fileno())
        os.replace(fresh, path)
        return wanted
    try:
        raw = json.loads(path.read_text())
        found = Geometry(int(raw["disk_size"]), int(raw["chunk_size"]), int(raw["slots"]))
    except (ValueError, KeyError, TypeError) as exc:
        raise DiskCorrupt(path, f"unreadable geometry: {exc}") from None
    if (found.disk_size, found.chunk_size) != (wanted.disk_size, wanted.chunk_size):
        raise DiskCorrupt(path, f"cache is for {found}, asked for {wanted}")
    return found


class CacheStore:
    """Slots and metadata of one disk; every method runs in the event loop's thread."""

    def __init__(self, directory: Path, geometry: Geometry) -> None:
        self.directory = directory
        self.geometry = geometry
        self.live: dict[int, Entry] = {}
        self.held: dict[int, dict[int, int]] = {}
        self.open_epoch = 1
        self.committed = 0
        self.written = bytearray((geometry.chunks + 7) // 8)
        self._refs = bytearray(geometry.slots)
        self._lru: OrderedDict[int, None] = OrderedDict()
        self._free: list[int] = []
        self._pending_free: list[int] = []
        self._pending: list[Record] = []
        self._pins: dict[int, int] = {}
        self._unpinned_free: set[int] = set()
        """Slots no record points at any more, freed once no worker thread reads them."""
        self._sync_lock = asyncio.Lock()
        self._unsynced = False
        """Slot data or records changed since the last sync began."""
        self._syncs_started = 0
        self.syncs = 0
        """Syncs that reached the device (figures, tests)."""
        self._synced_through = 0
        """The number of the latest sync that finished well (each covers what came before
        it started)."""
        self._journal = Journal(directory / "journal")
        self._fd = -1
        self.compact_after = COMPACT_AFTER_RECORDS
        self.open_dirty = 0
        """Chunks dirty in the open epoch."""

    @classmethod
    def open(cls, directory: Path, disk_size: int, chunk_size: int, slots: int) -> Self:
        """Open (or create) the cache of one disk and replay its journal (blocking)."""
        directory.mkdir(parents=True, exist_ok=True)
        geometry = _load_geometry(directory, Geometry(disk_size, chunk_size, slots))
        store = cls(directory, geometry)
        store._fd = os.open(directory / "slots", os.O_RDWR | os.O_CREAT, 0o600)
        os.ftruncate(store._fd, geometry.slots * chunk_size)
        for record in store._journal.open():
            store._apply(record)
        store._pending_free = []
        store._free = [slot for slot in range(geometry.slots - 1, -1, -1) if not store._refs[slot]]
        return store

    def close(self) -> None:
        self._journal.close()
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    # -- figures -------------------------------------------------------------

    @property
    def free_slots(self) -> int:
        return len(self._free)

    @property
    def used_slots(self) -> int:
        return self.geometry.slots - len(self._free) - len(self._pending_free)

    @property
    def clean_slots(self) -> int:
        return len(self._lru)

    @property
    def dirty_slots(self) -> int:
        """Slots holding data not yet committed on-prem (open and held epochs)."""
        return self.used_slots - len(self._lru)

    @property
    def has_pending_free(self) -> bool:
        return bool(self._pending_free)

    @property
    def reclaimable(self) -> bool:
        """True when a slot can be had without waiting for a commit."""
        return bool(self._free or self._pending_free or self._lru)

    def is_written(self, chunk: int) -> bool:
        return bool(self.written[chunk >> 3] & (1 << (chunk & 7)))

    def written_chunks(self) -> list[int]:
        """Every chunk written since the migration began, ascending."""
        found: list[int] = []
        for index, byte in enumerate(self.written):
            if byte:
                found.extend(index * 8 + bit for bit in range(8) if byte >> bit & 1)
        return found

    # -- slot data (synchronous: page-cache sized pieces) ---------------------

    def read_slot(self, slot: int, offset: int, length: int) -> bytes:
        return os.pread(self._fd, length, slot * self.geometry.chunk_size + offset)

    def read_slot_into(self, slot: int, offset: int, view: memoryview) -> None:
        """Fill ``view`` from the slot (no intermediate ``bytes``)."""
        at = slot * self.geometry.chunk_size + offset
        while view:
            got = os.preadv(self._fd, [view], at)
            if not got:
                raise DiskCorrupt(self.directory / "slots", f"short read at {at}")
            view, at = view[got:], at + got

    def write_slot(self, slot: int, offset: int, data: bytes | bytearray | memoryview) -> None:
        self._unsynced = True
        view = memoryview(data)
        at = slot * self.geometry.chunk_size + offset
        written = os.pwrite(self._fd, view, at)
        while written < len(view):
            view, at = view[written:], at + written
            written = os.pwrite(self._fd, view, at)

    # -- metadata changes (queued for the journal) ---------------------------

    def touch(self, chunk: int) -> None:
        if chunk in self._lru:
            self._lru.move_to_end(chunk)

    def allocate(self) -> int | None:
        """A free slot, or None (then evict, sync, or wait for a commit)."""
        return self._free.pop() if self._free else None

    def unused(self, slot: int) -> None:
        """Give back a slot ``allocate`` returned that no record points at."""
        self._free.append(slot)

    def map(self, chunk: int, slot: int, epoch: int) -> None:
        self._record(Record(Kind.MAP, (chunk, slot, epoch)))

    def evict(self, busy: Callable[[int], bool]) -> bool:
        """Drop the least recently used clean chunk not ``busy``; False if none."""
        for chunk in self._lru:
            if not busy(chunk):
                self._record(Record(Kind.UNMAP, (chunk,)))
                return True
        return False

    def cut(self) -> int:
        """Cut the open epoch: its dirty chunks are held by it; returns its number."""
        epoch = self.open_epoch
        self._record(Record(Kind.CUT, (epoch,)))
        return epoch

    def commit(self, epoch: int) -> None:
        self._record(Record(Kind.COMMIT, (epoch,)))

    def _record(self, record: Record) -> None:
        self._apply(record)
        self._pending.append(record)
        self._unsynced = True

    # -- applying records (live and on replay) --------------------------------

    def _apply(self, record: Record) -> None:
        kind, fields = record.kind, record.fields
        if kind == Kind.MAP:
            self._apply_map(*fields)
        elif kind == Kind.UNMAP:
            self._drop_live(fields[0])
        elif kind == Kind.CUT:
            self._apply_cut(fields[0])
        elif kind == Kind.COMMIT:
            self._apply_commit(fields[0])
        elif kind == Kind.HELD:
            epoch, chunk, slot = fields
            self.held.setdefault(epoch, {})[chunk] = slot
            self._refs[slot] += 1
        elif kind == Kind.STATE:
            self.open_epoch, self.committed = fields
            self.open_dirty = 0
        elif kind == Kind.WRITTEN:
            start = fields[0] // 8
            self.written[start : start + len(record.blob)] = record.blob

    def _apply_map(self, chunk: int, slot: int, epoch: int) -> None:
        self._drop_live(chunk)
        self.live[chunk] = Entry(slot, epoch)
        self._refs[slot] += 1
        if epoch == self.open_epoch:
            self.open_dirty += 1
        if epoch:
            self.written[chunk >> 3] |= 1 << (chunk & 7)
        else:
            self._lru[chunk] = None

    def _drop_live(self, chunk: int) -> None:
        entry = self.live.pop(chunk, None)
        if entry is None:
            return
        self._lru.pop(chunk, None)
        if entry.epoch == self.open_epoch:
            self.open_dirty -= 1
        self._release(entry.slot)

    def _release(self, slot: int) -> None:
        self._refs[slot] -= 1
        if not self._refs[slot]:
            if slot in self._pins:
                self._unpinned_free.add(slot)  # a worker thread still reads it
            else:
                self._pending_free.append(slot)

    def _apply_cut(self, epoch: int) -> None:
        held = {c: e.slot for c, e in self.live.items() if e.epoch == epoch}
        for slot in held.values():
            self._refs[slot] += 1
        self.held[epoch] = held
        self.open_epoch = epoch + 1
        self.open_dirty = 0

    def _apply_commit(self, epoch: int) -> None:
        for chunk, slot in self.held.pop(epoch, {}).items():
            entry = self.live.get(chunk)
            if entry is not None and entry.slot == slot:
                entry.epoch = 0
                self._lru[chunk] = None
            self._release(slot)
        self.committed = max(self.committed, epoch)

    # -- slots read by a worker thread ---------------------------------------

    def pin(self, slot: int) -> None:
        """Keep ``slot`` from reuse while a worker thread reads it (call in the loop)."""
        self._pins[slot] = self._pins.get(slot, 0) + 1

    def unpin(self, slot: int) -> None:
        left = self._pins[slot] - 1
        if left:
            self._pins[slot] = left
            return
        del self._pins[slot]
        if slot in self._unpinned_free:
            self._unpinned_free.discard(slot)
            self._pending_free.append(slot)
            self._unsynced = True  # the next sync frees it

    async def read_pinned(self, reads: list[tuple[int, int, memoryview]]) -> None:
        """``read_slot_into`` of each (slot, offset, view) in a worker thread, the slots
        pinned until it is done (even if the caller is cancelled meanwhile): an eviction
        or a rewrite may drop them, but none is reused before the thread finished."""
        for slot, _, _ in reads:
            self.pin(slot)

        def read_all() -> None:
            for slot, offset, views in self._runs(reads):
                self._read_run(slot, offset, views)

        def unpin_all(_done: object) -> None:
            for slot, _, _ in reads:
                self.unpin(slot)

        done = asyncio.get_running_loop().run_in_executor(None, read_all)
        done.add_done_callback(unpin_all)  # in the loop, once the thread is done
        await asyncio.shield(done)

    def _runs(
        self, reads: list[tuple[int, int, memoryview]]
    ) -> list[tuple[int, int, list[memoryview]]]:
        """Reads of consecutive slots, each piece up to its slot's end and the next from
        its start, merged: one ``preadv`` each (slots of chunks cached in order are
        consecutive)."""
        chunk = self.geometry.chunk_size
        runs: list[tuple[int, int, list[memoryview]]] = []
        last_slot, last_end = -2, 0
        for slot, offset, view in reads:
            if runs and slot == last_slot + 1 and offset == 0 and last_end == chunk:
                runs[-1][2].append(view)
            else:
                runs.append((slot, offset, [view]))
            last_slot, last_end = slot, offset + len(view)
        return runs

    def _read_run(self, slot: int, offset: int, views: list[memoryview]) -> None:
        at = slot * self.geometry.chunk_size + offset
        if os.preadv(self._fd, views, at) == sum(len(view) for view in views):
            return
        for view in views:  # short (a signal, say): piece by piece
            self.read_slot_into(slot, offset, view)
            slot, offset = slot + 1, 0

    # -- durability ------------------------------------------------------------

    async def sync(self) -> None:
        """Make every write so far and the records pointing at it durable.

        Group commit: callers that arrive while a sync runs share the next one
        (one ``fdatasync`` of the slots, one journal append), and a sync with
        nothing changed since the last one costs no system call.
        """
        arrived = self._syncs_started
        async with self._sync_lock:
            if self._synced_through > arrived or not self._unsynced:
                return  # a sync that began after this call covered it, or nothing changed
            self._syncs_started += 1
            number = self._syncs_started
            self._unsynced = False
            batch, self._pending = self._pending, []
            freed, self._pending_free = self._pending_free, []
            compact = self._journal.records_since_rewrite + len(batch) > self.compact_after
            image = self._image() if compact else None
            try:
                await asyncio.to_thread(self._sync_blocking, batch, image)
            except BaseException:
                # Not durable: keep the records queued and the slots unusable.
                self._unsynced = True
                self._pending[:0] = batch
                self._pending_free[:0] = freed
                raise
            self._free.extend(freed)
            self._synced_through = number
            self.syncs += 1

    def _sync_blocking(self, batch: list[Record], image: list[Record] | None) -> None:
        # The slot file never changes size (made whole at open): its data alone matters.
        os.fdatasync(self._fd)
        if image is not None:
            self._journal.rewrite(image)
        else:
            self._journal.append(batch)
            self._journal.records_since_rewrite += len(batch)

    def _image(self) -> list[Record]:
        """The whole state as records (built in the loop, so it matches the batch)."""
        records = [Record(Kind.STATE, (self.open_epoch, self.committed))]
        records.append(Record(Kind.WRITTEN, (0,), bytes(self.written)))
        for epoch, held in sorted(self.held.items()):
            records += [Record(Kind.HELD, (epoch, c, s)) for c, s in held.items()]
        # Clean chunks in LRU order, so replay rebuilds the same order.
        dirty = [(c, e) for c, e in self.live.items() if e.epoch]
        records += [Record(Kind.MAP, (c, e.slot, e.epoch)) for c, e in dirty]
        records += [Record(Kind.MAP, (c, self.live[c].slot, 0)) for c in self._lru]
        return records
