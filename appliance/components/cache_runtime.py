"""The cloud cache as a component process: orders in, epochs shipped on-prem, figures out.

``make_runtime(config)`` gives the :class:`CacheRuntime` the process runs
(``ferry-appliance component cache ...``). Orders:

* ``open``: ``params`` ``size`` (bytes), ``upstream`` (HOST:PORT of the on-prem
  I/O manager's NBD server as this host reaches it: through the WAN link),
  ``upstream_export`` (default ``cur/<disk>``), ``onprem`` (the I/O manager's
  instance name, e.g. ``onprem-1``: where epochs go, through Redis), and
  optionally ``working_set`` (bytes); ``result``: ``address`` (HOST:PORT of the
  cache's NBD server) and ``export`` (the VM's disk). A higher token for an
  open disk takes it over (and restarts shipping stopped by a stale token).
* ``cut_epoch``: cuts the disk's next epoch when ``epoch_request`` is above the
  last one carried out (else the same answer again); ``result``: ``epoch``.
  Shipping and the on-prem commit follow in the background: the heartbeat's
  ``committed_epoch`` says when it is done.
* ``close``: stops serving and shipping the disk (its cache stays on disk).
* Data lost: an order for a disk this instance served before (its outcome is in Redis) whose
  files are gone (the data directory lost with its dirty data) is not carried out: a fresh
  empty cache would silently roll the VM's disk back to on-prem's last epoch. It fails with
  code ``data_lost`` and the heartbeat's ``data_lost`` {disk: migration} names it: the
  appliance sends the VMs on it back to their last committed epoch (recovery).
* ``reconcile``: a reconcile pass to the volume ``params`` name (``pass``, ``volume``
  and ``volume_export`` or ``volume_path``, optional ``workers``;
  :mod:`appliance.components.reconciling`); ``result``: the pass's figures.

Epochs go to the I/O manager through a
:class:`~appliance.components.epochs.RedisEpochSink`; the staging exports are
reached at the ``upstream`` address (the same NBD server as ``cur/``).

With ``link_zstd`` on (both components), ``upstream`` is the I/O manager's
compressed listener (its open result's ``zstd_address``): misses and epoch
shipping go through a local :class:`~appliance.datapath.link.ZstdRelay`
(one per upstream address) that compresses what crosses the WAN.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Mapping
from contextlib import AsyncExitStack
from dataclasses import replace
from types import TracebackType
from typing import Self

from appliance.components.adapter_state import AdapterState, data_lost
from appliance.components.cache.cache import CacheDiskOrder, CacheStatus, CloudCache, Discard
from appliance.components.cache.image import image_export
from appliance.components.cache.sizing import CacheSettings, Profile
from appliance.components.epochs import RedisEpochSink, parse_address
from appliance.components.onprem import current_export
from appliance.components.orders import (
    ComponentId,
    ComponentKind,
    Order,
    OrderAction,
    OrderOutcome,
    OutcomeCode,
)
from appliance.components.reconciling import parse_pass, parse_volume
from appliance.components.runtimes import ComponentConfig
from appliance.datapath.link import LinkWatch, ZstdRelay
from appliance.datapath.nbd.channel import TcpAddress
from appliance.errors import DiskNotOpen, FerryError
from appliance.logs import get_logger
from appliance.settings import Settings
from appliance.state.keys import Keys
from appliance.state.store import StateStore, connect

log = get_logger(__name__)


def make_runtime(config: ComponentConfig) -> CacheRuntime:
    return CacheRuntime(config)


def cache_settings(settings: Settings) -> CacheSettings:
    return CacheSettings(
        chunk_size=settings.cache_chunk_size,
        profile=Profile(settings.cache_profile),
        scale=settings.cache_scale,
        rpo_dirty_bytes=settings.cache_rpo_dirty_bytes,
        ship_workers=settings.cache_ship_workers,
        bandwidth_bytes_per_s=settings.cache_bandwidth_bytes_per_s,
        retry_delay_s=settings.cache_retry_delay_s,
        upstream_timeout_s=settings.cache_upstream_timeout_s or settings.wan_down_threshold_s,
    )


def link_watch(settings: Settings) -> LinkWatch:
    """The WAN link's probes, as often as the heartbeat; a greeting late by a few beats
    (at least 1 s, at most 10 s) counts as down."""
    interval = settings.component_heartbeat_interval_s
    return LinkWatch(interval_s=interval, probe_s=min(10.0, max(1.0, 4 * interval)))


class CacheRuntime:
    def __init__(self, config: ComponentConfig) -> None:
        self._config = config
        self._stack = AsyncExitStack()
        self._state = AdapterState(config.data_dir)
        self._store: StateStore | None = None
        self._cache: CloudCache | None = None
        self._sinks: dict[str, RedisEpochSink] = {}
        self._relays: dict[TcpAddress, ZstdRelay] = {}
        self._restoring: asyncio.Task[None] | None = None
        self._link = link_watch(config.settings)
        self._link_stop = asyncio.Event()
        self._lost: dict[str, str] = {}  # disk -> migration: served before, its data gone

    @property
    def cache(self) -> CloudCache:
        if self._cache is None:
            raise RuntimeError("the cache runtime is not entered")
        return self._cache

    async def __aenter__(self) -> Self:
        config = self._config
        async with AsyncExitStack() as stack:
            self._store = StateStore(connect(config.redis_url), Keys(config.redis_prefix))
            stack.push_async_callback(self._store.close)
            self._cache = await stack.enter_async_context(
                CloudCache(
                    config.data_dir,
                    cache_settings(config.settings),
                    address=TcpAddress(config.nbd_host, config.nbd_port),
                )
            )
            await self._state.load()
            self._restoring = asyncio.create_task(self._restore())
            watching = asyncio.create_task(self._link.run(self._link_stop))
            stack.push_async_callback(_stopped, watching, self._link_stop)
            self._stack = stack.pop_all()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._restoring is not None:
            self._restoring.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._restoring
        await self._stack.aclose()

    async def _restore(self) -> None:
        """Reopen the disks that were open when the process last stopped."""
        for disk_id, entry in sorted(self._state.disks.items()):
            try:
                wanted = await self._disk_order(entry.order)
                if isinstance(wanted, CacheDiskOrder):
                    # A later owner's cut may have raised the disk's token since the open.
                    token = max(wanted.token, self.cache.token(disk_id))
                    await self.cache.open_disk(replace(wanted, token=token))
            except FerryError as error:
                log.error("cache disk not reopened", disk_id=disk_id, error=str(error))
            except Exception:
                log.exception("cache disk not reopened", disk_id=disk_id)

    async def _ready(self) -> None:
        if self._restoring is not None:
            await asyncio.shield(self._restoring)

    async def _disk_order(self, order: Order) -> CacheDiskOrder | str:
        """The core's order for an ``open``, or why the params do not make one."""
        params = order.params
        size, upstream, onprem = params.get("size"), params.get("upstream"), params.get("onprem")
        working_set = params.get("working_set")
        export = params.get("upstream_export", current_export(order.disk_id))
        if not isinstance(size, int) or size <= 0:
            return "a cache open needs params.size (bytes)"
        if not isinstance(upstream, str) or not isinstance(onprem, str):
            return "a cache open needs params.upstream (HOST:PORT) and params.onprem (a name)"
        if not isinstance(export, str) or not (working_set is None or isinstance(working_set, int)):
            return "params.upstream_export is a string and params.working_set bytes"
        try:
            address = parse_address(upstream)
            instance = ComponentId(ComponentKind.ONPREM.value, onprem)
        except ValueError as error:
            return str(error)
        if self._config.settings.link_zstd:
            address = await self._through_zstd(address)
        self._link.use(order.disk_id, address)
        assert self._store is not None
        sink = RedisEpochSink(
            self._store,
            instance,
            address=address,
            timeout_s=self._config.settings.component_epoch_timeout_s,
        )
        self._sinks[order.disk_id] = sink
        return CacheDiskOrder(
            order.migration_id,
            order.disk_id,
            order.token,
            size,
            address,
            export,
            sink,
            working_set,
        )

    async def apply(self, order: Order) -> OrderOutcome:
        await self._ready()
        lost = await self._data_lost(order)
        if lost is not None:
            self._lost[order.disk_id] = order.migration_id
            log.error("disk data lost", disk_id=order.disk_id, reason=lost)
            return OrderOutcome.data_lost(order, lost)
        if order.action is OrderAction.OPEN:
            return await self._open(order)
        if order.action is OrderAction.CLOSE:
            wanted = str(order.params.get("discard", Discard.KEEP.value))
            if wanted not in set(Discard):
                reason = f"discard must be one of {', '.join(Discard)}, not {wanted!r}"
                return OrderOutcome.refused(order, OutcomeCode.INVALID, reason)
            await self.cache.close_disk(order.disk_id, order.token, discard=Discard(wanted))
            self._sinks.pop(order.disk_id, None)
            self._link.release(order.disk_id)
            await self._state.closed(order.disk_id)
            return OrderOutcome.applied(order, closed=True)
        entry = self._state.disks.get(order.disk_id)
        if entry is None or order.disk_id not in self.cache.status().exports:
            raise DiskNotOpen(order.disk_id)
        if order.action is OrderAction.RECONCILE:
            return await self._reconcile(order)
        if order.epoch_request <= entry.cut_request:
            return OrderOutcome.applied(order, epoch=entry.cut_epoch)  # that cut was made
        epoch = await self.cache.cut_epoch(order.disk_id, order.token)
        await self._state.cut(order.disk_id, order.epoch_request, epoch)
        return OrderOutcome.applied(order, epoch=epoch)

    async def _data_lost(self, order: Order) -> str | None:
        """Why this disk cannot be served (an earlier run of this instance served it and its
        files are gone), or None."""
        if order.disk_id in self._state.disks:
            return None
        where = self._config.data_dir / "disks" / order.migration_id / order.disk_id
        assert self._store is not None
        exists = await asyncio.to_thread(where.exists)  # closed, kept: a reopen
        return await data_lost(self._store, self._config.instance, order, exists)

    async def _reconcile(self, order: Order) -> OrderOutcome:
        wanted, volume = parse_pass(order.params), parse_volume(order.params)
        if isinstance(wanted, str) or isinstance(volume, str):
            reason = wanted if isinstance(wanted, str) else str(volume)
            return OrderOutcome.refused(order, OutcomeCode.INVALID, reason)
        pass_no, workers = wanted
        done = await self.cache.reconcile(
            order.disk_id, order.token, pass_no, volume, workers=workers
        )
        return OrderOutcome.applied(order, **done.as_result())

    async def _open(self, order: Order) -> OrderOutcome:
        wanted = await self._disk_order(order)
        if isinstance(wanted, str):
            return OrderOutcome.refused(order, OutcomeCode.INVALID, wanted)
        export = await self.cache.open_disk(wanted)  # a takeover restarts stopped shipping
        await self._state.opened(order)
        return OrderOutcome.applied(
            order,
            address=str(self.cache.server.address),
            export=export,
            image=image_export(order.disk_id),
        )

    async def _through_zstd(self, upstream: TcpAddress) -> TcpAddress:
        """The local end of a compressed link to ``upstream`` (started at first use, kept
        until the runtime stops)."""
        relay = self._relays.get(upstream)
        if relay is None:
            relay = ZstdRelay(
                TcpAddress("127.0.0.1", 0),
                upstream,
                accepts="plain",
                level=self._config.settings.link_zstd_level,
            )
            await relay.start()
            self._stack.push_async_callback(relay.stop)
            self._relays[upstream] = relay
        return relay.address

    def _reconcile_progress(self, status: CacheStatus) -> dict[str, dict[str, object]]:
        """Each disk's reconcile pass under way: bytes done of its total, rate, ETA."""
        found: dict[str, dict[str, object]] = {}
        for disk in status.disks:
            progress = self.cache.reconcile_progress(disk.disk_id)
            if progress is not None:
                found[disk.disk_id] = {
                    "pass": disk.reconcile_pass,
                    "bytes_done": progress.bytes_done,
                    "bytes_total": progress.bytes_total,
                    "rate_bytes_per_s": round(progress.rate_bytes_per_s),
                    "eta_s": progress.eta_s,
                }
        return found

    def status(self) -> Mapping[str, object]:
        if self._cache is None:
            return {"runtime": "cache", "state": "starting"}
        status = self._cache.status()
        ids = [disk.disk_id for disk in status.disks]
        return {
            "runtime": "cache",
            "address": str(self._cache.server.address),
            "exports": list(status.exports),
            "dirty_bytes": status.dirty_bytes,
            "cache_bytes": status.cache_bytes,
            "cache_bytes_per_disk": {disk.disk_id: disk.cache_bytes for disk in status.disks},
            "committed_age_s": {disk: self.cache.committed_age(disk) for disk in ids},
            "capacity_bytes": sum(disk.capacity_bytes for disk in status.disks),
            "open_epoch": {disk.disk_id: disk.open_epoch for disk in status.disks},
            "epochs_in_flight": {
                disk.disk_id: list(disk.epochs_in_flight) for disk in status.disks
            },
            "committed_epoch": {disk.disk_id: disk.committed_epoch for disk in status.disks},
            "dirty_bytes_per_disk": {disk.disk_id: disk.dirty_bytes for disk in status.disks},
            "reconcile_pass": {disk.disk_id: disk.reconcile_pass for disk in status.disks},
            "read_hits": {disk.disk_id: disk.read_hits for disk in status.disks},
            "read_misses": {disk.disk_id: disk.read_misses for disk in status.disks},
            "bytes_shipped": {disk.disk_id: disk.bytes_shipped for disk in status.disks},
            "ship_failures": {disk.disk_id: disk.ship_failures for disk in status.disks},
            "chunks_resent": {disk.disk_id: disk.chunks_resent for disk in status.disks},
            "reconcile_progress": self._reconcile_progress(status),
            "link_zstd": {
                str(upstream): {"plain_bytes": relay.plain_bytes, "wire_bytes": relay.wire_bytes}
                for upstream, relay in self._relays.items()
            },
            "wan_link": self._link.report(),
            "shipping_refused": {
                disk: sink.refused[disk]
                for disk, sink in self._sinks.items()
                if disk in sink.refused
            },
            "data_lost": dict(self._lost),
        }


async def _stopped(task: asyncio.Task[None], stop: asyncio.Event) -> None:
    stop.set()
    await task
