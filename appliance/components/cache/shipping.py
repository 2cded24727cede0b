"""Shipping epochs on-prem: the ``EpochSink`` protocol and the per-disk ``EpochShipper``.

For each cut epoch N, in order, the shipper:

1. asks the sink to ``stage(disk_id, N, token)``: an NBD address and export
   of the staging area for N (disk-sized; only N's chunks are written); if
   the sink answers ``EpochOutOfOrder`` expecting a later epoch, on-prem has
   committed N already (its reply was lost): nothing is sent, step 3 replays;
2. copies N's chunks there with the data path's ``Transfer`` over N's explicit
   extent list: hashed writes verified as they land (a chunk corrupted on the
   link is re-sent), bounded concurrency, the shared bandwidth cap; a resumed
   attempt skips what an earlier one made durable (its checkpoint is kept);
3. ``commit(disk_id, N, token, manifest)``: the manifest lists each chunk's
   (offset, length, xxh3-128) and the digest of the whole list;
4. only then marks N's chunks clean in the cache (durably).

A failed attempt (a dropped link, an unreachable I/O manager) is retried
every ``retry_delay_s``, forever, until the disk is closed; epochs after N
wait. A stale token stops the shipper: another owner has the disk.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Protocol

import structlog

from appliance.components.cache.disk import CacheDisk
from appliance.components.cache.sizing import CacheSettings
from appliance.components.cache.store import CacheStore
from appliance.datapath.checkpoint import MemoryCheckpointStore
from appliance.datapath.nbd.backend import NbdBackend
from appliance.datapath.nbd.channel import NbdAddress
from appliance.datapath.throttle import TokenBucket
from appliance.datapath.transfer import Transfer, TransferOptions
from appliance.errors import EpochOutOfOrder, EpochRejected, StaleToken
from appliance.state.checkpoints import ChunkRecord
from appliance.storage.extents import Extent, merge
from appliance.storage.file import check_range, read_only_error
from appliance.storage.hashing import chunk_hash, zero_hash

log = structlog.get_logger(__name__)

THREADED_READ = 256 * 1024
"""Epoch reads at least this large copy out of the slots in a worker thread."""


@dataclass(frozen=True, slots=True)
class ManifestEntry:
    offset: int
    length: int
    digest: bytes
    """xxh3-128 of the chunk's content as of the epoch's cut."""


@dataclass(frozen=True, slots=True)
class EpochManifest:
    entries: tuple[ManifestEntry, ...]
    digest: bytes
    """xxh3-128 of every entry's (offset, length, digest), in order."""

    @classmethod
    def of(cls, entries: tuple[ManifestEntry, ...]) -> EpochManifest:
        return cls(entries, manifest_digest(entries))


def manifest_digest(entries: tuple[ManifestEntry, ...]) -> bytes:
    packed = b"".join(
        e.offset.to_bytes(8, "big") + e.length.to_bytes(8, "big") + e.digest for e in entries
    )
    return chunk_hash(packed)


class EpochSink(Protocol):
    """Where epochs go: the on-prem I/O manager (or a local stand-in in tests)."""

    async def stage(self, disk_id: str, epoch: int, token: int) -> tuple[NbdAddress, str]:
        """The staging area of ``epoch`` (the same one if asked again): address, export."""
        ...

    async def commit(self, disk_id: str, epoch: int, token: int, manifest: EpochManifest) -> None:
        """Verify the staged epoch against ``manifest``, make it durable, apply it; idempotent."""
        ...


class EpochView:
    """Read-only Backend: the disk as of an epoch's cut where the epoch wrote; holes elsewhere."""

    def __init__(self, store: CacheStore, epoch: int) -> None:
        self._store = store
        self._held = dict(store.held.get(epoch, {}))
        self._chunk = store.geometry.chunk_size
        self._size = store.geometry.disk_size
        self._name = f"epoch-{epoch}"

    @property
    def name(self) -> str:
        return self._name

    @property
    def size(self) -> int:
        return self._size

    @property
    def readonly(self) -> bool:
        return True

    def chunk_extents(self) -> list[Extent]:
        return merge(
            Extent(c * self._chunk, min(self._chunk, self._size - c * self._chunk))
            for c in sorted(self._held)
        )

    def manifest(self) -> EpochManifest:
        entries = []
        for chunk in sorted(self._held):
            offset = chunk * self._chunk
            length = min(self._chunk, self._size - offset)
            data = self._store.read_slot(self._held[chunk], 0, length)
            entries.append(ManifestEntry(offset, length, chunk_hash(data)))
        return EpochManifest.of(tuple(entries))

    def manifest_from(self, records: Mapping[int, ChunkRecord]) -> EpochManifest | None:
        """The manifest from a finished transfer's checkpoint records (chunk index: the
        hash of the chunk as read from its held slot, None if all zero); None if a held
        chunk has no record (nothing was sent: the manifest must be hashed afresh)."""
        entries = []
        for chunk in sorted(self._held):
            record = records.get(chunk)
            if record is None:
                return None
            offset = chunk * self._chunk
            length = min(self._chunk, self._size - offset)
            digest = zero_hash(length) if record.digest is None else record.digest
            entries.append(ManifestEntry(offset, length, digest))
        return EpochManifest.of(tuple(entries))

    async def read(self, offset: int, length: int) -> bytes:
        check_range(self._name, self._size, offset, length)
        out = bytearray(length)
        pos = offset
        while pos < offset + length:
            chunk, start = divmod(pos, self._chunk)
            size = min(self._chunk - start, offset + length - pos)
            slot = self._held.get(chunk)
            if slot is not None:
                out[pos - offset : pos - offset + size] = self._store.read_slot(slot, start, size)
            pos += size
        return bytes(out)

    async def read_into(self, offset: int, buffer: bytearray | memoryview) -> None:
        """Fill ``buffer`` straight from the held slots (the data path's reads use this);
        a large read in a thread: held slots never change."""
        view = memoryview(buffer).cast("B")
        check_range(self._name, self._size, offset, len(view))
        if len(view) >= THREADED_READ:
            await asyncio.to_thread(self._read_into, offset, view)
        else:
            self._read_into(offset, view)

    def _read_into(self, offset: int, view: memoryview) -> None:
        pos, end = offset, offset + len(view)
        while pos < end:
            chunk, start = divmod(pos, self._chunk)
            size = min(self._chunk - start, end - pos)
            target = view[pos - offset : pos - offset + size]
            slot = self._held.get(chunk)
            if slot is not None:
                self._store.read_slot_into(slot, start, target)
            else:
                target[:] = bytes(size)
            pos += size

    async def write(self, offset: int, data: bytes | memoryview) -> None:
        raise read_only_error(self._name)

    async def zero(self, offset: int, length: int, *, punch_hole: bool = False) -> None:
        raise read_only_error(self._name)

    async def flush(self) -> None:
        return None

    async def extents(self, offset: int = 0, length: int | None = None) -> list[Extent]:
        if length is None:
            length = self._size - offset
        end = offset + length
        found: list[Extent] = []
        pos = offset
        for extent in self.chunk_extents():
            start, stop = max(extent.start, offset), min(extent.end, end)
            if start >= stop:
                continue
            if pos < start:
                found.append(Extent(pos, start - pos, zero=True, hole=True))
            found.append(Extent(start, stop - start))
            pos = stop
        if pos < end:
            found.append(Extent(pos, end - pos, zero=True, hole=True))
        return found

    async def close(self) -> None:
        return None


class EpochShipper:
    """Ships one disk's cut epochs, in order, one at a time, until stopped."""

    def __init__(
        self,
        disk_id: str,
        disk: CacheDisk,
        sink: EpochSink,
        token: Callable[[], int],
        settings: CacheSettings,
        bandwidth: TokenBucket,
    ) -> None:
        self._disk_id = disk_id
        self._disk = disk
        self.sink = sink
        self._token = token
        self._settings = settings
        self._bandwidth = bandwidth
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._checkpoints: dict[int, MemoryCheckpointStore] = {}
        self.shipping: int | None = None
        self.attempts = 0
        self.failures = 0
        self.stale = False
        """Stopped by a stale token: another owner has the disk (see :meth:`resume`)."""
        self.fenced_by = 0
        """The token on-prem held when it refused ours."""
        self.fenced = asyncio.Event()
        """Set when a stale token stopped shipping (tests)."""
        self.already_committed = 0
        """Epochs found committed on-prem when staged (a lost commit reply), in all."""
        self.mismatches = 0
        """Chunks a hashed write found damaged on the way (and sent again), in all."""
        self.bytes_shipped = 0
        """Bytes written to on-prem staging, resends included, in all."""
        self.failed = asyncio.Event()
        """Set at each failed attempt (tests clear it)."""
        self.committed_event = asyncio.Event()
        self.committed_mono: float | None = (
            time.monotonic() if disk.store.dirty_slots == 0 else None
        )
        """When on-prem last held all the disk's content up to an epoch (its last commit,
        or the open of a disk with nothing dirty); None: not known since this process began."""
        disk.on_cut = lambda epoch: self._wake.set()

    def start(self) -> None:
        self._wake.set()  # epochs cut before a restart ship at once
        self._task = asyncio.create_task(self._run())

    def resume(self, token: int) -> bool:
        """The disk was taken over with ``token``: shipping stopped by a stale token
        restarts if on-prem will take it (``token`` at least the one it refused ours
        for). True if it restarted."""
        if not self.stale or token < self.fenced_by:
            return False
        log.info("disk taken over: shipping restarts", disk_id=self._disk_id, token=token)
        self.stale = False
        self.start()
        return True

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def wait_committed(self, epoch: int) -> None:
        while self._disk.store.committed < epoch:
            event = self.committed_event
            await event.wait()

    async def _run(self) -> None:
        store = self._disk.store
        while True:
            await self._wake.wait()
            self._wake.clear()
            while store.held:
                epoch = min(store.held)
                try:
                    await self._ship(epoch)
                    # Recorded here only once on-prem has it; a failure to record it (the
                    # cache's disk full) is retried like a failed shipment: on-prem's replay
                    # of a committed epoch is idempotent.
                    await self._disk.committed(epoch)
                except StaleToken as exc:
                    self.stale = True
                    self.fenced_by = exc.highest
                    self.fenced.set()
                    log.warning("epoch refused: stale token; shipping stops", error=str(exc))
                    return
                except Exception as exc:
                    if isinstance(exc, EpochRejected):
                        # What landed is gone (the I/O manager restarted and discarded
                        # the staging area): the next attempt sends the whole epoch,
                        # not only what the checkpoint says is still missing.
                        if self._checkpoints.pop(epoch, None) is not None:
                            log.warning("epoch rejected on-prem: sending all of it again")
                    self.failures += 1
                    self.failed.set()
                    log.info("epoch not shipped; retrying", epoch=epoch, error=repr(exc))
                    await asyncio.sleep(self._settings.retry_delay_s)
                    continue
                self.committed_mono = time.monotonic()
                self._checkpoints.pop(epoch, None)
                self.shipping = None
                event, self.committed_event = self.committed_event, asyncio.Event()
                event.set()

    async def _ship(self, epoch: int) -> None:
        self.attempts += 1
        self.shipping = epoch
        view = EpochView(self._disk.store, epoch)
        token = self._token()
        staged = await self._stage(epoch, token)
        await self._send(epoch, view, staged)
        # The transfer hashed every chunk it sent and verified (its checkpoint records):
        # those are the manifest's hashes. Hashed afresh only if it sent nothing.
        checkpoint = self._checkpoints.get(epoch)
        manifest = view.manifest_from(checkpoint.records) if checkpoint is not None else None
        if manifest is None:
            # Held slots never change, so a thread may read them while writes go on.
            manifest = await asyncio.to_thread(view.manifest)
        await self.sink.commit(self._disk_id, epoch, token, manifest)

    async def _send(
        self, epoch: int, view: EpochView, staged: tuple[NbdAddress, str] | None
    ) -> None:
        """Copy the epoch's chunks to its staging export (nothing if on-prem has it)."""
        extents = view.chunk_extents()
        if extents and staged is not None:
            address, export = staged
            target = await NbdBackend.connect(address, export)
            try:
                transfer = Transfer(
                    f"{self._disk_id}/epoch-{epoch}",
                    view,
                    target,
                    checkpoints=self._checkpoints.setdefault(epoch, MemoryCheckpointStore()),
                    extents=extents,
                    options=TransferOptions(
                        chunk_size=self._disk.store.geometry.chunk_size,
                        workers=self._settings.ship_workers,
                        whole_image_check=False,
                    ),
                    bandwidth=self._bandwidth,
                )
                try:
                    await transfer.run()
                finally:
                    self.mismatches += transfer.stats.mismatches
                    self.bytes_shipped += transfer.stats.bytes_written
            finally:
                await target.close()

    async def _stage(self, epoch: int, token: int) -> tuple[NbdAddress, str] | None:
        """The staging export of ``epoch``; None if on-prem has committed it already.

        That happens when the commit's reply was lost (this cache restarted, or the
        link failed, after on-prem recorded the commit): nothing is sent again, and
        the commit that follows is on-prem's idempotent replay, which checks that
        the manifest is the one it committed.
        """
        try:
            return await self.sink.stage(self._disk_id, epoch, token)
        except EpochOutOfOrder as refused:
            if refused.expected <= epoch:
                raise
            self.already_committed += 1
            return None
