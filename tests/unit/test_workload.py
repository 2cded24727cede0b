"""The guest workload generator: reproducible operations, the write log, and verify."""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from appliance.sites.lab.workload import (
    GuestWorkload,
    Mismatch,
    OpKind,
    WorkloadSpec,
    WriteLog,
    WriteRecord,
    content_hash,
    nth_write,
    operations,
    read_write_log,
    verify,
    visible_pieces,
    write_content,
)
from appliance.storage.layered import LayeredDisk
from tests.support.clocks import SteppingClock

MiB = 1024 * 1024
SIZE = 24 * MiB


@pytest.fixture
async def disk(tmp_path: Path) -> AsyncIterator[LayeredDisk]:
    async with await LayeredDisk.create(tmp_path / "disk", SIZE) as opened:
        yield opened


def test_operations_are_reproducible_and_mixed() -> None:
    spec = WorkloadSpec(seed=11)
    first = list(itertools.islice(operations(spec, SIZE), 2000))
    assert first == list(itertools.islice(operations(spec, SIZE), 2000))
    assert first != list(itertools.islice(operations(WorkloadSpec(seed=12), SIZE), 2000))
    writes = [op for op in first if op.kind is OpKind.WRITE]
    assert [op.sequence for op in writes] == list(range(1, len(writes) + 1))
    assert 0.6 < len(writes) / len(first) < 0.8
    assert all(512 <= op.length <= MiB and op.offset + op.length <= SIZE for op in first)
    aligned = [op for op in first if op.offset % 4096 == 0 and op.length % 4096 == 0]
    assert 0.3 < len(aligned) / len(first) < 0.7
    assert min(op.length for op in first) < 1024 and max(op.length for op in first) > MiB // 2
    hot = [op for op in first if op.offset + op.length <= SIZE * 0.05 + MiB]
    assert len(hot) > 0.4 * len(first)


def test_a_tiny_disk_still_gets_valid_operations() -> None:
    ops = list(itertools.islice(operations(WorkloadSpec(seed=1), 700), 200))
    assert all(0 <= op.offset and op.offset + op.length <= 700 for op in ops)


async def test_a_log_of_another_seed_is_refused(disk: LayeredDisk, tmp_path: Path) -> None:
    async with await WriteLog.create(tmp_path / "log", seed=1, disk_size=SIZE) as log:
        with pytest.raises(ValueError, match="seed"):
            GuestWorkload(disk.active(), WorkloadSpec(seed=2), log)


def test_write_content_is_a_function_of_seed_sequence_and_length() -> None:
    assert write_content(1, 5, 1000) == write_content(1, 5, 1000)
    assert len(write_content(1, 5, 1000)) == 1000
    assert write_content(1, 5, 1000) != write_content(1, 6, 1000) != write_content(2, 5, 1000)


async def run_logged(
    view: LayeredDisk, log_path: Path, count: int, *, seed: int = 3
) -> tuple[GuestWorkload, WriteLog]:
    log = await WriteLog.create(log_path, seed=seed, disk_size=SIZE, batch=16)
    workload = GuestWorkload(view.active(), WorkloadSpec(seed=seed), log)
    await workload.run(count=count, flush_every=25)
    return workload, log


async def test_run_logs_every_write_and_verify_passes(disk: LayeredDisk, tmp_path: Path) -> None:
    workload, log = await run_logged(disk, tmp_path / "log", 300)
    await log.close()
    stats = workload.stats()
    assert stats.reads + stats.writes == 300 and stats.writes > 150
    logged = await read_write_log(tmp_path / "log")
    assert logged.seed == 3 and logged.disk_size == SIZE
    assert [w.sequence for w in logged.writes] == list(range(1, stats.writes + 1))
    assert logged.last_sequence == stats.last_sequence
    assert [f.upto_sequence for f in logged.flushes] == list(range(25, stats.writes + 1, 25))
    assert stats.flushes == len(logged.flushes)
    first = logged.writes[0]
    assert first.digest == content_hash(write_content(3, 1, first.length))
    for record in logged.writes[::37]:  # the log need not keep data: replay finds it
        operation, data = nth_write(WorkloadSpec(seed=3), SIZE, record.sequence)
        assert (operation.offset, operation.length) == (record.offset, record.length)
        assert content_hash(data) == record.digest
    assert await verify(disk.active(), logged) == []


async def test_verify_finds_a_damaged_byte(disk: LayeredDisk, tmp_path: Path) -> None:
    _, log = await run_logged(disk, tmp_path / "log", 200)
    await log.close()
    logged = await read_write_log(tmp_path / "log")
    start, end, write = visible_pieces(list(logged.writes))[3]
    target = start + (end - start) // 2
    old = await disk.active().read(target, 1)
    await disk.active().write(target, bytes([old[0] ^ 0xFF]))
    assert await verify(disk.active(), tmp_path / "log") == [
        Mismatch(offset=start, length=end - start, sequence=write.sequence, first_difference=target)
    ]


async def test_verify_up_to_a_snapshot(disk: LayeredDisk, tmp_path: Path) -> None:
    workload, log = await run_logged(disk, tmp_path / "log", 150)
    at = workload.stats().last_sequence
    snapshot = await disk.snapshot("k")
    await workload.run(count=150)
    await log.close()
    logged = await read_write_log(tmp_path / "log")
    assert logged.last_sequence > at
    assert await verify(disk.at(snapshot.id), logged, upto_sequence=at) == []
    assert await verify(disk.active(), logged) == []
    later = await verify(disk.at(snapshot.id), logged)  # the snapshot lacks later writes
    assert later and all(m.sequence > at for m in later)


async def test_verify_refuses_a_log_of_another_seed(disk: LayeredDisk, tmp_path: Path) -> None:
    _, log = await run_logged(disk, tmp_path / "log", 20)
    await log.close()
    text = (tmp_path / "log").read_text().replace('"seed":3', '"seed":4', 1)
    (tmp_path / "log").write_text(text)
    with pytest.raises(ValueError, match="seed 4"):
        await verify(disk.active(), tmp_path / "log")


async def test_the_log_is_synced_in_batches_and_a_torn_tail_is_ignored(tmp_path: Path) -> None:
    path = tmp_path / "log"
    log = await WriteLog.create(path, seed=1, disk_size=SIZE, batch=4)
    for sequence in range(1, 7):
        await log.record_write(WriteRecord(sequence, 0, 512, "h", 0.0))
    assert [w.sequence for w in (await read_write_log(path)).writes] == [1, 2, 3, 4]
    await log.sync()
    assert (await read_write_log(path)).last_sequence == 6
    await log.close()
    with path.open("ab") as torn:
        torn.write(b'{"type":"write","seq":7,"off')
    assert (await read_write_log(path)).last_sequence == 6
    with pytest.raises(FileExistsError):
        await WriteLog.create(path, seed=1, disk_size=SIZE)


async def test_rate_and_duration_follow_the_clock(disk: LayeredDisk) -> None:
    # Time moves only while the workload waits for its next turn, so the operations
    # themselves take none of it and the count is the same on any machine: one every
    # 0.1 s from 0.0 s; the one due at 2.0 s was waited for while time was left, so it runs.
    clock = SteppingClock()
    workload = GuestWorkload(disk.active(), WorkloadSpec(seed=1), clock=clock)
    stats = await workload.run(duration=2.0, rate=10)
    assert stats.reads + stats.writes == 21
    assert clock.monotonic() == pytest.approx(2.0)


@given(
    st.lists(
        st.tuples(st.integers(0, 200), st.integers(1, 60)),
        min_size=0,
        max_size=40,
    )
)
def test_visible_pieces_match_last_writer_wins(writes: list[tuple[int, int]]) -> None:
    records = [WriteRecord(i + 1, o, n, "", 0.0) for i, (o, n) in enumerate(writes)]
    owner: dict[int, int] = {}
    for record in records:
        for byte in range(record.offset, record.offset + record.length):
            owner[byte] = record.sequence
    found: dict[int, int] = {}
    previous_end = -1
    for start, end, record in visible_pieces(records):
        assert start >= previous_end and start < end
        previous_end = end
        for byte in range(start, end):
            found[byte] = record.sequence
    assert found == owner
