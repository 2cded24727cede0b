"""The on-prem I/O manager as a component process: orders in, epochs answered, figures out.

``make_runtime(config)`` gives the :class:`OnpremRuntime` the process runs
(``ferry-appliance component onprem ...``). Orders:

* ``open``: ``params`` ``disk_dir`` (the lab/layered disk's directory on this
  host) and ``snapshot_id`` (its migrate-time snapshot); serves
  ``snap/<disk>`` and ``cur/<disk>``; ``result``: ``address`` (HOST:PORT of
  the NBD server), ``current``, ``snapshot`` (export names);
* ``close``: stops serving the disk (its journal stays); ``result``: what the journal
  says once it is closed (``journal``: ``ok``, ``absent`` or ``corrupt``;
  ``applied_epoch``; ``committed_prefix``: true when the image is exactly the snapshot
  plus epochs 1..applied_epoch, nothing half-applied): a recovery's verdict;
* ``cut_epoch``: refused ``invalid``: epochs are cut by the cache.
* Data lost: an ``open`` of a disk this instance served before whose journal is gone (the
  data directory lost) fails ``data_lost``: nothing can say any more which epochs its
  image holds (the appliance sends the VMs on it back, to ``_HDM_RECOVERYFAILED``).

With ``link_zstd`` on, the NBD server is also reached compressed through a
:class:`~appliance.datapath.link.ZstdRelay` listening at ``link_zstd_bind``;
the open result then carries ``zstd_address`` (HOST:PORT): the address the
cache's open order gives as ``upstream``.

A stale token raises the core's ``StaleToken`` (refused by the order desk).
Epoch requests from the cache (stage, commit) are answered by an
:class:`~appliance.components.epochs.EpochService` over Redis. Disks open at a
restart are reopened from ``adapter-disks.json`` before any order or epoch
request is handled.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Mapping
from contextlib import AsyncExitStack
from dataclasses import replace
from pathlib import Path
from types import TracebackType
from typing import Self

from appliance.components.adapter_state import AdapterState, data_lost
from appliance.components.epochs import EpochService, parse_address
from appliance.components.onprem import (
    CommitHook,
    OnpremDiskOrder,
    OnpremIoManager,
    current_export,
    read_journal,
    snapshot_export,
)
from appliance.components.orders import Order, OrderAction, OrderOutcome, OutcomeCode
from appliance.components.runtimes import ComponentConfig
from appliance.datapath.link import ZstdRelay
from appliance.datapath.nbd.channel import TcpAddress
from appliance.errors import FerryError, JournalCorrupt
from appliance.logs import get_logger
from appliance.state.keys import Keys
from appliance.state.store import StateStore, connect

log = get_logger(__name__)


def make_runtime(config: ComponentConfig) -> OnpremRuntime:
    return OnpremRuntime(config)


def disk_order(order: Order) -> OnpremDiskOrder | str:
    """The core's order for an ``open``, or why the params do not make one."""
    disk_dir = order.params.get("disk_dir")
    snapshot_id = order.params.get("snapshot_id")
    if not isinstance(disk_dir, str) or not disk_dir:
        return "an on-prem open needs params.disk_dir (a path)"
    if not isinstance(snapshot_id, str) or not snapshot_id:
        return "an on-prem open needs params.snapshot_id"
    return OnpremDiskOrder(
        order.migration_id, order.disk_id, order.token, Path(disk_dir), snapshot_id
    )


class OnpremRuntime:
    def __init__(self, config: ComponentConfig, commit_hook: CommitHook | None = None) -> None:
        """``commit_hook``: called after each step of an epoch's commit (the fault suite
        holds a commit there to kill the process; see appliance/components/onprem/commit.py)."""
        self._config = config
        self._commit_hook = commit_hook
        self._stack = AsyncExitStack()
        self._state = AdapterState(config.data_dir)
        self._stop = asyncio.Event()
        self._restoring: asyncio.Task[None] | None = None
        self._serving: asyncio.Task[None] | None = None
        self._manager: OnpremIoManager | None = None
        self._service: EpochService | None = None
        self._relay: ZstdRelay | None = None
        self._store: StateStore | None = None
        self._lost: dict[str, str] = {}  # disk -> migration: served before, its journal gone

    @property
    def manager(self) -> OnpremIoManager:
        if self._manager is None:
            raise RuntimeError("the on-prem runtime is not entered")
        return self._manager

    async def __aenter__(self) -> Self:
        config = self._config
        async with AsyncExitStack() as stack:
            store = StateStore(connect(config.redis_url), Keys(config.redis_prefix))
            stack.push_async_callback(store.close)
            self._store = store
            address = TcpAddress(config.nbd_host, config.nbd_port)
            self._manager = await stack.enter_async_context(
                OnpremIoManager(config.data_dir, address=address, commit_hook=self._commit_hook)
            )
            if config.settings.link_zstd:
                self._relay = await stack.enter_async_context(
                    ZstdRelay(
                        parse_address(config.settings.link_zstd_bind),
                        _reachable(self._manager.address),
                        accepts="zstd",
                        level=config.settings.link_zstd_level,
                    )
                )
            await self._state.load()
            self._restoring = asyncio.create_task(self._restore())
            self._service = EpochService(store, config.instance, self._manager, ready=self._ready)
            self._serving = asyncio.create_task(self._service.run(self._stop))
            self._stack = stack.pop_all()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stop.set()
        if self._restoring is not None:
            self._restoring.cancel()
        for task in (self._restoring, self._serving):
            if task is not None:
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        await self._stack.aclose()

    async def _ready(self) -> None:
        if self._restoring is not None:
            await asyncio.shield(self._restoring)

    async def _restore(self) -> None:
        """Reopen the disks that were open when the process last stopped."""
        for disk_id, entry in sorted(self._state.disks.items()):
            wanted = disk_order(entry.order)
            if isinstance(wanted, str):
                continue
            try:
                # A later owner may have spoken since the open (an epoch request with its
                # token): reopen with the highest token the disk accepted.
                highest = await asyncio.to_thread(_highest_token, self.manager, disk_id)
                wanted = replace(wanted, token=max(wanted.token, highest))
                await self.manager.open_disk(wanted)
            except FerryError as error:
                log.error("disk not reopened", disk_id=disk_id, error=str(error))
            except Exception:
                log.exception("disk not reopened", disk_id=disk_id)

    async def apply(self, order: Order) -> OrderOutcome:
        await self._ready()
        if order.action in (OrderAction.CUT_EPOCH, OrderAction.RECONCILE):
            reason = f"the on-prem I/O manager does not {order.action.value}: the cache does"
            return OrderOutcome.refused(order, OutcomeCode.INVALID, reason)
        if order.action is OrderAction.CLOSE:
            epoch = await self.manager.close_disk(order.disk_id, order.token)
            await self._state.closed(order.disk_id)
            # The epoch its image was left at (a reset reports it): only when it was open;
            # and what its journal says (a recovery's verdict).
            verdict = await self._verdict(order.disk_id)
            left_at = {} if epoch is None else {"epoch": epoch}
            return OrderOutcome.applied(order, closed=True, **verdict, **left_at)
        wanted = disk_order(order)
        if isinstance(wanted, str):
            return OrderOutcome.refused(order, OutcomeCode.INVALID, wanted)
        lost = await self._data_lost(order)
        if lost is not None:
            self._lost[order.disk_id] = order.migration_id
            log.error("disk data lost", disk_id=order.disk_id, reason=lost)
            return OrderOutcome.data_lost(order, lost)
        await self.manager.open_disk(wanted)
        await self._state.opened(order)
        zstd = {} if self._relay is None else {"zstd_address": str(self._relay.address)}
        return OrderOutcome.applied(
            order,
            address=str(self.manager.address),
            current=current_export(order.disk_id),
            snapshot=snapshot_export(order.disk_id),
            **zstd,
        )

    async def _data_lost(self, order: Order) -> str | None:
        if order.disk_id in self._state.disks or self._store is None:
            return None
        journal = self.manager.journal_path(order.disk_id)
        exists = await asyncio.to_thread(journal.exists)
        return await data_lost(self._store, self._config.instance, order, exists)

    async def _verdict(self, disk_id: str) -> dict[str, str | int | bool]:
        """What the disk's journal says, read once the disk is closed (nothing changes it)."""
        path = self.manager.journal_path(disk_id)
        if not await asyncio.to_thread(path.exists):
            return {"journal": "absent", "applied_epoch": 0, "committed_prefix": True}
        try:
            state = await asyncio.to_thread(read_journal, path)
        except JournalCorrupt as error:
            return {"journal": "corrupt", "reason": str(error)[:500], "committed_prefix": False}
        return {
            "journal": "ok",
            "applied_epoch": state.applied_epoch,
            "committed_prefix": state.committed_prefix,
        }

    def status(self) -> Mapping[str, object]:
        if self._manager is None:
            return {"runtime": "onprem", "state": "starting"}
        status = self._manager.status()
        return {
            "runtime": "onprem",
            "address": str(status.address),
            "exports": list(status.exports),
            "committed_epoch": status.committed_epochs,
            "epochs_staged": {disk: list(epochs) for disk, epochs in status.epochs_staged.items()},
            "epoch_requests_answered": self._service.answered if self._service else 0,
            "epochs_refused_stale": dict(self._service.refused_stale) if self._service else {},
            "data_lost": dict(self._lost),
            "epochs_applied": self._manager.epochs_applied,
            "bytes_applied": self._manager.bytes_applied,
            "bytes_staged": self._manager.staged.bytes,
            **self._link_status(),
        }

    def _link_status(self) -> dict[str, object]:
        relay = self._relay
        if relay is None:
            return {}
        return {
            "zstd_address": str(relay.address),
            "link_zstd": {"plain_bytes": relay.plain_bytes, "wire_bytes": relay.wire_bytes},
        }


def _reachable(address: object) -> TcpAddress:
    """The NBD server's address as the relay beside it dials it (a wildcard bind is
    reached on loopback)."""
    if not isinstance(address, TcpAddress):
        raise ValueError(f"link_zstd needs the NBD server on TCP, not {address}")
    if address.host in ("", "0.0.0.0", "::"):
        return TcpAddress("127.0.0.1", address.port)
    return address


def _highest_token(manager: OnpremIoManager, disk_id: str) -> int:
    """The highest token the disk accepted (``disks/<disk>/token``, README's format)."""
    try:
        token = json.loads((manager.disk_root(disk_id) / "token").read_text())["token"]
    except (FileNotFoundError, ValueError, KeyError):
        return 0
    return token if isinstance(token, int) else 0
