"""Chunk planning: turning extents into the units of work the transfer engine copies.

A disk is an array of fixed-size chunks; chunk ``i`` covers
``[i * chunk_size, min((i + 1) * chunk_size, size))``. Extents are split at
chunk boundaries, and the pieces that fall in one chunk become its
*segments* (data or zero extents). The plan yields, in disk order:

* :class:`ChunkWork` for a chunk with data (or one only partly covered by the
  requested extents, or one an interrupted run recorded and that must be
  verified before it is skipped);
* :class:`ZeroRun` for consecutive chunks that are wholly covered and all zero,
  merged so a large hole costs one zero request, not one per chunk;
* :class:`DataRun` for consecutive chunks that are wholly data (the common
  case of a full copy), merged up to ``max_data_run`` bytes so they travel as
  one read and one write: per-request costs (a round trip, a wake-up of each
  peer) are paid once per run, while hashes and checkpoints stay per chunk.

Chunks already durable at the target are left out. The per-chunk hash is
always the hash of the whole chunk's bytes, so a hole and written zeroes hash
alike and both sides of a transfer can compare chunk by chunk.

:class:`ChunkTable` keeps one state and one hash per chunk in two flat
bytearrays (17 bytes a chunk: 17 MiB for a 1 TiB disk at 1 MiB chunks).
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from appliance.storage.extents import Extent, allocated_length, iter_chunks
from appliance.storage.hashing import DIGEST_SIZE

DEFAULT_CHUNK_SIZE = 1 << 20
MAX_ZERO_RUN = 1 << 30
"""Largest zero request the plan makes (NBD lengths are 32-bit; servers cap lower)."""
MAX_DATA_RUN = 4 << 20
"""Largest read or write a run of data chunks makes (NBD peers all accept 32 MiB)."""


@dataclass(frozen=True, slots=True)
class ChunkWork:
    """One chunk to copy. ``expected`` is the hash an interrupted run recorded for it."""

    index: int
    start: int
    length: int
    segments: tuple[Extent, ...]
    expected: bytes | None = None

    @property
    def end(self) -> int:
        return self.start + self.length

    @property
    def covered(self) -> bool:
        """True when the segments cover the whole chunk (else the whole chunk is read)."""
        return sum(segment.length for segment in self.segments) == self.length

    @property
    def data_bytes(self) -> int:
        return sum(segment.length for segment in self.segments if not segment.zero)

    @property
    def allocated_bytes(self) -> int:
        """Bytes of the chunk the source has allocated (data and written zeroes)."""
        return allocated_length(self.segments)

    @property
    def plain_data(self) -> bool:
        """Wholly one data extent, nothing to verify first: it can travel in a DataRun."""
        return (
            self.expected is None
            and len(self.segments) == 1
            and self.segments[0].data
            and self.segments[0].length == self.length
        )


@dataclass(frozen=True, slots=True)
class DataRun:
    """Consecutive whole-data chunks, read and written as one range (``chunks`` in order)."""

    chunks: tuple[ChunkWork, ...]

    @property
    def start(self) -> int:
        return self.chunks[0].start

    @property
    def end(self) -> int:
        return self.chunks[-1].end

    @property
    def length(self) -> int:
        return self.end - self.start


@dataclass(frozen=True, slots=True)
class ZeroRun:
    """Whole chunks ``first_index`` .. ``last_index`` that are zero at the source.

    ``allocated_bytes`` counts the written zeroes among them (holes are not allocated).
    """

    first_index: int
    last_index: int
    start: int
    length: int
    allocated_bytes: int = 0

    @property
    def end(self) -> int:
        return self.start + self.length

    @property
    def indices(self) -> range:
        return range(self.first_index, self.last_index + 1)


Work = ChunkWork | DataRun | ZeroRun


class ChunkState(enum.IntEnum):
    NONE = 0
    PENDING = 1
    """Written and verified by an earlier run, not known flushed: verify before skipping."""
    DURABLE = 2


class ChunkTable:
    """A state and a hash per chunk of one disk, in compact arrays."""

    def __init__(self, size: int, chunk_size: int) -> None:
        if chunk_size <= 0:
            raise ValueError(f"chunk size must be positive, got {chunk_size}")
        self.size = size
        self.chunk_size = chunk_size
        self.count = -(-size // chunk_size)
        self._states = bytearray(self.count)
        self._hashes = bytearray(self.count * DIGEST_SIZE)

    def bounds(self, index: int) -> tuple[int, int]:
        """(start, length) of chunk ``index``."""
        start = index * self.chunk_size
        return start, min(self.chunk_size, self.size - start)

    def state(self, index: int) -> ChunkState:
        return ChunkState(self._states[index])

    def digest(self, index: int) -> bytes | None:
        if self._states[index] == ChunkState.NONE:
            return None
        return bytes(self._hashes[index * DIGEST_SIZE : (index + 1) * DIGEST_SIZE])

    def set(self, index: int, digest: bytes, state: ChunkState = ChunkState.DURABLE) -> None:
        self._hashes[index * DIGEST_SIZE : (index + 1) * DIGEST_SIZE] = digest
        self._states[index] = state

    def clear(self, index: int) -> None:
        self._states[index] = ChunkState.NONE

    def indices(self, state: ChunkState) -> Iterator[int]:
        return (index for index, value in enumerate(self._states) if value == state)

    def complete(self) -> bool:
        return ChunkState.NONE not in self._states

    def digests(self) -> bytes:
        """Every chunk's hash in order (the input of the whole-image digest)."""
        if not self.complete():
            raise ValueError("not every chunk has a hash")
        return bytes(self._hashes)


def normalized(extents: Iterable[Extent], size: int) -> list[Extent]:
    """Sorted, non-empty, inside the disk; overlapping extents are a caller's bug."""
    ordered = sorted((extent for extent in extents if extent.length), key=lambda e: e.start)
    previous_end = 0
    for extent in ordered:
        if extent.start < previous_end:
            raise ValueError(f"overlapping extents at offset {extent.start}")
        if extent.end > size:
            raise ValueError(f"extent {extent.start}+{extent.length} ends past the disk ({size})")
        previous_end = extent.end
    return ordered


def plan(
    extents: Iterable[Extent],
    table: ChunkTable,
    max_zero_run: int = MAX_ZERO_RUN,
    max_data_run: int = MAX_DATA_RUN,
) -> Iterator[Work]:
    """The work left to copy ``extents``, given what ``table`` says is already done."""
    return _data_runs(_chunk_plan(extents, table, max_zero_run), max_data_run)


def _data_runs(work: Iterable[ChunkWork | ZeroRun], max_length: int) -> Iterator[Work]:
    """Merge adjacent plain-data chunks into DataRuns of at most ``max_length`` bytes."""
    pending: list[ChunkWork] = []

    def flush() -> Iterator[Work]:
        if len(pending) == 1:
            yield pending[0]
        elif pending:
            yield DataRun(tuple(pending))
        pending.clear()

    for item in work:
        if isinstance(item, ChunkWork) and item.plain_data:
            if pending and (
                pending[-1].end != item.start or item.end - pending[0].start > max_length
            ):
                yield from flush()
            pending.append(item)
            continue
        yield from flush()
        yield item
    yield from flush()


def _chunk_plan(
    extents: Iterable[Extent], table: ChunkTable, max_zero_run: int
) -> Iterator[ChunkWork | ZeroRun]:
    run: ZeroRun | None = None
    for index, pieces in iter_chunks(normalized(extents, table.size), table.chunk_size):
        segments = tuple(pieces)
        state = table.state(index)
        if state == ChunkState.DURABLE:
            continue
        start, length = table.bounds(index)
        whole_zero = all(s.zero for s in segments) and segments[0].length == length
        if whole_zero and state == ChunkState.NONE:
            allocated = allocated_length(segments)
            if run and run.end == start and run.length + length <= max_zero_run:
                run = ZeroRun(
                    run.first_index,
                    index,
                    run.start,
                    run.length + length,
                    run.allocated_bytes + allocated,
                )
            else:
                if run:
                    yield run
                run = ZeroRun(index, index, start, length, allocated)
            continue
        if run:
            yield run
            run = None
        expected = table.digest(index) if state == ChunkState.PENDING else None
        yield ChunkWork(index, start, length, segments, expected)
    if run:
        yield run


@dataclass(frozen=True, slots=True)
class PlanSize:
    """How much a plan covers, and how much of it an earlier run already made durable.

    Bytes are allocated bytes (data and written zeroes), what an operator
    thinks of as the disk's content; holes cost nothing and count for nothing.
    """

    chunks: int
    bytes: int
    done_chunks: int
    done_bytes: int


def measure(extents: list[Extent], table: ChunkTable) -> PlanSize:
    """Size of the work for ``extents`` (already normalized): chunks, allocated bytes."""
    chunks = total = done_chunks = done_bytes = 0
    for index, pieces in iter_chunks(extents, table.chunk_size):
        length = allocated_length(pieces)
        chunks += 1
        total += length
        if table.state(index) == ChunkState.DURABLE:
            done_chunks += 1
            done_bytes += length
    return PlanSize(chunks, total, done_chunks, done_bytes)
