"""EchoRuntime: a ComponentRuntime for tests that writes down every order it carries out.

Each applied order is appended (and fsynced) as one JSON line to ``echo-applied.jsonl``
in the component's data directory; its state (open disks, epochs cut) is the replay
of that file, so it survives a SIGKILL like a real core's journal would. Tests count
the lines to prove an order was applied exactly once.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Self

from appliance.components.orders import Order, OrderAction, OrderOutcome
from appliance.components.runtimes import ComponentConfig

APPLIED_FILE = "echo-applied.jsonl"


def applied_orders(data_dir: Path) -> list[dict[str, object]]:
    path = data_dir / APPLIED_FILE
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line]


class EchoRuntime:
    def __init__(self, config: ComponentConfig) -> None:
        self._path = config.data_dir / APPLIED_FILE
        self._open: set[str] = set()
        self._epochs: dict[str, int] = {}
        for line in applied_orders(config.data_dir):
            self._replay(str(line["disk_id"]), OrderAction(str(line["action"])))

    def _replay(self, disk: str, action: OrderAction) -> int:
        if action is OrderAction.OPEN:
            self._open.add(disk)
        elif action is OrderAction.CLOSE:
            self._open.discard(disk)
        else:
            self._epochs[disk] = self._epochs.get(disk, 0) + 1
        return self._epochs.get(disk, 0)

    async def apply(self, order: Order) -> OrderOutcome:
        line = {
            "order_id": order.order_id,
            "disk_id": order.disk_id,
            "action": order.action.value,
            "token": order.token,
            "epoch_request": order.epoch_request,
            "pid": os.getpid(),
        }
        await asyncio.to_thread(self._append, json.dumps(line) + "\n")
        epoch = self._replay(order.disk_id, order.action)
        if order.action is OrderAction.CUT_EPOCH:
            return OrderOutcome.applied(order, epoch=epoch)
        return OrderOutcome.applied(order)

    def _append(self, line: str) -> None:
        with self._path.open("a") as handle:
            handle.write(line)
            handle.flush()
            os.fsync(handle.fileno())

    def status(self) -> Mapping[str, object]:
        return {
            "runtime": "echo",
            "exports": sorted(self._open),
            "dirty_bytes": 0,
            "cache_bytes": 0,
            "epochs_in_flight": 0,
            "committed_epoch": dict(sorted(self._epochs.items())),
        }

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        return None
