"""The transfer engine against in-memory backends: what lands at the target, and how it fails."""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence

import pytest

from appliance.datapath.buffers import BufferBudget
from appliance.datapath.checkpoint import ChunkRecord, MemoryCheckpointStore
from appliance.datapath.copier import is_zero
from appliance.datapath.imagecheck import MAX_HASH_RANGE
from appliance.datapath.progress import TransferPhase, TransferProgress
from appliance.datapath.retry import RetryPolicy
from appliance.datapath.transfer import Transfer, TransferOptions
from appliance.errors import (
    CertificationFailed,
    ChunkMismatch,
    ConnectionDropped,
    OutOfSpace,
    TransferCancelled,
    TransferFailed,
)
from appliance.storage.extents import Extent, iter_chunks
from appliance.storage.hashing import chunk_hash
from appliance.storage.memory import MemoryBackend

KIB = 1024
MIB = 1024 * KIB
CHUNK = 64 * KIB
FAST_RETRY = RetryPolicy(attempts=4, initial_s=0.001, max_s=0.005)

WriteHook = Callable[[int, bytes], Awaitable[bytes]]
AtRest = Callable[[int, bytes], bytes | None]


class FaultyBackend(MemoryBackend):
    """A MemoryBackend target behind a faulty link, with Ferry's NBD extension or without.

    ``hook`` is the link: it may raise or alter what the target receives.
    ``at_rest`` is the storage: it may alter what is kept of a received write,
    or drop it (None), after the target hashed what it received.
    ``checksums`` plays the checksum command (hash a range where it lies),
    ``hashed_writes`` the hashed write (the digest of the bytes received).
    """

    def __init__(
        self,
        size: int,
        hook: WriteHook | None = None,
        *,
        checksums: bool = False,
        hashed_writes: bool = False,
        at_rest: AtRest | None = None,
    ):
        super().__init__(size, name="faulty")
        self.hook = hook
        self.checksums = checksums
        self.hashed_writes = hashed_writes
        self.at_rest = at_rest
        self.writes = 0
        self.checksum_calls = 0

    async def write(self, offset: int, data: bytes | memoryview) -> None:
        await self._store(offset, await self._receive(offset, data))

    async def write_verified(self, offset: int, data: bytes | memoryview) -> bytes | None:
        received = await self._receive(offset, data)
        await self._store(offset, received)
        return chunk_hash(received) if self.hashed_writes else None

    async def checksum(self, offset: int, length: int) -> bytes | None:
        """Like the Ferry NBD extension: hashed where the data is, or None when unsupported."""
        if not self.checksums:
            return None
        self.checksum_calls += 1
        return chunk_hash(await self.read(offset, length))

    async def _receive(self, offset: int, data: bytes | memoryview) -> bytes:
        self.writes += 1
        payload = bytes(data)
        if self.hook is not None:
            payload = await self.hook(offset, payload)
        return payload

    async def _store(self, offset: int, payload: bytes) -> None:
        kept = payload if self.at_rest is None else self.at_rest(offset, payload)
        if kept is not None:
            await super().write(offset, kept)


def lab_bytes(size: int, seed: int = 7) -> bytes:
    """Random, compressible, zero-filled and hole regions at unaligned boundaries."""
    rng = random.Random(seed)
    data = bytearray(size)
    pos = 0
    while pos < size:
        length = min(rng.randrange(1, 3 * CHUNK), size - pos)
        kind = rng.choice(["random", "text", "zero", "zero"])
        if kind == "random":
            data[pos : pos + length] = rng.randbytes(length)
        elif kind == "text":
            data[pos : pos + length] = (b"ferry lab disk " * (length // 15 + 1))[:length]
        pos += length
    return bytes(data)


async def source_disk(size: int = 2 * MIB + 777, seed: int = 7) -> MemoryBackend:
    """A source whose map has holes, allocated zeroes and data."""
    content = lab_bytes(size, seed)
    disk = MemoryBackend.from_bytes(content, name="source")
    await disk.write(2 * CHUNK, bytes(CHUNK))  # allocated but all zero
    return disk


def options(**overrides: object) -> TransferOptions:
    """One chunk a request unless a test asks for data runs: faults here aim at chunks."""
    base: dict[str, object] = {
        "chunk_size": CHUNK,
        "workers": 4,
        "retry": FAST_RETRY,
        "max_data_run": CHUNK,
    }
    base.update(overrides)
    return TransferOptions(**base)  # type: ignore[arg-type]


async def image(backend: MemoryBackend) -> bytes:
    return await backend.read(0, backend.size)


VERIFICATIONS = ["read-back", "checksum", "hashed-writes"]


def verified_target(size: int, verification: str, hook: WriteHook | None = None) -> FaultyBackend:
    """A target that can verify by reading back only, by checksum, or by hashed writes too."""
    return FaultyBackend(
        size,
        hook,
        checksums=verification != "read-back",
        hashed_writes=verification == "hashed-writes",
    )


@pytest.mark.parametrize("verification", VERIFICATIONS)
async def test_full_copy_is_byte_identical_and_sparse(verification: str) -> None:
    source = await source_disk()
    target = verified_target(source.size, verification)
    result = await Transfer("t1", source, target, options=options()).run()

    assert await image(target) == await image(source)
    data_bytes = sum(e.length for e in await source.extents() if e.data)
    assert result.stats.bytes_read == data_bytes
    assert result.stats.bytes_written < data_bytes  # the all-zero chunk went as zero()
    # Zeroes deallocate: the target holds no more than the source's non-zero data.
    assert target.allocated_bytes <= result.stats.bytes_written + 2 * target.block_size * 64
    # Nothing the source holds as zero became data at the target.
    for extent in await source.extents():
        if extent.zero:
            assert all(e.zero for e in await target.extents(extent.start, extent.length))
    assert result.source_digest == result.target_digest is not None
    assert (result.stats.bytes_read_back > 0) == (verification == "read-back")
    assert (result.stats.chunks_verified_on_write > 0) == (verification == "hashed-writes")


async def test_hashed_writes_verify_whole_data_chunks_and_checksums_the_rest() -> None:
    source = await source_disk()
    target = verified_target(source.size, "hashed-writes")
    opts = options(whole_image_check=False)
    stats = (await Transfer("t", source, target, options=opts).run()).stats

    assert await image(target) == await image(source)
    # Chunks that went wholly as data writes needed nothing more; chunks with zero
    # segments (or partly covered ones) were hashed at the target, once each.
    assert 0 < stats.chunks_verified_on_write < stats.chunks_copied
    assert target.checksum_calls == stats.chunks_copied - stats.chunks_verified_on_write
    assert stats.bytes_read_back == 0
    assert stats.check_s == 0.0  # no check ran, so none is reported


async def test_zero_chunks_become_zero_requests_not_data() -> None:
    size = 8 * CHUNK
    source = MemoryBackend(size, name="source")
    await source.write(0, b"x" * CHUNK)
    await source.write(CHUNK, bytes(3 * CHUNK))  # written zeroes: allocated, no data
    target = FaultyBackend(size)
    result = await Transfer("t", source, target, options=options()).run()

    assert await image(target) == await image(source)
    assert result.stats.bytes_written == CHUNK
    target_map = await target.extents()
    assert [e for e in target_map if e.data] == [Extent(0, CHUNK)]
    assert target.allocated_bytes == CHUNK  # the zeroes hold no space


async def test_target_is_zero_skips_zero_requests() -> None:
    size = 8 * CHUNK
    source = MemoryBackend(size, name="source")
    await source.write(2 * CHUNK, b"y" * CHUNK)
    target = FaultyBackend(size)
    result = await Transfer("t", source, target, options=options(target_is_zero=True)).run()
    assert await image(target) == await image(source)
    assert target.allocated_bytes == CHUNK
    assert result.stats.zero_bytes == 7 * CHUNK


RUN = 4 * CHUNK


def flip_inside(at: int, data: bytes, offset: int) -> bytes:
    """``data`` written at ``offset`` with one bit flipped at disk offset ``at``, if covered."""
    if not offset <= at < offset + len(data):
        return data
    i = at - offset
    return data[:i] + bytes([data[i] ^ 1]) + data[i + 1 :]


@pytest.mark.parametrize("verification", VERIFICATIONS)
async def test_data_runs_travel_as_one_write_and_are_recorded_per_chunk(verification: str) -> None:
    data = random.Random(21).randbytes(16 * CHUNK)
    source = MemoryBackend.from_bytes(data, name="source")
    target = verified_target(source.size, verification)
    store = MemoryCheckpointStore()
    opts = options(max_data_run=RUN)
    result = await Transfer("t", source, target, checkpoints=store, options=opts).run()
    assert await image(target) == data
    assert target.writes == 4
    assert result.stats.chunks_copied == 16
    assert result.stats.bytes_read == result.stats.bytes_written == 16 * CHUNK
    hashed = verification == "hashed-writes"
    assert result.stats.chunks_verified_on_write == (16 if hashed else 0)
    assert sorted(store.records) == list(range(16))
    assert all(
        store.records[i].digest == chunk_hash(data[i * CHUNK : (i + 1) * CHUNK]) for i in range(16)
    )
    assert result.source_digest == result.target_digest


async def test_an_all_zero_chunk_inside_a_data_run_is_zeroed_not_sent() -> None:
    source = MemoryBackend.from_bytes(random.Random(22).randbytes(8 * CHUNK), name="source")
    await source.write(2 * CHUNK, bytes(CHUNK))  # allocated, mapped as data, reads as zero
    target = verified_target(source.size, "hashed-writes")
    result = await Transfer("t", source, target, options=options(max_data_run=RUN)).run()
    assert await image(target) == await image(source)
    assert target.writes == 3  # chunks 0-1 and 3 around the zero one, then 4-7
    assert result.stats.zero_bytes == CHUNK
    assert result.stats.bytes_written == 7 * CHUNK
    assert result.stats.chunks_verified_on_write == 7
    assert all(extent.zero for extent in await target.extents(2 * CHUNK, CHUNK))


@pytest.mark.parametrize("verification", VERIFICATIONS)
async def test_a_corrupted_run_is_sent_again_chunk_by_chunk(verification: str) -> None:
    source = MemoryBackend.from_bytes(random.Random(23).randbytes(8 * CHUNK), name="source")
    flipped: list[int] = []

    async def flip_once(offset: int, data: bytes) -> bytes:
        if flipped:
            return data
        changed = flip_inside(5 * CHUNK + 10, data, offset)
        if changed != data:
            flipped.append(offset)
        return changed

    target = verified_target(source.size, verification, flip_once)
    result = await Transfer("t", source, target, options=options(max_data_run=RUN)).run()
    assert await image(target) == await image(source)
    assert flipped == [RUN]
    assert result.stats.mismatches == 1
    assert target.writes == 2 + 4  # two runs, then the damaged run's chunks one by one


@pytest.mark.parametrize("verification", VERIFICATIONS)
async def test_a_chunk_of_a_run_that_never_lands_right_is_named(verification: str) -> None:
    source = MemoryBackend.from_bytes(random.Random(24).randbytes(8 * CHUNK), name="source")

    async def flip_always(offset: int, data: bytes) -> bytes:
        return flip_inside(6 * CHUNK + 3, data, offset)

    target = verified_target(source.size, verification, flip_always)
    with pytest.raises(ChunkMismatch) as mismatch:
        await Transfer("t", source, target, options=options(max_data_run=RUN)).run()
    assert (mismatch.value.offset, mismatch.value.length) == (6 * CHUNK, CHUNK)


async def test_a_dropped_link_retries_the_whole_run_and_a_dead_one_names_it() -> None:
    data = random.Random(25).randbytes(8 * CHUNK)
    drops = {RUN: 1}

    async def flaky(offset: int, payload: bytes) -> bytes:
        if drops.get(offset, 0) > 0:
            drops[offset] -= 1
            raise ConnectionDropped("faulty", "reset by peer")
        return payload

    source = MemoryBackend.from_bytes(data, name="source")
    target = FaultyBackend(source.size, flaky)
    result = await Transfer("t", source, target, options=options(max_data_run=RUN)).run()
    assert await image(target) == data
    assert result.stats.retries == 1

    async def dead(offset: int, payload: bytes) -> bytes:
        if offset == RUN:
            raise ConnectionDropped("faulty", "reset by peer")
        return payload

    target = FaultyBackend(source.size, dead)
    with pytest.raises(TransferFailed) as failure:
        await Transfer("t", source, target, options=options(max_data_run=RUN)).run()
    assert (failure.value.offset, failure.value.length) == (RUN, RUN)
    assert isinstance(failure.value.cause, ConnectionDropped)


async def test_only_changed_extents_are_copied() -> None:
    source = await source_disk()
    target = FaultyBackend(source.size)
    await Transfer("base", source, target, options=options()).run()

    changed = [Extent(3 * CHUNK + 100, 5000), Extent(10 * CHUNK, CHUNK)]
    for extent in changed:
        await source.write(extent.start, random.Random(extent.start).randbytes(extent.length))
    marker_at = 20 * CHUNK
    await target.write(marker_at, b"MARKER")  # outside every changed extent
    result = await Transfer(
        "incr", source, target, extents=changed, options=options(whole_image_check=False)
    ).run()

    expected = bytearray(await image(source))
    expected[marker_at : marker_at + 6] = b"MARKER"
    assert await image(target) == bytes(expected)
    assert result.stats.chunks_copied == 2
    # The partly covered chunk is read whole (for its hash), the covered one only once.
    assert result.stats.bytes_read == 2 * CHUNK
    assert result.stats.bytes_written <= 5000 + CHUNK


@pytest.mark.parametrize("size", [CHUNK - 1, 3 * CHUNK + 1, 5 * CHUNK + 4097])
@pytest.mark.parametrize("chunk_size", [4096, 48 * KIB, CHUNK])
async def test_unaligned_sizes_and_chunks(size: int, chunk_size: int) -> None:
    source = MemoryBackend.from_bytes(lab_bytes(size, seed=size), name="source")
    target = FaultyBackend(size)
    await Transfer("t", source, target, options=options(chunk_size=chunk_size)).run()
    assert await image(target) == await image(source)


async def test_first_error_aborts_the_copy_and_leaves_no_tasks() -> None:
    source = MemoryBackend.from_bytes(random.Random(1).randbytes(64 * CHUNK), name="source")
    failed = asyncio.Event()

    async def out_of_space(offset: int, data: bytes) -> bytes:
        if offset >= 8 * CHUNK:
            failed.set()
            raise OutOfSpace("faulty", len(data), 0)
        await asyncio.sleep(0)
        return data

    target = FaultyBackend(source.size, out_of_space)
    before = asyncio.all_tasks()
    with pytest.raises(OutOfSpace):
        await Transfer("t", source, target, options=options()).run()
    assert asyncio.all_tasks() == before
    assert target.writes < 8 + 2 * 4  # stopped right away: at most a few in flight


async def test_transient_errors_are_retried() -> None:
    source = MemoryBackend.from_bytes(random.Random(2).randbytes(8 * CHUNK), name="source")
    drops = {3 * CHUNK: 2, 5 * CHUNK: 1}

    async def flaky(offset: int, data: bytes) -> bytes:
        if drops.get(offset, 0) > 0:
            drops[offset] -= 1
            raise ConnectionDropped("faulty", "reset by peer")
        return data

    target = FaultyBackend(source.size, flaky)
    result = await Transfer("t", source, target, options=options()).run()
    assert await image(target) == await image(source)
    assert result.stats.retries == 3


async def test_a_link_that_keeps_dropping_names_the_chunk() -> None:
    source = MemoryBackend.from_bytes(random.Random(3).randbytes(8 * CHUNK), name="source")

    async def dead(offset: int, data: bytes) -> bytes:
        if offset == 6 * CHUNK:
            raise ConnectionDropped("faulty", "reset by peer")
        return data

    target = FaultyBackend(source.size, dead)
    with pytest.raises(TransferFailed) as failure:
        await Transfer("t", source, target, options=options()).run()
    assert (failure.value.offset, failure.value.length) == (6 * CHUNK, CHUNK)
    assert failure.value.attempts == FAST_RETRY.attempts
    assert isinstance(failure.value.cause, ConnectionDropped)


@pytest.mark.parametrize("verification", VERIFICATIONS)
async def test_a_corrupted_write_is_detected_and_sent_again(verification: str) -> None:
    source = MemoryBackend.from_bytes(random.Random(4).randbytes(4 * CHUNK), name="source")
    corrupted: set[int] = set()

    async def flip_once(offset: int, data: bytes) -> bytes:
        if offset == CHUNK and offset not in corrupted:
            corrupted.add(offset)
            return bytes([data[0] ^ 1]) + data[1:]
        return data

    target = verified_target(source.size, verification, flip_once)
    result = await Transfer("t", source, target, options=options()).run()
    assert await image(target) == await image(source)
    assert result.stats.mismatches == 1


@pytest.mark.parametrize("verification", VERIFICATIONS)
async def test_a_chunk_that_never_lands_right_fails_with_mismatch(verification: str) -> None:
    source = MemoryBackend.from_bytes(random.Random(5).randbytes(4 * CHUNK), name="source")

    async def flip_always(offset: int, data: bytes) -> bytes:
        return bytes([data[0] ^ 1]) + data[1:] if offset == 2 * CHUNK else data

    target = verified_target(source.size, verification, flip_always)
    with pytest.raises(ChunkMismatch) as mismatch:
        await Transfer("t", source, target, options=options()).run()
    assert (mismatch.value.offset, mismatch.value.length) == (2 * CHUNK, CHUNK)


@pytest.mark.parametrize("fault", ["bit-flip-at-rest", "lost-write"])
async def test_what_a_write_digest_cannot_see_the_image_check_catches(fault: str) -> None:
    """The write digest covers the link; storage that keeps other bytes (or none) is the
    whole-image check's to find, since it hashes the target afresh."""
    source = MemoryBackend.from_bytes(random.Random(13).randbytes(16 * CHUNK), name="source")

    def storage(offset: int, data: bytes) -> bytes | None:
        if offset != 9 * CHUNK:
            return data
        return None if fault == "lost-write" else data[:77] + bytes([data[77] ^ 8]) + data[78:]

    target = FaultyBackend(source.size, checksums=True, hashed_writes=True, at_rest=storage)
    transfer = Transfer("t", source, target, options=options())
    with pytest.raises(CertificationFailed) as failure:
        await transfer.run()
    assert (failure.value.offset, failure.value.length) == (9 * CHUNK, CHUNK)
    assert transfer.stats.chunks_verified_on_write == 16  # the copy itself saw nothing wrong
    assert transfer.stats.mismatches == 0


async def test_image_check_hashes_only_the_chunks_the_target_holds_data_in() -> None:
    source = await source_disk(size=40 * CHUNK + 123)
    target = FaultyBackend(source.size, checksums=True, hashed_writes=True)
    store = MemoryCheckpointStore()
    opts = options(whole_image_check=False)
    await Transfer("t", source, target, checkpoints=store, options=opts).run()
    target.checksum_calls = 0

    result = await Transfer("t", source, target, checkpoints=store, options=options()).run()
    chunks = -(-source.size // CHUNK)
    assert result.stats.chunks_skipped == chunks  # nothing copied: only the check ran
    data_chunks = [
        index
        for index, segments in iter_chunks(await target.extents(), CHUNK)
        if not all(segment.zero for segment in segments)
    ]
    assert 0 < target.checksum_calls == len(data_chunks) < chunks
    assert result.source_digest == result.target_digest


class BlockHashingTarget(FaultyBackend):
    """A target that hashes runs of blocks itself, like a Ferry NBD peer (or refuses to)."""

    def __init__(self, size: int, *, can: bool = True) -> None:
        super().__init__(size, checksums=True, hashed_writes=True)
        self.can = can
        self.block_requests: list[tuple[int, int]] = []

    async def hash_blocks(self, offset: int, length: int, block: int) -> list[bytes] | None:
        self.block_requests.append((offset, length))
        if not self.can:
            return None
        data = await self.read(offset, length)
        return [chunk_hash(data[at : at + block]) for at in range(0, length, block)]


@pytest.mark.parametrize("can", [True, False], ids=["runs", "falls-back-per-chunk"])
async def test_image_check_hashes_runs_of_chunks_in_one_request_and_names_a_bad_one(
    can: bool,
) -> None:
    size = 200 * CHUNK + 5  # the last chunk clipped
    source = MemoryBackend.from_bytes(random.Random(31).randbytes(size), name="source")
    target = BlockHashingTarget(size, can=can)
    store = MemoryCheckpointStore()
    result = await Transfer("t", source, target, checkpoints=store, options=options()).run()
    assert result.source_digest == result.target_digest
    if can:
        # Runs of at most MAX_HASH_RANGE bytes, covering every chunk once, in order.
        assert len(target.block_requests) == -(-size // MAX_HASH_RANGE)
        assert sum(length for _, length in target.block_requests) == size
    else:
        assert target.block_requests == [(0, MAX_HASH_RANGE)]  # asked once, then not again
        assert target.checksum_calls == 201

    await target.write(123 * CHUNK + 99, b"\x00\x01")
    with pytest.raises(CertificationFailed) as failure:
        await Transfer("t", source, target, checkpoints=store, options=options()).run()
    assert (failure.value.offset, failure.value.length) == (123 * CHUNK, CHUNK)


async def test_certification_names_a_flipped_bit() -> None:
    source = MemoryBackend.from_bytes(random.Random(6).randbytes(16 * CHUNK), name="source")
    target = FaultyBackend(source.size)
    store = MemoryCheckpointStore()
    await Transfer("t", source, target, checkpoints=store, options=options()).run()
    await target.write(9 * CHUNK + 1234, bytes([(await target.read(9 * CHUNK + 1234, 1))[0] ^ 4]))

    with pytest.raises(CertificationFailed) as failure:
        await Transfer("t", source, target, checkpoints=store, options=options(certify=True)).run()
    assert (failure.value.offset, failure.value.length) == (9 * CHUNK, CHUNK)


def progress_reaching(chunks: int) -> tuple[asyncio.Event, Callable[[TransferProgress], None]]:
    reached = asyncio.Event()

    def on_progress(progress: TransferProgress) -> None:
        if progress.chunks_done >= chunks:
            reached.set()

    return reached, on_progress


async def slow_target(source: MemoryBackend) -> FaultyBackend:
    async def slow(offset: int, data: bytes) -> bytes:
        await asyncio.sleep(0.002)
        return data

    return FaultyBackend(source.size, slow)


async def test_stop_between_chunks_leaves_a_checkpoint_that_resumes() -> None:
    source = MemoryBackend.from_bytes(random.Random(8).randbytes(64 * CHUNK), name="source")
    target = await slow_target(source)
    store = MemoryCheckpointStore()
    reached, on_progress = progress_reaching(16)
    opts = options(progress_interval_s=0.001)
    transfer = Transfer("t", source, target, checkpoints=store, options=opts, progress=on_progress)
    task = asyncio.create_task(transfer.run())
    await reached.wait()
    transfer.stop()
    with pytest.raises(TransferCancelled):
        await task
    done = len(store.records)
    assert 16 <= done < 64
    assert all(record.round <= store.durable_round for record in store.records.values())

    resumed = await Transfer("t", source, target, checkpoints=store, options=options()).run()
    assert resumed.resumed
    assert resumed.stats.chunks_skipped == done
    assert resumed.stats.chunks_copied == 64 - done
    assert await image(target) == await image(source)


async def test_task_cancel_is_not_swallowed_and_keeps_the_checkpoint() -> None:
    source = MemoryBackend.from_bytes(random.Random(9).randbytes(64 * CHUNK), name="source")
    target = await slow_target(source)
    store = MemoryCheckpointStore()
    reached, on_progress = progress_reaching(10)
    opts = options(progress_interval_s=0.001)
    transfer = Transfer("t", source, target, checkpoints=store, options=opts, progress=on_progress)
    task = asyncio.create_task(transfer.run())
    await reached.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert len(store.records) >= 10
    assert all(record.round <= store.durable_round for record in store.records.values())
    await Transfer("t", source, target, checkpoints=store, options=options()).run()
    assert await image(target) == await image(source)


class LosesCancellations(MemoryCheckpointStore):
    """Like redis-py under Python 3.11: a cancellation landing inside a call may be lost."""

    async def record(self, records: Sequence[ChunkRecord]) -> None:
        await self._swallow_cancellation()
        await super().record(records)

    async def mark_durable(self, flush_round: int) -> None:
        await self._swallow_cancellation()
        await super().mark_durable(flush_round)

    @staticmethod
    async def _swallow_cancellation() -> None:
        try:
            await asyncio.sleep(0.001)
        except asyncio.CancelledError:
            pass  # the bug being modelled


async def test_a_store_that_loses_cancellations_does_not_hang_the_transfer() -> None:
    source = MemoryBackend.from_bytes(random.Random(14).randbytes(32 * CHUNK), name="source")
    target = FaultyBackend(source.size, hashed_writes=True)
    store = LosesCancellations()
    opts = options(flush_interval_s=0.001)
    async with asyncio.timeout(10):
        await Transfer("t", source, target, checkpoints=store, options=opts).run()
    assert await image(target) == await image(source)
    assert store.complete_digest is not None


async def test_pending_chunks_are_verified_not_resent() -> None:
    source = MemoryBackend.from_bytes(random.Random(10).randbytes(16 * CHUNK), name="source")
    target = FaultyBackend(source.size, checksums=True)
    store = MemoryCheckpointStore()
    await Transfer("t", source, target, checkpoints=store, options=options()).run()
    # As if the run had been killed before its last flush: every record still pending,
    # and chunk 5 never made it to the target.
    store.durable_round = 0
    store.complete_digest = None
    await target.zero(5 * CHUNK, CHUNK)
    writes_before = target.writes

    result = await Transfer("t", source, target, checkpoints=store, options=options()).run()
    assert result.stats.chunks_reverified == 15
    assert result.stats.chunks_resent == 1
    assert target.writes - writes_before == 1
    assert await image(target) == await image(source)


async def test_progress_reports_rate_eta_and_a_final_snapshot() -> None:
    source = MemoryBackend.from_bytes(random.Random(11).randbytes(32 * CHUNK), name="source")
    target = await slow_target(source)
    seen: list[TransferProgress] = []
    opts = options(progress_interval_s=0.01)
    await Transfer("t", source, target, options=opts, progress=seen.append).run()
    assert len(seen) >= 2
    assert [p.bytes_done for p in seen] == sorted(p.bytes_done for p in seen)
    last = seen[-1]
    assert last.phase == TransferPhase.DONE
    assert last.bytes_done == last.bytes_total == source.size
    assert last.chunks_done == last.chunks_total == 32
    assert any(p.rate_bytes_per_s > 0 and p.eta_s is not None for p in seen[:-1])


async def test_bandwidth_cap_can_be_lifted_while_running() -> None:
    source = MemoryBackend.from_bytes(random.Random(12).randbytes(16 * CHUNK), name="source")
    target = FaultyBackend(source.size)
    transfer = Transfer("t", source, target, options=options())
    transfer.set_bandwidth(1000)  # 1 kB/s: a megabyte would take a quarter of an hour
    transfer.set_source_queue_depth(1)
    task = asyncio.create_task(transfer.run())
    await asyncio.sleep(0.1)
    assert not task.done()
    transfer.set_bandwidth(None)
    transfer.set_source_queue_depth(8)
    await asyncio.wait_for(task, timeout=5)
    assert await image(target) == await image(source)


@pytest.mark.parametrize("length", [1, 4097, MIB, 3 * MIB + 1])
def test_is_zero_reads_any_buffer_without_copying_it(length: int) -> None:
    buffer = bytearray(length)
    assert is_zero(buffer) and is_zero(memoryview(buffer)) and is_zero(bytes(buffer))
    buffer[-1] = 1
    assert not is_zero(memoryview(buffer)) and not is_zero(buffer)
    assert is_zero(memoryview(buffer)[:-1])


async def test_a_shared_buffer_budget_caps_buffers_across_transfers() -> None:
    """Two transfers sharing a two-buffer budget never hold more than two chunk buffers."""
    budget = BufferBudget(2, CHUNK)
    held, most = 0, 0
    hold = budget.hold

    @contextlib.asynccontextmanager
    async def counting(length: int) -> AsyncIterator[memoryview]:
        nonlocal held, most
        async with hold(length) as view:
            held += 1
            most = max(most, held)
            try:
                yield view
            finally:
                held -= 1

    budget.hold = counting  # type: ignore[method-assign]
    sources = [
        MemoryBackend.from_bytes(random.Random(40 + n).randbytes(32 * CHUNK), name=f"s{n}")
        for n in range(2)
    ]
    targets = [await slow_target(source) for source in sources]
    opts = options(workers=4)
    await asyncio.gather(
        *(
            Transfer(f"t{n}", sources[n], targets[n], options=opts, buffers=budget).run()
            for n in range(2)
        )
    )
    assert [await image(t) for t in targets] == [await image(s) for s in sources]
    assert most == 2
