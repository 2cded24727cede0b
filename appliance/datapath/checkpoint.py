"""Transfer checkpoints: where they are kept, and how chunks become durable in them.

Write ordering (DESIGN.md §9): a chunk may only be recorded as durable once
the target has flushed it. :class:`CheckpointWriter` does that with *flush
rounds*:

1. A worker that has written and verified a chunk calls :meth:`add`; the record
   carries the current round E. A recorder task group-commits records to the
   store as soon as the previous batch is acknowledged, so a record is at most
   one Redis round trip behind its chunk.
2. Every ``flush_interval_s`` (and at the end) :meth:`sync` switches to round
   E+1, writes out the records still queued, flushes the target, and only
   then stores ``durable = E``. Every record of round E was added after its
   write completed and before the switch, so the flush covers it.
3. On resume, records with ``round <= durable`` are skipped. Higher rounds
   are *pending*: written and verified but maybe not flushed. The engine
   forgets them in the store first (so a later ``durable`` cannot bless them
   unchecked), re-verifies each against the target's hash, and re-sends only
   the ones that differ.

So a run killed with SIGKILL re-sends at most the chunks that had been
started and whose record Redis had not yet acknowledged.

(These are "flush rounds", not "epochs": in Ferry an epoch is only ever a
point-in-time flush of the cloud cache to on-prem; see appliance/components.)

The two background loops end on :meth:`stop` as well as on cancellation:
under Python 3.11 a cancellation that lands inside a Redis call can be lost
(``asyncio.wait_for`` in redis-py swallows it when the reply arrives at the
same moment), and a loop that then waited for its next wake-up would hang
the task group that owns it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Protocol

from appliance.clock import Clock, SystemClock
from appliance.state.checkpoints import Checkpoint, CheckpointMeta, ChunkRecord

__all__ = [
    "Checkpoint",
    "CheckpointMeta",
    "CheckpointStore",
    "CheckpointWriter",
    "ChunkRecord",
    "MemoryCheckpointStore",
]


class CheckpointStore(Protocol):
    """The checkpoint of one transfer (Redis in production, memory in unit tests)."""

    async def load(self) -> Checkpoint | None: ...

    async def begin(self, meta: CheckpointMeta) -> None: ...

    async def record(self, records: Sequence[ChunkRecord]) -> None: ...

    async def forget(self, indices: Sequence[int]) -> None: ...

    async def mark_durable(self, flush_round: int) -> None: ...

    async def mark_complete(self, digest: bytes) -> None: ...

    async def delete(self) -> None: ...


class MemoryCheckpointStore:
    """A checkpoint in a dict: for unit tests and transfers nobody will resume."""

    def __init__(self) -> None:
        self.meta: CheckpointMeta | None = None
        self.durable_round = 0
        self.records: dict[int, ChunkRecord] = {}
        self.complete_digest: bytes | None = None

    async def load(self) -> Checkpoint | None:
        if self.meta is None:
            return None
        records = tuple(self.records[index] for index in sorted(self.records))
        return Checkpoint(self.meta, self.durable_round, records, self.complete_digest)

    async def begin(self, meta: CheckpointMeta) -> None:
        self.meta = meta
        self.durable_round = 0
        self.records = {}
        self.complete_digest = None

    async def record(self, records: Sequence[ChunkRecord]) -> None:
        self.records.update((record.index, record) for record in records)

    async def forget(self, indices: Sequence[int]) -> None:
        for index in indices:
            self.records.pop(index, None)

    async def mark_durable(self, flush_round: int) -> None:
        self.durable_round = flush_round

    async def mark_complete(self, digest: bytes) -> None:
        self.complete_digest = digest

    async def delete(self) -> None:
        self.meta = None
        self.records = {}
        self.durable_round = 0
        self.complete_digest = None


class CheckpointWriter:
    """Records verified chunks promptly and marks them durable after each target flush."""

    def __init__(
        self,
        store: CheckpointStore,
        flush_target: Callable[[], Awaitable[None]],
        *,
        first_round: int = 1,
        clock: Clock | None = None,
    ) -> None:
        self._store = store
        self._flush_target = flush_target
        self._clock = clock or SystemClock()
        self._round = first_round
        self._queue: list[ChunkRecord] = []
        self._wakeup = asyncio.Event()
        self._stopping = False
        self._record_lock = asyncio.Lock()
        self._sync_lock = asyncio.Lock()
        self.durable_round = first_round - 1
        self.records_written = 0

    @property
    def round(self) -> int:
        return self._round

    def add(self, index: int, digest: bytes | None) -> None:
        """Chunk ``index`` is written and verified (``digest`` None: all zero)."""
        self._queue.append(ChunkRecord(index, self._round, digest))
        self._wakeup.set()

    def add_many(self, indices: Iterable[int], digest: bytes | None) -> None:
        self._queue.extend(ChunkRecord(index, self._round, digest) for index in indices)
        self._wakeup.set()

    async def _persist_queued(self) -> None:
        async with self._record_lock:
            batch, self._queue = self._queue, []
            if batch:
                await self._store.record(batch)
                self.records_written += len(batch)

    def stop(self) -> None:
        """End ``record_forever`` and ``sync_every`` at their next step; ``sync`` still works."""
        self._stopping = True
        self._wakeup.set()

    async def record_forever(self) -> None:
        """Group commit: write whatever queued up while the previous batch was in flight."""
        while not self._stopping:
            await self._wakeup.wait()
            self._wakeup.clear()
            if not self._stopping:
                await self._persist_queued()

    async def sync(self) -> None:
        """Everything added so far: recorded, flushed at the target, marked durable."""
        async with self._sync_lock:
            flush_round = self._round
            self._round += 1
            await self._persist_queued()
            await self._flush_target()
            await self._store.mark_durable(flush_round)
            self.durable_round = flush_round

    async def sync_every(self, interval_s: float) -> None:
        while not self._stopping:
            await self._clock.sleep(interval_s)
            if not self._stopping:
                await self.sync()
