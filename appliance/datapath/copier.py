"""Copying one unit of work: read, hash, write, verify, record.

:class:`ChunkCopier` is what the transfer engine's workers run for each item
of the plan:

* a :class:`ChunkWork` is read from the source (only its data segments when
  the chunk is wholly covered; the whole chunk when it is only partly covered,
  so its hash is always the whole chunk's), hashed, written segment by
  segment (all-zero segments as ``zero(punch_hole=True)``: WRITE_ZEROES that
  may deallocate, so the target stays as sparse as the source; data through
  the bandwidth cap), then checked at the target. The cheapest check first:
  a target that can hash what it receives (:class:`VerifiedWriter`, Ferry's
  hashed NBD writes) answers each data write with the digest of the bytes
  it got, so a chunk written wholly as data is verified with no extra
  request. Other chunks (zero or unwritten segments, targets without the
  extension) are hashed at the target after the write (see
  :class:`~appliance.datapath.imagecheck.RangeHasher`: a checksum request,
  else a read-back). A mismatch is retried once, writing the whole chunk,
  then raises ChunkMismatch.
* a chunk an interrupted run recorded (``expected`` set) is first hashed at the
  target; when it matches it is recorded again without being sent.
* a :class:`DataRun` (adjacent whole-data chunks) is read with one request
  and written with one request per stretch of non-zero chunks (zero ones are
  zeroed as above); each chunk is still hashed and recorded on its own, and a
  hashed write of several chunks is checked against the hash of all its
  bytes. A mismatch sends the run's chunks again one by one.
* a :class:`ZeroRun` is one ``zero()`` over many chunks.

Transient errors retry the whole unit with backoff; only verified chunks are
handed to the checkpoint writer. A unit pays the bandwidth cap for the data it
is about to send *before* it takes a buffer, so a capped transfer waiting for
its turn holds no memory that other transfers sharing the budget could use.
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol, TypeVar, runtime_checkable

import structlog

from appliance.clock import Clock
from appliance.datapath.buffers import BufferBudget, ReadsInto
from appliance.datapath.checkpoint import CheckpointWriter
from appliance.datapath.chunks import ChunkTable, ChunkWork, DataRun, Work, ZeroRun
from appliance.datapath.imagecheck import RangeHasher
from appliance.datapath.progress import ProgressMeter
from appliance.datapath.retry import RetryPolicy, with_retries
from appliance.datapath.throttle import QueueDepthLimiter, TokenBucket
from appliance.errors import ChunkMismatch
from appliance.storage.backend import Backend
from appliance.storage.extents import Extent
from appliance.storage.hashing import chunk_hash, zero_hash

log = structlog.get_logger(__name__)

Buffer = bytes | bytearray
T = TypeVar("T")


_ZERO_BLOCK = 1 << 20


@functools.lru_cache(maxsize=8)
def _zeroes(length: int) -> bytes:
    return bytes(length)


def zeroes(length: int) -> memoryview:
    """``length`` zero bytes, sliced from a cached block (one serves every shorter length)."""
    return memoryview(_zeroes(max(length, _ZERO_BLOCK)))[:length]


def is_zero(data: Buffer | memoryview) -> bool:
    # bytes.startswith takes any buffer and is a memcmp, with no copy; comparing a
    # memoryview with == goes element by element, 100x slower.
    return _zeroes(max(len(data), _ZERO_BLOCK)).startswith(data)


@runtime_checkable
class VerifiedWriter(Protocol):
    async def write_verified(self, offset: int, data: bytes | memoryview) -> bytes | None:
        """Write; the chunk_hash of the bytes the target received, or None if it cannot tell."""
        ...


@dataclass(slots=True)
class Counters:
    """What a transfer did; mutated by the workers, copied out as TransferStats."""

    bytes_read: int = 0
    bytes_written: int = 0
    zero_bytes: int = 0
    bytes_read_back: int = 0
    chunks_copied: int = 0
    chunks_zero: int = 0
    chunks_skipped: int = 0
    chunks_reverified: int = 0
    chunks_resent: int = 0
    retries: int = 0
    mismatches: int = 0
    chunks_verified_on_write: int = 0


@dataclass(frozen=True, slots=True)
class CopyContext:
    """Everything a copier needs, fixed for one transfer."""

    source: Backend
    target: Backend
    table: ChunkTable
    writer: CheckpointWriter
    meter: ProgressMeter
    bandwidth: TokenBucket
    source_io: QueueDepthLimiter
    target_hasher: RangeHasher
    policy: RetryPolicy
    clock: Clock
    verify: bool
    target_is_zero: bool
    buffers: BufferBudget
    """Where chunk buffers come from: one per unit of work in hand, maybe shared."""


class ChunkCopier:
    def __init__(self, context: CopyContext, counters: Counters) -> None:
        self._c = context
        self.counters = counters
        source, target = context.source, context.target
        self._reading_source = source if isinstance(source, ReadsInto) else None
        self._hashing_target = (
            target if context.verify and isinstance(target, VerifiedWriter) else None
        )

    async def copy(self, work: Work) -> None:
        if isinstance(work, ZeroRun):
            await self._zero_run(work)
        elif isinstance(work, DataRun):
            await self._data_run(work)
        else:
            await self._chunk(work)

    def _on_retry(self, error: BaseException) -> None:
        self.counters.retries += 1
        log.warning("chunk retry", error=f"{type(error).__name__}: {error}")

    async def _retrying(self, start: int, length: int, operation: Callable[[], Awaitable[T]]) -> T:
        return await with_retries(
            self._c.policy, self._c.clock, start, length, operation, self._on_retry
        )

    async def _zero_run(self, run: ZeroRun) -> None:
        if not self._c.target_is_zero:
            await self._retrying(
                run.start,
                run.length,
                lambda: self._c.target.zero(run.start, run.length, punch_hole=True),
            )
        for index in run.indices:
            self._c.table.set(index, zero_hash(self._c.table.bounds(index)[1]))
        self._c.writer.add_many(run.indices, None)
        self.counters.zero_bytes += run.length
        self.counters.chunks_zero += len(run.indices)
        self._c.meter.add(run.allocated_bytes, len(run.indices), worked=False)

    async def _chunk(self, work: ChunkWork) -> None:
        if work.expected is not None and await self._still_at_target(work, work.expected):
            return
        try:
            digest, zero = await self._retrying(work.start, work.length, lambda: self._send(work))
        except ChunkMismatch as mismatch:
            self.counters.mismatches += 1
            log.warning("chunk mismatch, sending it again whole", error=str(mismatch))
            digest, zero = await self._retrying(
                work.start, work.length, lambda: self._send(work, whole=True)
            )
        self._done(work, digest, zero, worked=True)
        self.counters.chunks_copied += 1

    async def _data_run(self, run: DataRun) -> None:
        try:
            sent = await self._retrying(run.start, run.length, lambda: self._send_run(run))
        except ChunkMismatch as mismatch:
            self.counters.mismatches += 1
            log.warning("run mismatch, sending its chunks one by one", error=str(mismatch))
            for work in run.chunks:
                await self._chunk(work)
            return
        for work, (digest, zero) in zip(run.chunks, sent, strict=True):
            self._done(work, digest, zero, worked=True)
        self.counters.chunks_copied += len(run.chunks)

    def _done(self, work: ChunkWork, digest: bytes, zero: bool, *, worked: bool) -> None:
        self._c.table.set(work.index, digest)
        self._c.writer.add(work.index, None if zero else digest)
        self._c.meter.add(work.allocated_bytes, 1, worked=worked)

    async def _still_at_target(self, work: ChunkWork, expected: bytes) -> bool:
        """An earlier run wrote and verified this chunk; is it still there?"""
        found = await self._retrying(
            work.start, work.length, lambda: self._c.target_hasher.hash(work.start, work.length)
        )
        if found != expected:
            self.counters.chunks_resent += 1
            return False
        self.counters.chunks_reverified += 1
        self._done(work, expected, expected == zero_hash(work.length), worked=False)
        return True

    async def _send(self, work: ChunkWork, *, whole: bool = False) -> tuple[bytes, bool]:
        # Data segments found all zero after the read are paid for and not sent: a cap
        # errs on the slow side.
        await self._c.bandwidth.acquire(work.length if whole else work.data_bytes)
        async with self._c.buffers.hold(work.length) as data:
            return await self._send_from(work, data, whole)

    async def _send_from(
        self, work: ChunkWork, data: memoryview, whole: bool
    ) -> tuple[bytes, bool]:
        await self._read(work, data)
        digest = chunk_hash(data)
        zero = is_zero(data)
        verified = await self._write(work, data, digest, zero=zero, whole=whole)
        if verified:
            self.counters.chunks_verified_on_write += 1
        elif self._c.verify:
            await self._check_at_target(work, digest)
        return digest, zero

    async def _read(self, work: ChunkWork, data: memoryview) -> None:
        """Fill ``data`` with the chunk: only its data segments when it is wholly covered."""
        async with self._c.source_io.slot():
            if not work.covered or work.segments == (Extent(work.start, work.length),):
                await self._read_range(work.start, data)
                self.counters.bytes_read += work.length
                return
            for segment in work.segments:
                at = segment.start - work.start
                piece = data[at : at + segment.length]
                if segment.data:
                    await self._read_range(segment.start, piece)
                    self.counters.bytes_read += segment.length
                else:
                    piece[:] = zeroes(segment.length)  # zero without reading it

    async def _read_range(self, offset: int, view: memoryview) -> None:
        if self._reading_source is not None:
            await self._reading_source.read_into(offset, view)
        else:
            view[:] = await self._c.source.read(offset, len(view))

    async def _write(
        self, work: ChunkWork, data: memoryview, digest: bytes, *, zero: bool, whole: bool
    ) -> bool:
        """Write the covered segments; ``whole`` rewrites the whole chunk, zeroes included.

        True when that verified the chunk: all of it went as data writes and the
        target's digest of what it received matched each (a mismatch raises).
        """
        segments = (Extent(work.start, work.length),) if whole else work.segments
        verified = sum(segment.length for segment in segments) == work.length
        for segment in segments:
            at = segment.start - work.start
            piece = data[at : at + segment.length]
            # A segment spanning the whole chunk was tested already (``zero``).
            whole_chunk = segment.length == work.length
            if segment.zero or zero or (not whole_chunk and is_zero(piece)):
                if whole or not self._c.target_is_zero:
                    await self._c.target.zero(segment.start, segment.length, punch_hole=True)
                self.counters.zero_bytes += segment.length
                verified = False
                continue
            received = await self._write_data(segment.start, piece)
            self.counters.bytes_written += segment.length
            if received is None:
                verified = False
                continue
            expected = digest if whole_chunk else chunk_hash(piece)
            if received != expected:
                raise ChunkMismatch(work.start, work.length, expected.hex(), received.hex())
        return verified

    async def _write_data(self, offset: int, piece: memoryview) -> bytes | None:
        """Write one data segment; the target's digest of it when it can hash writes."""
        if self._hashing_target is None:
            await self._c.target.write(offset, piece)
            return None
        return await self._hashing_target.write_verified(offset, piece)

    async def _send_run(self, run: DataRun) -> list[tuple[bytes, bool]]:
        """Read the run at once, write it by stretches; each chunk's (hash, all zero)."""
        await self._c.bandwidth.acquire(run.length)
        async with self._c.buffers.hold(run.length) as data:
            async with self._c.source_io.slot():
                await self._read_range(run.start, data)
            self.counters.bytes_read += run.length
            hashed = [
                (chunk_hash(piece), is_zero(piece))
                for piece in (data[w.start - run.start : w.end - run.start] for w in run.chunks)
            ]
            unverified = await self._write_stretches(run, data, hashed)
            if self._c.verify:
                for index in unverified:
                    await self._check_at_target(run.chunks[index], hashed[index][0])
            self.counters.chunks_verified_on_write += len(run.chunks) - len(unverified)
            return hashed

    async def _write_stretches(
        self, run: DataRun, data: memoryview, hashed: list[tuple[bytes, bool]]
    ) -> list[int]:
        """Write each stretch of non-zero chunks with one request, zero chunks as zeroes.

        Returns the indices (in the run) of the chunks no write digest verified.
        """
        unverified: list[int] = []
        first = 0
        while first < len(hashed):
            zero = hashed[first][1]
            last = first
            while last + 1 < len(hashed) and hashed[last + 1][1] == zero:
                last += 1
            start, end = run.chunks[first].start, run.chunks[last].end
            stretch = data[start - run.start : end - run.start]
            if zero:
                if not self._c.target_is_zero:
                    await self._c.target.zero(start, end - start, punch_hole=True)
                self.counters.zero_bytes += end - start
                unverified.extend(range(first, last + 1))
            else:
                # One chunk: its hash is known already; several: hash what is sent.
                expected = hashed[first][0] if first == last else None
                if not await self._write_checked(start, stretch, expected):
                    unverified.extend(range(first, last + 1))
            first = last + 1
        return unverified

    async def _write_checked(self, start: int, data: memoryview, expected: bytes | None) -> bool:
        """One data write; True when the target's digest of it matched (a mismatch raises).

        The bandwidth was paid for before the run took its buffer."""
        received = await self._write_data(start, data)
        self.counters.bytes_written += len(data)
        if received is None:
            return False
        expected = expected or chunk_hash(data)
        if received != expected:
            raise ChunkMismatch(start, len(data), expected.hex(), received.hex())
        return True

    async def _check_at_target(self, work: ChunkWork, digest: bytes) -> None:
        found = await self._c.target_hasher.hash(work.start, work.length)
        if found != digest:
            raise ChunkMismatch(work.start, work.length, digest.hex(), found.hex())
