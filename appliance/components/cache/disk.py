"""``CacheDisk``: one cached disk as a read-write ``Backend``, served to the cloud VM over NBD.

Reads: a chunk in the cache is read from its slot; a miss fetches the whole
chunk from the on-prem current image (once, however many readers wait for
it; adjacent missed chunks of one request with one upstream read of up to
``MISS_RUN`` bytes; see ``fetching``), keeps it clean when a slot can be
had, and answers. A chunk that the on-prem map showed as a hole when the
disk was opened, and that was never written since, reads as zeroes without
a fetch.

Writes: a chunk dirty in the open epoch is written in place; any other chunk
(clean, held by a cut epoch, or absent) gets a fresh slot holding its old
content with the write applied (copy on write). The NBD server offers small
writes to ``write_inline`` first: one that needs no fetch, no wait and no
reclaim (in place, or a copy on write into a free slot) is done on its
reader at once, the rest take the async path. A partial write to an absent
chunk first fetches the chunk from on-prem (read-modify-write). A write
that needs a slot while dirty data is at its limit, or when no slot can be
had, waits until an epoch commit frees room (an epoch is cut early if none
is in flight), and never fails for want of space.

Epoch cut: new writes wait while writes in flight finish, then the store
records the cut (writes acknowledged before it belong to epoch N, later ones
to N + 1), then the cut and every write before it are made durable, and the
shipper is told.

``flush`` (NBD FLUSH, and FUA through the server) makes every acknowledged
write durable: :meth:`CacheStore.sync`.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
from collections.abc import AsyncIterator, Awaitable, Callable

from appliance.components.cache.fetching import ChunkFetcher
from appliance.components.cache.pieces import Piece, hole_chunks, in_batches, pieces_of
from appliance.components.cache.sizing import CacheSettings
from appliance.components.cache.store import CacheStore
from appliance.components.cache.upstream import Upstream
from appliance.storage.extents import Extent, clip, merge
from appliance.storage.file import check_range

EVICT_BATCH = 16
THREADED_READ = 256 * 1024
"""Reads of cached data at least this large copy out of the page cache in a thread."""


class _Outcome(enum.Enum):
    DONE = enum.auto()
    NO_ROOM = enum.auto()
    AGAIN = enum.auto()


class CacheDisk:
    def __init__(
        self,
        name: str,
        store: CacheStore,
        upstream: Upstream,
        settings: CacheSettings,
        *,
        upstream_map: list[Extent],
    ) -> None:
        self._name = name
        self.store = store
        self.upstream = upstream
        self._settings = settings
        geometry = store.geometry
        self._size = geometry.disk_size
        self._chunk = geometry.chunk_size
        self._upstream_map = upstream_map
        self._holes = hole_chunks(upstream_map, geometry)
        self._zeroes = bytes(self._chunk)
        self._scratch = bytearray(self._chunk)
        self._dirty_limit = settings.dirty_limit_slots(geometry.slots)
        self._early_cut = settings.early_cut_slots(geometry.slots)
        self._locks: dict[int, asyncio.Lock] = {}
        self._fetcher = ChunkFetcher(store, upstream, self._reclaim, self._read_local)
        self._inflight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._cut_done = asyncio.Event()
        self._cut_done.set()
        self._cut_lock = asyncio.Lock()
        self._room = asyncio.Event()
        self._background: set[asyncio.Task[int]] = set()
        self._closed = False
        self.on_cut: Callable[[int], None] = lambda epoch: None
        self.before_commit: Callable[[int], Awaitable[None]] | None = None
        """Awaited before an epoch's commit is recorded (reconcile keeps its chunk set)."""
        self.epochs_in_flight: Callable[[], int] = lambda: len(store.held)
        self.writers_waiting = 0
        self.writer_blocked = asyncio.Event()
        """Set when a writer starts waiting for room (tests and figures)."""
        self.waited_for_room = 0
        """Writes that had to wait for an epoch commit (back-pressure), in all."""
        self.read_hits = 0
        """Chunk pieces of reads served by the cache (a slot or a known hole), in all."""
        self.read_misses = 0
        """Chunk pieces of reads fetched from on-prem, in all."""

    # -- Backend ---------------------------------------------------------------

    @property
    def name(self) -> str:
        return self._name

    @property
    def size(self) -> int:
        return self._size

    @property
    def readonly(self) -> bool:
        return False

    async def read(self, offset: int, length: int) -> bytes:
        buffer = bytearray(length)
        await self.read_into(offset, buffer)
        return bytes(buffer)

    async def read_into(self, offset: int, buffer: bytearray | memoryview) -> None:
        """Fill ``buffer`` from ``offset``: hits straight from their slots, misses fetched."""
        self._check_open()
        view = memoryview(buffer).cast("B")
        check_range(self._name, self._size, offset, len(view))
        pieces = pieces_of(offset, len(view), self._chunk)
        if len(view) >= THREADED_READ and await self._read_hits_threaded(pieces, view):
            return
        misses = [piece for piece in pieces if not self._read_local(piece, view)]
        self.read_hits += len(pieces) - len(misses)
        if misses:
            self.read_misses += len(misses)
            await self._fetcher.read_misses(misses, view)

    def read_inline(self, offset: int, view: memoryview) -> bool:
        """A read the cache holds whole (hits, known holes), served at once; else False.

        The NBD server calls this on its reader, so a hit costs no task and no await;
        with no await between lookup and copy nothing can evict the chunk meanwhile.
        """
        length = len(view)
        if self._closed or offset < 0 or length == 0 or offset + length > self._size:
            return False
        pieces = pieces_of(offset, length, self._chunk)
        if not all(p.chunk in self.store.live or self._known_hole(p.chunk) for p in pieces):
            return False
        for piece in pieces:
            self._read_local(piece, view)
        self.read_hits += len(pieces)
        return True

    def write_inline(self, offset: int, data: memoryview) -> bool:
        """A write that needs no fetch, no wait and no reclaim, done at once; else False.

        That is a write into chunks dirty in the open epoch (in place), or into one
        chunk that a free slot can take by copy on write from what the cache holds
        (or a whole chunk, or a known hole). Anything else (a fetch, room to wait
        for, a cut under way, another write busy on the chunk) takes the async path.
        With no await, an inline write is wholly before or after any cut.
        """
        length = len(data)
        if (
            self._closed
            or not self._cut_done.is_set()
            or offset < 0
            or length == 0
            or offset + length > self._size
        ):
            return False
        pieces = pieces_of(offset, length, self._chunk)
        if len(pieces) == 1:
            return self._write_now(pieces[0], data)
        if not all(self._in_place(piece.chunk) is not None for piece in pieces):
            return False
        for piece in pieces:
            self._write_now(piece, data[piece.at : piece.at + piece.length])
        return True

    async def write(self, offset: int, data: bytes | memoryview) -> None:
        self._check_open()
        view = memoryview(data).cast("B")
        check_range(self._name, self._size, offset, len(view))
        pieces = pieces_of(offset, len(view), self._chunk)
        if len(pieces) == 1:
            await self._write_piece(pieces[0], view)
            return
        await in_batches(
            self._write_piece(piece, view[piece.at : piece.at + piece.length]) for piece in pieces
        )

    async def zero(self, offset: int, length: int, *, punch_hole: bool = False) -> None:
        self._check_open()
        check_range(self._name, self._size, offset, length)
        zeroes = memoryview(self._zeroes)
        # A chunk that reads as zeroes on-prem and was never written stays as it is.
        await in_batches(
            self._write_piece(piece, zeroes[: piece.length])
            for piece in pieces_of(offset, length, self._chunk)
            if piece.chunk in self.store.live or not self._known_hole(piece.chunk)
        )

    async def flush(self) -> None:
        self._check_open()
        await self.store.sync()

    async def extents(self, offset: int = 0, length: int | None = None) -> list[Extent]:
        if length is None:
            length = self._size - offset
        check_range(self._name, self._size, offset, length)
        found: list[Extent] = []
        for piece in pieces_of(offset, length, self._chunk):
            start = offset + piece.at
            end = start + piece.length
            if piece.chunk in self.store.live or self.store.is_written(piece.chunk):
                found.append(Extent(start, piece.length))
            else:
                found.extend(clip(self._upstream_map, start, end) or [Extent(start, piece.length)])
        return merge(found)

    async def close(self) -> None:
        """Connections come and go; the disk stays open until the cache shuts it."""

    async def shutdown(self) -> None:
        """Refuse further I/O, let an early cut under way finish, make everything durable."""
        self._closed = True
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)
        await self.store.sync()

    def _check_open(self) -> None:
        if self._closed:
            raise ValueError(f"{self._name} is closed")

    # -- reads -----------------------------------------------------------------

    def _known_hole(self, chunk: int) -> bool:
        return bool(self._holes[chunk >> 3] & (1 << (chunk & 7))) and not self.store.is_written(
            chunk
        )

    def _read_local(self, piece: Piece, out: memoryview) -> bool:
        """Serve a piece from the cache if it can be (no await: nothing moves meanwhile)."""
        entry = self.store.live.get(piece.chunk)
        target = out[piece.at : piece.at + piece.length]
        if entry is not None:
            self.store.touch(piece.chunk)
            self.store.read_slot_into(entry.slot, piece.start, target)
        elif self._known_hole(piece.chunk):
            target[:] = self._zeroes[: piece.length]
        else:
            return False
        return True

    async def _read_hits_threaded(self, pieces: list[Piece], out: memoryview) -> bool:
        """Read a large request whose chunks are all cached in a worker thread, so the
        copy out of the page cache overlaps the loop's sending; False (nothing done)
        if a chunk is not cached."""
        live = self.store.live
        reads: list[tuple[int, int, memoryview]] = []
        for piece in pieces:
            entry = live.get(piece.chunk)
            if entry is None:
                return False
            reads.append((entry.slot, piece.start, out[piece.at : piece.at + piece.length]))
        for piece in pieces:
            self.store.touch(piece.chunk)
        await self.store.read_pinned(reads)
        self.read_hits += len(pieces)
        return True

    async def _reclaim(self) -> bool:
        """Evict clean chunks (LRU) and make that durable, so their slots can be reused."""
        busy = self._busy
        evicted = 0
        while evicted < EVICT_BATCH and self.store.evict(busy):
            evicted += 1
        if not evicted and not self.store.has_pending_free:
            return False
        await self.store.sync()
        return self.store.free_slots > 0

    def _busy(self, chunk: int) -> bool:
        lock = self._locks.get(chunk)
        return lock is not None and lock.locked()

    # -- writes ----------------------------------------------------------------

    async def _write_piece(self, piece: Piece, data: memoryview) -> None:
        whole = piece.start == 0 and piece.length == self._fetcher.chunk_length(piece.chunk)
        while True:
            with self._fetcher.watching(piece.chunk) as overtaken:
                base: bytes | None = None
                if not whole and piece.chunk not in self.store.live:
                    base = self._zeroes if self._known_hole(piece.chunk) else None
                    if base is None:
                        base = await self._fetcher.fetch(piece.chunk, keep=False)
                room = self._room
                async with self._writing(), self._chunk_lock(piece.chunk):
                    outcome = await self._apply_write(piece, data, base, overtaken, whole=whole)
            if outcome is _Outcome.DONE:
                break
            if outcome is _Outcome.NO_ROOM:
                await self._wait_for_room(room)
        if self.store.open_dirty >= self._early_cut:
            self._cut_soon()

    async def _apply_write(
        self,
        piece: Piece,
        data: memoryview,
        base: bytes | None,
        overtaken: Callable[[], bool],
        *,
        whole: bool,
    ) -> _Outcome:
        """Write one piece, unless it must wait for room or start over."""
        store = self.store
        slot = self._in_place(piece.chunk)
        if slot is not None:
            store.write_slot(slot, piece.start, data)
            return _Outcome.DONE
        if store.dirty_slots >= self._dirty_limit:
            return _Outcome.NO_ROOM
        slot = store.allocate()
        if slot is None and await self._reclaim():
            slot = store.allocate()
        if slot is None:
            return _Outcome.NO_ROOM
        if self._in_place(piece.chunk) is None and not (
            piece.chunk in store.live or whole or (base is not None and not overtaken())
        ):
            # Evicted, or rewritten and evicted, since the fetch: fetch again.
            store.unused(slot)
            return _Outcome.AGAIN
        self._copy_on_write(piece, data, slot, base)
        return _Outcome.DONE

    def _in_place(self, chunk: int) -> int | None:
        """The slot of a chunk dirty in the open epoch (written in place), else None."""
        entry = self.store.live.get(chunk)
        if entry is not None and entry.epoch == self.store.open_epoch:
            return entry.slot
        return None

    def _copy_on_write(self, piece: Piece, data: memoryview, slot: int, base: bytes | None) -> None:
        """Write the piece into the chunk, into ``slot`` unless the chunk is dirty in the
        open epoch (then in place and ``slot`` goes back): the chunk's content (from
        the cache, else ``base``, else zeroes for a whole-chunk write) with the piece
        applied. No await: callers checked which of these holds."""
        store = self.store
        entry = store.live.get(piece.chunk)
        if entry is not None and entry.epoch == store.open_epoch:
            store.unused(slot)
            store.write_slot(entry.slot, piece.start, data)
            return
        content = self._scratch  # no await from here on: one buffer serves every write
        if entry is not None:
            store.read_slot_into(entry.slot, 0, memoryview(content))
        else:
            content[:] = base if base is not None else self._zeroes
        content[piece.start : piece.start + piece.length] = data
        try:
            store.write_slot(slot, 0, content)
        except OSError:
            store.unused(slot)  # nothing points at it: leaked, it would count as dirty forever
            raise
        store.map(piece.chunk, slot, store.open_epoch)
        self._fetcher.overtake(piece.chunk)

    def _write_now(self, piece: Piece, data: memoryview) -> bool:
        """``write_inline`` of one piece: in place, or copy on write into a free slot."""
        store = self.store
        slot = self._in_place(piece.chunk)
        if slot is not None:
            store.write_slot(slot, piece.start, data)
            return True
        chunk = piece.chunk
        whole = piece.start == 0 and piece.length == self._fetcher.chunk_length(chunk)
        if (
            self._busy(chunk)
            or store.dirty_slots >= self._dirty_limit
            or not (chunk in store.live or whole or self._known_hole(chunk))
        ):
            return False
        slot = store.allocate()
        if slot is None:
            return False
        self._copy_on_write(piece, data, slot, None)
        if store.open_dirty >= self._early_cut:
            self._cut_soon()
        return True

    async def _wait_for_room(self, room: asyncio.Event) -> None:
        """Back-pressure: wait for a commit (cutting an epoch if none is on its way)."""
        self.waited_for_room += 1
        if not self.epochs_in_flight() and self.store.open_dirty:
            self._cut_soon()
        self.writers_waiting += 1
        try:
            if self.store.reclaimable and self.store.dirty_slots < self._dirty_limit:
                # Room may be had now (a fetch to redo, clean chunks busy a moment):
                # let the others run, then try again.
                await asyncio.sleep(0)
                return
            self.writer_blocked.set()
            await room.wait()
        finally:
            self.writers_waiting -= 1

    def room_freed(self) -> None:
        """An epoch committed: wake every writer waiting for room."""
        self._room.set()
        self._room = asyncio.Event()

    @contextlib.asynccontextmanager
    async def _chunk_lock(self, chunk: int) -> AsyncIterator[None]:
        lock = self._locks.setdefault(chunk, asyncio.Lock())
        try:
            async with lock:
                yield
        finally:
            if not lock.locked() and self._locks.get(chunk) is lock:
                del self._locks[chunk]

    @contextlib.asynccontextmanager
    async def _writing(self) -> AsyncIterator[None]:
        while not self._cut_done.is_set():
            await self._cut_done.wait()
        self._inflight += 1
        self._idle.clear()
        try:
            yield
        finally:
            self._inflight -= 1
            if not self._inflight:
                self._idle.set()

    # -- epochs ----------------------------------------------------------------

    def _cut_soon(self) -> None:
        if not self._cut_lock.locked() and not self._closed:
            task = asyncio.get_running_loop().create_task(self.cut_epoch())
            self._background.add(task)
            task.add_done_callback(self._background.discard)

    async def cut_epoch(self) -> int:
        """Cut the open epoch at this point in time; its number (shipping follows)."""
        async with self._cut_lock:
            self._cut_done.clear()
            try:
                await self._idle.wait()
                epoch = self.store.cut()
            finally:
                self._cut_done.set()
            await self.store.sync()
        self.on_cut(epoch)
        return epoch

    async def committed(self, epoch: int) -> None:
        """On-prem committed ``epoch``: its chunks are clean now (durably), room is freed."""
        if self.before_commit is not None:
            await self.before_commit(epoch)
        self.store.commit(epoch)
        await self.store.sync()
        self.room_freed()
