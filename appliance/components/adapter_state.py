"""What a component adapter keeps across restarts: the disks it serves and the cuts it made.

The order desk carries each order out once (its ledger), so after a restart
nobody gives a disk's ``open`` order again: the adapter reopens the disks
itself from ``adapter-disks.json`` in its data directory::

    {"disks": {"disk-1": {"order": <the open order's JSON>,
                          "cut_request": 3, "cut_epoch": 3}}}

Written to a temporary file, fsynced, renamed, directory fsynced.

Data lost: the data directory may go (a disk failed, a host rebuilt) while Redis still
holds the orders. A restarted component would then carry out a disk's desired order from
nothing: a cache would serve an empty disk over on-prem's last epoch, silently dropping
what the VM wrote since. :func:`data_lost` tells that case apart (the component's own
outcome for the disk is in Redis, its files are not) so the runtime refuses instead.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from pathlib import Path

from appliance.components.orders import (
    ComponentId,
    ComponentKeys,
    Order,
    OrderAction,
    OrderOutcome,
    OutcomeCode,
    OutcomeKind,
)
from appliance.state.store import StateStore
from appliance.storage.bitmap import write_atomically

STATE_FILE = "adapter-disks.json"


@dataclass(frozen=True, slots=True)
class OpenedDisk:
    order: Order
    cut_request: int = 0
    cut_epoch: int = 0


class AdapterState:
    def __init__(self, data_dir: Path) -> None:
        self._path = data_dir / STATE_FILE
        self.disks: dict[str, OpenedDisk] = {}

    async def load(self) -> None:
        self.disks = await asyncio.to_thread(self._load)

    def _load(self) -> dict[str, OpenedDisk]:
        if not self._path.exists():
            return {}
        raw = json.loads(self._path.read_text())["disks"]
        return {
            disk: OpenedDisk(
                Order.from_json(entry["order"]),
                int(entry.get("cut_request", 0)),
                int(entry.get("cut_epoch", 0)),
            )
            for disk, entry in raw.items()
        }

    async def opened(self, order: Order) -> None:
        previous = self.disks.get(order.disk_id)
        cut = (previous.cut_request, previous.cut_epoch) if previous is not None else (0, 0)
        self.disks[order.disk_id] = OpenedDisk(order, *cut)
        await self._save()

    async def cut(self, disk_id: str, request: int, epoch: int) -> None:
        previous = self.disks.get(disk_id)
        if previous is not None:
            self.disks[disk_id] = OpenedDisk(previous.order, request, epoch)
            await self._save()

    async def closed(self, disk_id: str) -> None:
        if self.disks.pop(disk_id, None) is not None:
            await self._save()

    async def _save(self) -> None:
        body = {
            "disks": {
                disk: {
                    "order": entry.order.to_json(),
                    "cut_request": entry.cut_request,
                    "cut_epoch": entry.cut_epoch,
                }
                for disk, entry in sorted(self.disks.items())
            }
        }
        await asyncio.to_thread(write_atomically, self._path, json.dumps(body).encode())


async def data_lost(
    store: StateStore, instance: ComponentId, order: Order, files_exist: bool
) -> str | None:
    """Why ``order`` must not be carried out (this instance served the disk before and its
    files are gone), or None. ``files_exist``: the disk's own files are in the data
    directory. A close is always carried out."""
    if order.action is OrderAction.CLOSE or files_exist:
        return None
    key = ComponentKeys(store.keys, instance).outcomes
    raw = await store.run(lambda r: r.hget(key, order.disk_id))
    if raw is None:
        return None  # never served here: a first open
    before = OrderOutcome.from_json(raw)
    if before.result.get("closed"):
        return None  # closed (and maybe discarded) on order: a reopen starts afresh
    if before.kind is not OutcomeKind.APPLIED and before.code is not OutcomeCode.DATA_LOST:
        return None
    return (
        f"{instance} served {order.disk_id} before (token {before.token}) and its data "
        "directory no longer holds it: what was not committed on-prem is lost"
    )
