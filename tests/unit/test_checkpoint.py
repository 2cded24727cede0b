"""Checkpoint write ordering: a chunk is durable only after the target flushed it."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Sequence

from appliance.datapath.checkpoint import (
    CheckpointWriter,
    ChunkRecord,
    MemoryCheckpointStore,
)
from appliance.datapath.retry import RetryPolicy
from appliance.datapath.transfer import Transfer, TransferOptions
from appliance.state.checkpoints import CheckpointMeta
from appliance.storage.memory import MemoryBackend

CHUNK = 64 * 1024


class EventLog:
    def __init__(self) -> None:
        self.events: list[tuple[str, int]] = []


class LoggingTarget(MemoryBackend):
    """Logs when each chunk's write completes and when each flush starts."""

    def __init__(self, size: int, log: EventLog) -> None:
        super().__init__(size, name="target")
        self.log = log

    async def write(self, offset: int, data: bytes | memoryview) -> None:
        await asyncio.sleep(0.001)
        await super().write(offset, data)
        self.log.events.append(("written", offset // CHUNK))

    async def flush(self) -> None:
        self.log.events.append(("flush", 0))
        await asyncio.sleep(0.002)
        await super().flush()


class CheckingStore(MemoryCheckpointStore):
    """Checks, at every durable mark, that each record it blesses was flushed."""

    def __init__(self, log: EventLog) -> None:
        super().__init__()
        self.log = log
        self.marks = 0

    async def mark_durable(self, flush_round: int) -> None:
        last_flush = max(i for i, event in enumerate(self.log.events) if event[0] == "flush")
        written_before = {
            index for kind, index in self.log.events[:last_flush] if kind == "written"
        }
        for record in self.records.values():
            if record.round <= flush_round:
                assert record.index in written_before, f"chunk {record.index} blessed unflushed"
        self.marks += 1
        await super().mark_durable(flush_round)


async def test_durable_marks_follow_target_flushes_during_a_transfer() -> None:
    log = EventLog()
    source = MemoryBackend.from_bytes(random.Random(1).randbytes(96 * CHUNK), name="source")
    target = LoggingTarget(source.size, log)
    store = CheckingStore(log)
    options = TransferOptions(
        chunk_size=CHUNK, workers=4, flush_interval_s=0.01, max_data_run=CHUNK
    )
    await Transfer("t", source, target, checkpoints=store, options=options).run()
    assert store.marks >= 3
    assert len(store.records) == 96
    assert all(record.round <= store.durable_round for record in store.records.values())


async def test_writer_assigns_epochs_and_marks_them_after_the_flush() -> None:
    store = MemoryCheckpointStore()
    await store.begin(CheckpointMeta(4 * CHUNK, CHUNK, "xxh3-128"))
    flushed: list[int] = []

    async def flush() -> None:
        flushed.append(len(store.records))

    writer = CheckpointWriter(store, flush, first_round=5)
    writer.add(0, b"a" * 16)
    writer.add_many([1, 2], None)
    await writer.sync()
    writer.add(3, b"b" * 16)
    assert flushed == [3]  # the records of round 5 were written before the flush
    assert store.durable_round == 5
    assert store.records[3 - 1] == ChunkRecord(2, 5, None)
    recorder = asyncio.create_task(writer.record_forever())
    for _ in range(5):
        await asyncio.sleep(0)
    assert store.records[3] == ChunkRecord(3, 6, b"b" * 16)
    assert store.durable_round == 5  # recorded promptly, durable only after the next flush
    recorder.cancel()
    await writer.sync()
    assert store.durable_round == 6


class ForgetLog(MemoryCheckpointStore):
    def __init__(self) -> None:
        super().__init__()
        self.forgotten: list[list[int]] = []

    async def forget(self, indices: Sequence[int]) -> None:
        self.forgotten.append(list(indices))
        await super().forget(indices)


async def test_a_resumed_run_forgets_pending_records_until_verified() -> None:
    source = MemoryBackend.from_bytes(random.Random(2).randbytes(8 * CHUNK), name="source")
    target = MemoryBackend(source.size, name="target")
    store = ForgetLog()
    options = TransferOptions(chunk_size=CHUNK, retry=RetryPolicy(attempts=2))
    await Transfer("t", source, target, checkpoints=store, options=options).run()
    store.durable_round = 0  # every record pending, as after a kill before the first flush

    result = await Transfer("t", source, target, checkpoints=store, options=options).run()
    assert store.forgotten == [list(range(8))]
    assert result.stats.chunks_reverified == 8
    assert len(store.records) == 8
    assert all(record.round <= store.durable_round for record in store.records.values())


def test_record_encoding_round_trips() -> None:
    for record in (ChunkRecord(7, 3, bytes(range(16))), ChunkRecord(0, 1, None)):
        assert ChunkRecord.decode(record.index, record.encode()) == record
    meta = CheckpointMeta(10, 4, "xxh3-128")
    assert CheckpointMeta.from_json(meta.to_json()) == meta
