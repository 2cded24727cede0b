"""LayeredDisk: a sparse raw disk with snapshots and change tracking, kept in one directory.

Layout: ``base.raw`` (sparse raw, the disk's full size), one ``overlay-N.raw``
per snapshot taken (same size, sparse), a bitmap per layer and
``manifest.json`` (size, granularity, ordered layers, snapshots, pending
work). The last layer takes the writes. A snapshot freezes it and starts a
new overlay; an overlay's bitmap marks the blocks (``granularity`` bytes)
written into it, which is both where reads of a block go (the highest layer
that wrote it) and the change tracking between snapshots. The base's bitmap
marks blocks zeroed on purpose, so they map as zero, not as holes.

Writes to an overlay are copy-on-write per block: a partly written block is
first filled from below, so an owned block is always whole. Block-range
locks serialise writers of a block; a shared/exclusive gate lets snapshots,
merges and close wait for in-flight I/O and hold new I/O back. Every write and
change of structure runs in its own task, so a cancelled caller can never
stop one half-way (the data would land but its bit would not be set).
Deleting a snapshot copies the layer above it down (the changes since, not
the disk) and consolidating copies every overlay into the base; both hold
I/O back while they copy.

A file staged in the disk's directory by someone else (``staged_path``) can
become the new top layer without a copy (``link_layer``: hard-linked, then
named by the manifest; linking the same file again is recognised and does
nothing). Layers no snapshot freezes are folded together in the background
by ``compact``, which copies while I/O goes on (every view reads the same
before and after each piece) and holds I/O back only to swap the manifest.

Durability (DESIGN.md §9, data before the metadata that points at it):
``flush`` fdatasyncs the top layer, then replaces its bitmap atomically; the
manifest is replaced atomically after the layer files it names exist, and
a merge is recorded as pending before any block moves, and finished on the
next open if the process dies. Writes never flushed may be lost after a
crash, like a disk's cache: a block whose bit was not persisted reads from
the layers below, i.e. its old content. The disk is never inconsistent:
each block reads its old or its new content (an in-place rewrite of an
already tracked block is torn at most at page granularity, as on any disk),
and a change list always covers every block that reads differently.
"""

from __future__ import annotations

import asyncio
import os
import uuid
import weakref
from collections.abc import Coroutine
from dataclasses import replace
from pathlib import Path
from types import TracebackType
from typing import Any, Self, TypeVar

from appliance.clock import Clock, SystemClock
from appliance.errors import DiskCorrupt, UnknownSnapshot
from appliance.storage import bitmap, disk_manifest, layer_files, sparse
from appliance.storage.disk_manifest import (
    Manifest,
    PendingConsolidation,
    PendingMerge,
    SnapshotInfo,
    SnapshotRecord,
)
from appliance.storage.disk_view import DiskView
from appliance.storage.extents import Extent
from appliance.storage.layer_files import Layer, OpenFiles
from appliance.storage.layer_links import LinkStep, StagedLayers
from appliance.storage.layer_map import Geometry, map_view, owner_runs, whole_blocks
from appliance.storage.locks import BlockRangeLocks, SharedExclusiveLock

__all__ = ["DEFAULT_GRANULARITY", "DiskView", "LayeredDisk", "LinkStep", "SnapshotInfo"]

DEFAULT_GRANULARITY = 64 * 1024
TRANSFER_CHUNK = 1024 * 1024
MIN_GRANULARITY = 4096

_T = TypeVar("_T")


def _check_range(name: str, size: int, offset: int, length: int) -> None:
    if offset < 0 or length < 0 or offset + length > size:
        raise ValueError(f"{name}: range {offset}+{length} is outside a disk of {size} bytes")


def _check_geometry(size: int, granularity: int) -> None:
    if size < 0:
        raise ValueError(f"negative disk size {size}")
    if granularity < MIN_GRANULARITY or granularity & (granularity - 1):
        raise ValueError(f"granularity {granularity} must be a power of two >= {MIN_GRANULARITY}")
    if TRANSFER_CHUNK % granularity:
        raise ValueError(f"granularity {granularity} must divide the {TRANSFER_CHUNK} byte chunk")


class LayeredDisk(StagedLayers):
    """A disk with snapshots; build with :meth:`create` or :meth:`open`, then use its views."""

    def __init__(
        self,
        directory: Path,
        manifest: Manifest,
        layers: list[Layer],
        files: OpenFiles,
        clock: Clock,
    ) -> None:
        self._directory = directory
        self._geometry = Geometry(manifest.size, manifest.granularity)
        self._next_layer = manifest.next_layer
        self._layers = layers
        self._snapshots = list(manifest.snapshots)
        self._files = files
        self._close_files = weakref.finalize(self, files.close_all)
        self._clock = clock
        self._gate = SharedExclusiveLock()
        self._block_locks = BlockRangeLocks()
        self._flush_lock = asyncio.Lock()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._closed = False
        self._closing = False
        self._last_link = manifest.last_link
        self._compacting = asyncio.Lock()
        """Held by ``compact`` throughout, and by whatever drops layers (delete, consolidate,
        close), so that no layer it copies from or into goes away under it."""

    # -- building -------------------------------------------------------------------------------

    @classmethod
    async def create(
        cls,
        directory: Path | str,
        size: int,
        *,
        granularity: int = DEFAULT_GRANULARITY,
        clock: Clock | None = None,
    ) -> LayeredDisk:
        """A new disk of ``size`` bytes, all hole, in ``directory`` (created if missing)."""
        _check_geometry(size, granularity)
        directory = Path(directory)
        await asyncio.to_thread(layer_files.create_disk, directory, Manifest(size, granularity, 1))
        return await cls.open(directory, clock=clock)

    @classmethod
    async def open(cls, directory: Path | str, *, clock: Clock | None = None) -> LayeredDisk:
        """Open an existing disk, finishing a merge a crash interrupted."""
        directory = Path(directory)
        manifest, layers, files = await asyncio.to_thread(layer_files.open_disk, directory)
        disk = cls(directory, manifest, layers, files, clock or SystemClock())
        try:
            if isinstance(manifest.pending, PendingMerge):
                await disk._finish_merge(manifest.pending)
            elif isinstance(manifest.pending, PendingConsolidation):
                await disk._finish_consolidation()
            numbers = {layer.number for layer in disk._layers}
            await asyncio.to_thread(layer_files.remove_strays, directory, numbers)
        except BaseException:
            disk._close_files()
            raise
        return disk

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()

    # -- what it is -----------------------------------------------------------------------------

    @property
    def directory(self) -> Path:
        return self._directory

    @property
    def name(self) -> str:
        return str(self._directory)

    @property
    def size(self) -> int:
        return self._geometry.size

    @property
    def granularity(self) -> int:
        return self._geometry.granularity

    def active(self) -> DiskView:
        """The disk as it is now, read-write."""
        return DiskView(self, None)

    def at(self, snapshot_id: str) -> DiskView:
        """The disk exactly as it was when the snapshot was taken, read-only."""
        self._record(snapshot_id)
        return DiskView(self, snapshot_id)

    def snapshots(self) -> list[SnapshotInfo]:
        """Every snapshot, oldest first."""
        return [record.info for record in self._snapshots]

    # -- structure ------------------------------------------------------------------------------

    async def snapshot(self, name: str) -> SnapshotInfo:
        """Freeze the disk now; later writes go to a new, tracked overlay."""
        return await self._guarded(self._snapshot_now(name))

    async def delete_snapshot(self, snapshot_id: str) -> None:
        """Forget a snapshot, merging the layer above it down; every other view reads the same."""
        await self._guarded(self._delete_now(snapshot_id))

    async def consolidate(self) -> None:
        """Fold every overlay into the base; no snapshot is left."""
        await self._guarded(self._consolidate_now())

    async def changed_extents(
        self, from_snapshot_id: str, to_snapshot_id: str | None = None
    ) -> list[Extent]:
        """The blocks written after ``from`` up to ``to`` (None: now), labelled data or zero.

        Ranges are whole tracking blocks (the last one clipped to the disk),
        merged, over the whole disk; ``zero`` means the range reads as zeroes
        at ``to``, so a sync can send it as WRITE_ZEROES.
        """
        return await self._changed_now(from_snapshot_id, to_snapshot_id)

    async def flush(self) -> None:
        """Make every write so far durable: the top layer's data first, then its bitmap."""
        await self._guarded(self._flush_now())

    async def close(self) -> None:
        if not self._closed:
            self._closing = True  # a compaction stops at its next piece
            await self._guarded(self._close_now())

    # -- I/O for the views ----------------------------------------------------------------------

    async def _read(self, snapshot_id: str | None, offset: int, length: int) -> bytes:
        _check_range(self.name, self.size, offset, length)
        if not length:
            return b""
        return await self._read_now(snapshot_id, offset, length)

    async def _read_into(self, snapshot_id: str | None, offset: int, view: memoryview) -> None:
        _check_range(self.name, self.size, offset, len(view))
        if len(view):
            async with self._gate.shared():
                plan = layer_files.plan_read(
                    self._view(snapshot_id), self._geometry, offset, offset + len(view)
                )
                await asyncio.to_thread(layer_files.read_pieces_into, plan, view)

    async def _write(self, offset: int, data: bytes | memoryview) -> None:
        view = memoryview(data).cast("B")
        _check_range(self.name, self.size, offset, len(view))
        if len(view):
            await self._guarded(self._write_now(offset, view))

    async def _zero(self, offset: int, length: int, punch_hole: bool) -> None:
        _check_range(self.name, self.size, offset, length)
        if length:
            await self._guarded(self._zero_now(offset, length, punch_hole))

    async def _extents(self, snapshot_id: str | None, offset: int, length: int) -> list[Extent]:
        _check_range(self.name, self.size, offset, length)
        return await self._extents_now(snapshot_id, offset, length)

    # -- internals ------------------------------------------------------------------------------

    async def _guarded(self, work: Coroutine[Any, Any, _T]) -> _T:
        """Run ``work`` in a task of its own: a cancelled caller stops waiting, not the work.

        Everything that changes the disk goes through here. Reads and maps do
        not need to: a cancelled one leaves nothing half-done behind.
        """
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return await asyncio.shield(task)

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled():
            task.exception()  # retrieved here in case the caller was cancelled

    def _check_open(self) -> None:
        if self._closed:
            raise ValueError(f"{self.name} is closed")

    def _record(self, snapshot_id: str) -> SnapshotRecord:
        for record in self._snapshots:
            if record.info.id == snapshot_id:
                return record
        raise UnknownSnapshot(self.name, snapshot_id)

    def _position(self, number: int) -> int:
        for index, layer in enumerate(self._layers):
            if layer.number == number:
                return index
        raise DiskCorrupt(self._directory, f"layer {number} is not in the disk")

    def _view(self, snapshot_id: str | None) -> list[Layer]:
        self._check_open()
        if snapshot_id is None:
            return self._layers
        return self._layers[: self._position(self._record(snapshot_id).layer) + 1]

    def _manifest(self, **changes: Any) -> Manifest:
        current = Manifest(
            size=self.size,
            granularity=self.granularity,
            next_layer=self._next_layer,
            layers=tuple(layer.number for layer in self._layers),
            snapshots=tuple(self._snapshots),
            last_link=self._last_link,
        )
        return replace(current, **changes)

    async def _save_manifest(self, manifest: Manifest) -> None:
        await asyncio.to_thread(disk_manifest.save, self._directory, manifest)

    async def _read_now(self, snapshot_id: str | None, offset: int, length: int) -> bytes:
        async with self._gate.shared():
            plan = layer_files.plan_read(
                self._view(snapshot_id), self._geometry, offset, offset + length
            )
            return await asyncio.to_thread(layer_files.read_pieces, plan)

    async def _write_now(self, offset: int, data: memoryview) -> None:
        async with self._gate.shared():
            self._check_open()
            async with self._block_locks.hold(
                *self._geometry.block_range(offset, offset + len(data))
            ):
                await self._write_blocks(offset, data)

    async def _write_blocks(self, offset: int, data: memoryview) -> None:
        """Write into the top layer; the caller holds the gate and the blocks' lock."""
        top = self._layers[-1]
        if top.is_base:
            await asyncio.to_thread(sparse.write_all, top.fd, offset, data)
            return
        plan = layer_files.plan_write(self._layers, self._geometry, offset, data)
        await asyncio.to_thread(layer_files.apply_write, top.fd, plan)
        # Only now: a reader must never be sent to a half-written block.
        top.bitmap.set_range(*self._geometry.block_range(offset, offset + len(data)))

    async def _zero_now(self, offset: int, length: int, punch_hole: bool) -> None:
        async with self._gate.shared():
            self._check_open()
            async with self._block_locks.hold(*self._geometry.block_range(offset, offset + length)):
                await self._zero_blocks(offset, offset + length, punch_hole)

    async def _zero_blocks(self, offset: int, end: int, punch_hole: bool) -> None:
        granularity, top = self.granularity, self._layers[-1]
        full_first = -(-offset // granularity)
        full_stop = self._geometry.blocks if end == self.size else end // granularity
        if full_first >= full_stop:
            await self._write_blocks(offset, memoryview(bytes(end - offset)))
            return
        lo, hi = self._geometry.byte_range((full_first, full_stop))
        await asyncio.to_thread(sparse.punch, top.fd, lo, hi - lo)
        if top.is_base and punch_hole:
            top.bitmap.clear_range(full_first, full_stop)  # a real hole now
        else:
            top.bitmap.set_range(full_first, full_stop)
        if offset < lo:
            await self._write_blocks(offset, memoryview(bytes(lo - offset)))
        if hi < end:
            await self._write_blocks(hi, memoryview(bytes(end - hi)))

    async def _extents_now(self, snapshot_id: str | None, offset: int, length: int) -> list[Extent]:
        async with self._gate.shared():
            states = [layer.state() for layer in self._view(snapshot_id)]
            return await asyncio.to_thread(
                map_view, states, self._geometry, offset, offset + length
            )

    async def _changed_now(self, from_id: str, to_id: str | None) -> list[Extent]:
        async with self._gate.shared():
            self._check_open()
            start = self._position(self._record(from_id).layer)
            stop = (
                len(self._layers) - 1
                if to_id is None
                else self._position(self._record(to_id).layer)
            )
            if stop < start:
                raise ValueError(f"snapshot {to_id} was taken before {from_id}")
            changed = 0
            for layer in self._layers[start + 1 : stop + 1]:
                changed |= layer.bitmap.as_int()
            if not changed:
                return []
            states = [layer.state() for layer in self._layers[: stop + 1]]
            extents = await asyncio.to_thread(
                map_view, states, self._geometry, 0, self.size, changed
            )
            return whole_blocks(extents, self._geometry, changed)

    async def _flush_now(self) -> None:
        async with self._gate.shared():
            self._check_open()
            async with self._flush_lock:
                await self._flush_top()

    async def _flush_top(self) -> None:
        top = self._layers[-1]
        generation = top.bitmap.generation
        bits = top.bitmap.to_bytes() if generation != top.persisted else None
        await asyncio.to_thread(os.fdatasync, top.fd)
        if bits is not None:  # the copy covers only writes that had finished, now durable
            await asyncio.to_thread(
                bitmap.save, top.bitmap_path, bits, self._geometry.blocks, self.granularity
            )
            top.persisted = generation

    async def _save_bitmap(self, layer: Layer) -> None:
        generation, bits = layer.bitmap.generation, layer.bitmap.to_bytes()
        await asyncio.to_thread(
            bitmap.save, layer.bitmap_path, bits, self._geometry.blocks, self.granularity
        )
        layer.persisted = generation

    async def _snapshot_now(self, name: str) -> SnapshotInfo:
        async with self._gate.exclusive():
            self._check_open()
            await self._flush_top()  # the frozen layer is durable before anything names it
            number = self._next_layer
            layer = await asyncio.to_thread(
                layer_files.new_overlay, self._directory, number, self._geometry, self._files
            )
            info = SnapshotInfo(uuid.uuid4().hex, name, self._clock.now())
            record = SnapshotRecord(info, self._layers[-1].number)
            manifest = self._manifest(
                next_layer=number + 1,
                layers=(*(layer.number for layer in self._layers), number),
                snapshots=(*self._snapshots, record),
            )
            try:
                await self._save_manifest(manifest)
            except BaseException:
                self._files.close(layer.fd)  # its files are strays, removed on the next open
                raise
            self._next_layer = number + 1
            self._layers.append(layer)
            self._snapshots.append(record)
            return info

    async def _delete_now(self, snapshot_id: str) -> None:
        async with self._compacting, self._gate.exclusive():
            self._check_open()
            record = self._record(snapshot_id)
            position = self._position(record.layer)
            pending = PendingMerge(upper=self._layers[position + 1].number, lower=record.layer)
            await self._flush_top()
            remaining = [other for other in self._snapshots if other is not record]
            await self._save_manifest(self._manifest(snapshots=tuple(remaining), pending=pending))
            self._snapshots = remaining
            await self._finish_merge(pending)

    async def _finish_merge(self, pending: PendingMerge) -> None:
        """Fold ``upper`` into ``lower``; safe to repeat after a crash (upper never changes)."""
        lower = self._layers[self._position(pending.lower)]
        upper = self._layers[self._position(pending.upper)]
        zeroed = await asyncio.to_thread(
            layer_files.fold, self._geometry, [(upper, upper.bitmap.runs())], lower
        )
        if lower.is_base:
            for run in zeroed:
                lower.bitmap.set_range(*run)
        else:
            lower.bitmap.update(upper.bitmap)  # changes on both sides of the deleted snapshot
        await self._save_bitmap(lower)
        self._layers.remove(upper)
        self._snapshots = [
            replace(record, layer=lower.number) if record.layer == upper.number else record
            for record in self._snapshots
        ]
        await self._save_manifest(self._manifest())
        await self._drop([upper])

    async def _consolidate_now(self) -> None:
        async with self._compacting, self._gate.exclusive():
            self._check_open()
            await self._flush_top()
            if len(self._layers) == 1:
                return
            await self._save_manifest(self._manifest(snapshots=(), pending=PendingConsolidation()))
            self._snapshots = []
            await self._finish_consolidation()

    async def _finish_consolidation(self) -> None:
        """Copy every block to the base from the highest overlay that holds it."""
        base, overlays = self._layers[0], self._layers[1:]
        top_down = [layer.bitmap.as_int() for layer in reversed(overlays)]
        written = 0
        for bits in top_down:
            written |= bits
        shares = owner_runs(top_down, written, self._geometry.blocks)
        sources = list(zip(reversed(overlays), shares, strict=False))
        zeroed = await asyncio.to_thread(layer_files.fold, self._geometry, sources, base)
        for run in zeroed:
            base.bitmap.set_range(*run)
        await self._save_bitmap(base)
        self._layers = [base]
        self._snapshots = []
        await self._save_manifest(self._manifest())
        await self._drop(overlays)

    async def _drop(self, layers: list[Layer]) -> None:
        await asyncio.to_thread(layer_files.drop_layers, self._directory, layers, self._files)

    async def _close_now(self) -> None:
        async with self._compacting, self._gate.exclusive():
            if self._closed:
                return
            try:
                await self._flush_top()
            finally:
                self._closed = True
                self._close_files()
