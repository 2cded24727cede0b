"""``CloudCache``: the cloud write-back cache component's core (its process wraps it).

    async with CloudCache(data_dir, settings) as cache:
        export = await cache.open_disk(order)        # the VM's disk: cache.server.url(export)
        epoch = await cache.cut_epoch(disk_id, token) # ships and commits in the background
        await cache.wait_committed(disk_id, epoch)
        result = await cache.reconcile(disk_id, token, pass_no, volume)  # reconcile.py
        cache.status()                                # CacheStatus: a frozen snapshot

Data directory::

    tokens.json              {disk_id: highest fencing token accepted} (atomic replace)
    disks/<migration_id>/<disk_id>/   one CacheStore (geometry.json, slots, journal);
                                      a new migration of a disk starts from an empty cache

Orders carry the owner's fencing token: a lower token than the highest one
accepted for that disk raises ``StaleToken``; the same order twice is a
no-op; a higher token takes the disk over (shipping then uses it, and
shipping that on-prem stopped for a stale token restarts once the new token
is at least the one on-prem holds).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from types import TracebackType
from typing import Self

import structlog

from appliance.components.cache.disk import CacheDisk
from appliance.components.cache.image import CacheImage, image_export
from appliance.components.cache.reconcile import (
    DEFAULT_WORKERS,
    PassResult,
    Reconciler,
    VolumeTarget,
)
from appliance.components.cache.shipping import EpochShipper, EpochSink
from appliance.components.cache.sizing import CacheSettings
from appliance.components.cache.store import CacheStore
from appliance.components.cache.upstream import Upstream
from appliance.datapath.nbd.channel import NbdAddress
from appliance.datapath.nbd.server import NbdServer
from appliance.datapath.progress import TransferProgress
from appliance.datapath.throttle import TokenBucket
from appliance.errors import CacheDiscardRefused, Conflict, StaleToken, UnsafeName
from appliance.storage.bitmap import write_atomically

log = structlog.get_logger(__name__)

_SAFE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


class Discard(StrEnum):
    """What a close does with the disk's cache files (a close order's ``discard`` param)."""

    KEEP = "keep"
    IF_CLEAN = "if_clean"
    ALWAYS = "always"


@dataclass(frozen=True, slots=True)
class CacheDiskOrder:
    migration_id: str
    disk_id: str
    token: int
    size: int
    upstream: NbdAddress
    """The on-prem I/O manager's current image of the disk (through the WAN link)."""
    upstream_export: str
    sink: EpochSink
    working_set: int | None = None


@dataclass(frozen=True, slots=True)
class DiskStatus:
    disk_id: str
    migration_id: str
    export: str
    capacity_bytes: int
    cache_bytes: int
    dirty_bytes: int
    written_chunks: int
    open_epoch: int
    epochs_in_flight: tuple[int, ...]
    committed_epoch: int
    reconcile_pass: int = 0
    """The last reconcile pass begun (0: none); giving it again is always safe."""
    read_hits: int = 0
    read_misses: int = 0
    bytes_shipped: int = 0
    ship_failures: int = 0
    chunks_resent: int = 0


@dataclass(frozen=True, slots=True)
class CacheStatus:
    disks: tuple[DiskStatus, ...]

    @property
    def exports(self) -> tuple[str, ...]:
        return tuple(disk.export for disk in self.disks)

    @property
    def dirty_bytes(self) -> int:
        return sum(disk.dirty_bytes for disk in self.disks)

    @property
    def cache_bytes(self) -> int:
        return sum(disk.cache_bytes for disk in self.disks)


@dataclass(slots=True)
class _Open:
    order: CacheDiskOrder
    disk: CacheDisk
    shipper: EpochShipper
    timer: asyncio.Task[None]
    reconciler: Reconciler


async def _cut_every(
    disk: CacheDisk, interval: Callable[[], float | None], changed: Callable[[], asyncio.Event]
) -> None:
    """Cut an epoch each interval in which the disk was written; re-read the interval
    at once when it changes."""
    while True:
        event = changed()
        seconds = interval()
        if seconds is None:
            await event.wait()
            continue
        try:
            async with asyncio.timeout(seconds):
                await event.wait()
        except TimeoutError:
            if disk.store.open_dirty:
                try:
                    await disk.cut_epoch()
                except Exception as exc:
                    log.warning("timed epoch cut failed", disk=disk.name, error=repr(exc))


class CloudCache:
    def __init__(
        self,
        data_dir: Path,
        settings: CacheSettings | None = None,
        *,
        address: NbdAddress | None = None,
    ) -> None:
        self._dir = data_dir
        self._settings = settings or CacheSettings()
        self.server = NbdServer(address=address)
        self._disks: dict[str, _Open] = {}
        self._tokens: dict[str, int] = {}
        self._lock = asyncio.Lock()
        self._bandwidth = TokenBucket(self._settings.bandwidth_bytes_per_s)
        self._interval = self._settings.epoch_interval_s
        self._interval_changed = asyncio.Event()

    async def __aenter__(self) -> Self:
        self._dir.mkdir(parents=True, exist_ok=True)
        self._tokens = _load_tokens(self._dir / "tokens.json")
        await self.server.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.server.stop()
        for disk_id in list(self._disks):
            await self._shut(disk_id)

    # -- orders ----------------------------------------------------------------

    async def open_disk(self, order: CacheDiskOrder) -> str:
        """Open (or reopen after a restart) a disk's cache and export it; its export name."""
        _check_id(order.disk_id)
        _check_id(order.migration_id)
        async with self._lock:
            await self._accept(order.disk_id, order.token)
            current = self._disks.get(order.disk_id)
            if current is not None:
                if (current.order.size, current.order.migration_id) != (
                    order.size,
                    order.migration_id,
                ):
                    raise Conflict(f"disk {order.disk_id} is open for another migration or size")
                current.order = order  # a takeover's token and sink; the same order: no-op
                current.shipper.sink = order.sink
                current.shipper.resume(order.token)  # restarts shipping a stale token stopped
                return order.disk_id
            upstream = Upstream(
                order.upstream,
                order.upstream_export,
                retry_delay_s=self._settings.retry_delay_s,
                timeout_s=self._settings.upstream_timeout_s,
            )
            upstream_map = await upstream.extents()
            slots = self._settings.slots(order.size, order.working_set)
            store = await asyncio.to_thread(
                CacheStore.open,
                self._dir / "disks" / order.migration_id / order.disk_id,
                order.size,
                self._settings.chunk_size,
                slots,
            )
            disk = CacheDisk(
                order.disk_id, store, upstream, self._settings, upstream_map=upstream_map
            )
            reconciler = await Reconciler.open(disk)  # before any commit: it keeps their chunks
            shipper = EpochShipper(
                order.disk_id,
                disk,
                order.sink,
                lambda: self.token(order.disk_id),
                self._settings,
                self._bandwidth,
            )
            timer = asyncio.create_task(
                _cut_every(disk, lambda: self._interval, lambda: self._interval_changed)
            )
            opened = _Open(order, disk, shipper, timer, reconciler)
            self._disks[order.disk_id] = opened
            opened.shipper.start()
            self.server.add_export(order.disk_id, disk)
            self.server.add_export(image_export(order.disk_id), CacheImage(disk), readonly=True)
            log.info("cache disk open", disk_id=order.disk_id, slots=slots)
            return order.disk_id

    async def cut_epoch(self, disk_id: str, token: int) -> int:
        """Cut the disk's open epoch now; its number. Shipping and commit follow."""
        async with self._lock:
            await self._accept(disk_id, token)
            opened = self._opened(disk_id)
        return await opened.disk.cut_epoch()

    async def reconcile(
        self,
        disk_id: str,
        token: int,
        pass_no: int,
        target: VolumeTarget,
        *,
        workers: int = DEFAULT_WORKERS,
    ) -> PassResult:
        """Reconcile pass ``pass_no``: what was written since the last pass's mark, to the
        volume (``reconcile.py``); the same number again answers the same result."""
        async with self._lock:
            await self._accept(disk_id, token)
            opened = self._opened(disk_id)
        return await opened.reconciler.run_pass(pass_no, target, workers=workers)

    async def close_disk(
        self, disk_id: str, token: int, *, discard: Discard = Discard.KEEP
    ) -> None:
        """Stop serving and shipping the disk; its cache stays on disk for a reopen unless
        ``discard`` says to remove it: ``IF_CLEAN`` only when nothing in it is waiting for
        an on-prem commit (else :class:`CacheDiscardRefused`, and the disk stays open),
        ``ALWAYS`` when its data is safe elsewhere (a warm VM's verified volume)."""
        async with self._lock:
            await self._accept(disk_id, token)
            opened = self._disks.get(disk_id)
            if opened is not None and discard is Discard.IF_CLEAN:
                status = self._disk_status(opened)
                if status.dirty_bytes or status.epochs_in_flight:
                    raise CacheDiscardRefused(disk_id, status.dirty_bytes)
            migration_id = opened.order.migration_id if opened is not None else None
            if opened is not None:
                await self._shut(disk_id)
            if discard is not Discard.KEEP and migration_id is not None:
                where = self._dir / "disks" / migration_id / disk_id
                await asyncio.to_thread(_remove_disk_dir, where)
                log.info("cache disk discarded", disk_id=disk_id, path=str(where))

    async def wait_committed(self, disk_id: str, epoch: int) -> None:
        await self._opened(disk_id).shipper.wait_committed(epoch)

    def set_bandwidth(self, bytes_per_s: float | None) -> None:
        """Cap the bytes per second all epoch shipping sends (None: unlimited), at once."""
        self._bandwidth.set_rate(bytes_per_s)

    def set_epoch_interval(self, seconds: float | None) -> None:
        """Cut epochs this often from now on (None: only on order or at the thresholds)."""
        self._interval = seconds
        event, self._interval_changed = self._interval_changed, asyncio.Event()
        event.set()

    def disk(self, disk_id: str) -> CacheDisk:
        return self._opened(disk_id).disk

    def written_chunks(self, disk_id: str) -> list[int]:
        """Every chunk written since the migration began (what reconcile applies)."""
        return self._opened(disk_id).disk.store.written_chunks()

    def reconcile_progress(self, disk_id: str) -> TransferProgress | None:
        """The progress of the disk's reconcile pass under way (None: none is)."""
        return self._opened(disk_id).reconciler.progress

    def token(self, disk_id: str) -> int:
        return self._tokens.get(disk_id, 0)

    def committed_age(self, disk_id: str) -> float | None:
        """Seconds since the disk's last commit on-prem (or since it opened with nothing
        dirty); None: not known since this process began. A status response's RPO lag."""
        opened = self._disks.get(disk_id)
        since = opened.shipper.committed_mono if opened is not None else None
        return None if since is None else round(time.monotonic() - since, 3)

    def status(self) -> CacheStatus:
        return CacheStatus(tuple(self._disk_status(o) for o in self._disks.values()))

    # -- internals ---------------------------------------------------------------

    def _disk_status(self, opened: _Open) -> DiskStatus:
        store = opened.disk.store
        chunk = store.geometry.chunk_size
        return DiskStatus(
            disk_id=opened.order.disk_id,
            migration_id=opened.order.migration_id,
            export=opened.order.disk_id,
            capacity_bytes=store.geometry.slots * chunk,
            cache_bytes=store.used_slots * chunk,
            dirty_bytes=store.dirty_slots * chunk,
            written_chunks=int.from_bytes(store.written, "big").bit_count(),
            open_epoch=store.open_epoch,
            epochs_in_flight=tuple(sorted(store.held)),
            committed_epoch=store.committed,
            reconcile_pass=opened.reconciler.last_pass,
            read_hits=opened.disk.read_hits,
            read_misses=opened.disk.read_misses,
            bytes_shipped=opened.shipper.bytes_shipped,
            ship_failures=opened.shipper.failures,
            chunks_resent=opened.shipper.mismatches,
        )

    def _opened(self, disk_id: str) -> _Open:
        opened = self._disks.get(disk_id)
        if opened is None:
            raise KeyError(f"disk {disk_id} is not open in this cache")
        return opened

    async def _accept(self, disk_id: str, token: int) -> None:
        highest = self._tokens.get(disk_id, 0)
        if token < highest:
            raise StaleToken(disk_id, token, highest)
        if token > highest:
            self._tokens[disk_id] = token
            tokens = dict(self._tokens)
            await asyncio.to_thread(_save_tokens, self._dir / "tokens.json", tokens)

    async def _shut(self, disk_id: str) -> None:
        opened = self._disks.pop(disk_id)
        self.server.remove_export(disk_id)
        self.server.remove_export(image_export(disk_id))
        opened.timer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await opened.timer
        await opened.shipper.stop()
        await opened.disk.shutdown()
        await opened.disk.upstream.close()
        opened.disk.store.close()


def _remove_disk_dir(where: Path) -> None:
    """The disk's cache files, and its migration's directory once no disk is left in it."""
    shutil.rmtree(where, ignore_errors=True)
    with contextlib.suppress(OSError):
        where.parent.rmdir()


def _check_id(disk_id: str) -> None:
    if not _SAFE_ID.fullmatch(disk_id) or disk_id in {".", ".."}:
        raise UnsafeName("cache", disk_id)


def _load_tokens(path: Path) -> dict[str, int]:
    if not path.exists():
        return {}
    raw = json.loads(path.read_text())
    return {str(key): int(value) for key, value in raw.items()}


def _save_tokens(path: Path, tokens: dict[str, int]) -> None:
    write_atomically(path, json.dumps(tokens, sort_keys=True).encode())
