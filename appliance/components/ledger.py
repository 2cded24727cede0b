"""A component's own memory of its orders, in its data directory: tokens and outcomes per disk.

Per disk it keeps the highest fencing token it ever accepted (an order with a lower
one is refused, whatever Redis says) and the last order it handled with its
outcome (the same order is not carried out twice). The file is replaced
atomically (write, fsync, rename, fsync the directory), so a crash leaves the old
ledger or the new one, never a mix.
"""

from __future__ import annotations

import asyncio
import json
import os
from dataclasses import dataclass, replace
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from appliance.components.orders import OrderOutcome
from appliance.errors import DiskCorrupt

LEDGER_FILE = "control-ledger.json"


@dataclass(frozen=True, slots=True)
class DiskEntry:
    highest_token: int
    order_id: str = ""
    outcome: OrderOutcome | None = None

    def handled(self, order_id: str) -> bool:
        """This order was carried out (or given up on for good): do not do it again."""
        return self.order_id == order_id and self.outcome is not None and not self.outcome.retryable


class _EntryWire(BaseModel):
    model_config = ConfigDict(extra="forbid")

    highest_token: int
    order_id: str = ""
    outcome: str | None = None


class Ledger:
    def __init__(self, data_dir: Path) -> None:
        self.path = data_dir / LEDGER_FILE
        self._entries: dict[str, DiskEntry] = {}
        self._lock = asyncio.Lock()

    async def load(self) -> None:
        self._entries = await asyncio.to_thread(self._read)

    def _read(self) -> dict[str, DiskEntry]:
        if not self.path.exists():
            return {}
        try:
            raw = json.loads(self.path.read_bytes())
            wires = {disk: _EntryWire.model_validate(entry) for disk, entry in raw.items()}
        except (ValueError, AttributeError) as error:
            raise DiskCorrupt(self.path, f"control ledger unreadable: {error}") from error
        return {
            disk: DiskEntry(
                w.highest_token,
                w.order_id,
                OrderOutcome.from_json(w.outcome) if w.outcome is not None else None,
            )
            for disk, w in wires.items()
        }

    def get(self, disk_id: str) -> DiskEntry | None:
        return self._entries.get(disk_id)

    def disks(self) -> list[str]:
        return sorted(self._entries)

    def highest_token(self, disk_id: str) -> int:
        entry = self._entries.get(disk_id)
        return entry.highest_token if entry is not None else 0

    async def accept(self, disk_id: str, token: int) -> None:
        """Remember ``token`` as accepted for the disk, durably, before acting on it."""
        entry = self._entries.get(disk_id) or DiskEntry(0)
        if token > entry.highest_token:
            await self._store(disk_id, replace(entry, highest_token=token))

    async def record(self, outcome: OrderOutcome) -> None:
        entry = self._entries.get(outcome.disk_id) or DiskEntry(0)
        await self._store(
            outcome.disk_id, replace(entry, order_id=outcome.order_id, outcome=outcome)
        )

    async def _store(self, disk_id: str, entry: DiskEntry) -> None:
        async with self._lock:
            entries = {**self._entries, disk_id: entry}
            await asyncio.to_thread(self._write, entries)
            self._entries = entries

    def _write(self, entries: dict[str, DiskEntry]) -> None:
        body = {
            disk: {
                "highest_token": e.highest_token,
                "order_id": e.order_id,
                "outcome": e.outcome.to_json() if e.outcome is not None else None,
            }
            for disk, e in sorted(entries.items())
        }
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        with tmp.open("wb") as handle:
            handle.write(json.dumps(body, indent=1).encode())
            handle.flush()
            os.fsync(handle.fileno())
        tmp.replace(self.path)
        directory = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)
