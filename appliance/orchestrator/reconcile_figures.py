"""What clients see of a warm VM's reconcile: percent, bytes, rate and ETA, pass by pass.

A *round* is one reconcile pass on each of the VM's disks (``warm.reconcile``; the
cutover's last passes are one more). Its figures, which the record carries (the
status's source) while it runs:

* ``bytes_total``: what the round copies: for a disk whose pass is done, the bytes
  it copied; for the disk whose pass is under way, that pass's total as the cache
  reports it (its heartbeat's ``reconcile_progress``, keyed by the disk's id there);
  for a disk not begun yet, what its last pass left (``remainder_bytes``; 0 when
  none was made);
* ``bytes_done``: the done passes' bytes plus what the pass under way has copied;
* the rate: the pass under way's (the cache measures it), else the round's so far;
  the ETA: what is left at that rate.

While a pass runs, :func:`watching` reads the cache's heartbeat every progress
interval and persists and publishes the figures; after each pass they come from
its result. The round's number is persisted (``extra["reconcile"]["round"]``) and
is the status's ``reconcile_pass``. Once cut over, the record shows the finished
figures (:func:`finished`): every byte written into the volumes (the bulk copy and
every pass), at 100 %.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from appliance.components.cache.reconcile import PassResult
from appliance.components.heartbeat import ComponentHealth
from appliance.components.orders import ComponentId
from appliance.orchestrator.record import MigrationRecord

if TYPE_CHECKING:  # reporting.py reads round_of; context.py imports reporting.py
    from appliance.orchestrator.context import Deps
    from appliance.orchestrator.journal import Journal

RECONCILE = "reconcile"
"""extra: {"round", "passes", "copied_bytes", "remainder_bytes", "bulk_bytes", per disk:
"remainders" (what its last pass left), "last_pass" (the last pass noted)}"""


@dataclass(frozen=True, slots=True)
class LivePass:
    """A pass under way, as the cache's heartbeat reports it."""

    bytes_done: int
    bytes_total: int
    rate_bytes_per_s: float


@dataclass(frozen=True, slots=True)
class Figures:
    bytes_done: int
    bytes_total: int
    rate_bytes_per_s: float
    eta_seconds: float | None

    def changes(self) -> dict[str, Any]:
        """As ``Journal.update`` takes them."""
        return {
            "bytes_done": self.bytes_done,
            "bytes_total": self.bytes_total,
            "rate_bytes_per_s": self.rate_bytes_per_s,
            "eta_seconds": self.eta_seconds,
        }


def _count(value: object) -> float | None:
    """A figure of the heartbeat: a number, not negative (JSON gives ints or floats)."""
    if isinstance(value, int | float) and not isinstance(value, bool) and value >= 0:
        return float(value)
    return None


def live_pass(figures: Mapping[str, Any], disk_key: str, pass_no: int) -> LivePass | None:
    """Pass ``pass_no`` of the disk the cache knows as ``disk_key``, if it is under way."""
    under_way = figures.get("reconcile_progress")
    entry = under_way.get(disk_key) if isinstance(under_way, Mapping) else None
    if not isinstance(entry, Mapping) or entry.get("pass") != pass_no:
        return None
    done, total, rate = (
        _count(entry.get(k)) for k in ("bytes_done", "bytes_total", "rate_bytes_per_s")
    )
    if done is None or total is None or rate is None:
        return None
    return LivePass(int(done), int(total), rate)


@dataclass
class Round:
    """One pass per disk: the figures of what is done, under way and still to come."""

    number: int
    expected: dict[str, int]
    """Per disk (plan id), in the VM's disk order: what its last pass left to copy."""
    copied: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0

    def done(self, disk_id: str, result: PassResult) -> None:
        self.copied[disk_id] = result.bytes
        self.seconds += result.seconds

    def figures(self, disk_id: str | None = None, live: LivePass | None = None) -> Figures:
        done = total = 0
        for disk, expected in self.expected.items():
            if disk in self.copied:
                done += self.copied[disk]
                total += self.copied[disk]
            elif live is not None and disk == disk_id:
                done += live.bytes_done
                total += max(live.bytes_total, live.bytes_done)
            else:
                total += expected
        rate = live.rate_bytes_per_s if live is not None else 0.0
        if rate <= 0 and self.seconds > 0:
            rate = sum(self.copied.values()) / self.seconds
        left = total - done
        eta = 0.0 if left <= 0 else (left / rate if rate > 0 else None)
        return Figures(done, total, round(rate, 3), eta)


def seen(record: MigrationRecord) -> dict[str, Any]:
    return dict(record.extra.get(RECONCILE) or {})


def begin_round(record: MigrationRecord) -> tuple[dict[str, Any], Round]:
    """The record's extra for the next round (its number, and the bulk copy's bytes kept for
    the finished figures), and the round."""
    noted = seen(record)
    noted.setdefault("bulk_bytes", record.bytes_total)
    noted["round"] = int(noted.get("round", 0)) + 1
    remainders = dict(noted.get("remainders") or {})
    expected = {d.disk_id: int(remainders.get(d.disk_id, 0)) for d in record.disks}
    return {**record.extra, RECONCILE: noted}, Round(noted["round"], expected)


def note_pass(record: MigrationRecord, disk_id: str, result: PassResult) -> dict[str, Any]:
    """The record's extra after a pass on one disk (a pass noted before, which a rerun of
    the cutover asks again, counts once)."""
    noted = seen(record)
    last = dict(noted.get("last_pass") or {})
    if int(last.get(disk_id, 0)) >= result.pass_no:
        return dict(record.extra)
    last[disk_id] = result.pass_no
    remainders = dict(noted.get("remainders") or {})
    remainders[disk_id] = result.remainder_bytes
    noted.update(
        passes=int(noted.get("passes", 0)) + 1,
        copied_bytes=int(noted.get("copied_bytes", 0)) + result.bytes,
        remainder_bytes=result.remainder_bytes,
        remainders=remainders,
        last_pass=last,
    )
    return {**record.extra, RECONCILE: noted}


def finished(record: MigrationRecord) -> Figures:
    """Cut over: every byte written into the volumes, the bulk copy's and every pass's."""
    noted = seen(record)
    total = int(noted.get("bulk_bytes", record.bytes_total)) + int(noted.get("copied_bytes", 0))
    return Figures(total, total, record.rate_bytes_per_s, 0.0)


def round_of(record: MigrationRecord) -> int | None:
    """The round under way or last made (the status's ``reconcile_pass``); None before."""
    number = seen(record).get("round")
    return number if isinstance(number, int) and number >= 1 else None


@contextlib.asynccontextmanager
async def watching(
    deps: Deps,
    journal: Journal,
    record: MigrationRecord,
    live_round: Round,
    disk: tuple[str, str],
    pass_no: int,
) -> AsyncIterator[None]:
    """While the body waits for pass ``pass_no`` of ``disk`` (plan id, the cache's id), its
    figures from the cache's heartbeat, persisted and published every progress interval.
    Ends (after its current write, never cancelled mid-command) before the body's caller
    writes the record again."""
    health = ComponentHealth(deps.store, deps.config.component_timeout_s)
    cache = ComponentId.parse(deps.config.cache_component)
    stop = asyncio.Event()

    async def watch() -> None:
        current = record
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(deps.config.progress_interval_s):
                    await stop.wait()
            if stop.is_set():
                return
            report = await health.report(cache)
            live = live_pass(report.figures, disk[1], pass_no)
            if live is None:
                continue
            figures = live_round.figures(disk[0], live)
            current = await journal.update(current, **figures.changes())
            await deps.reporter.publish(current, False)

    task = asyncio.create_task(watch())
    try:
        yield
    finally:
        stop.set()
        await task
