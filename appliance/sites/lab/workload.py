"""Guest workload generator: reproducible, logged reads and writes against a running VM's disk.

Works on any Backend (a LayeredDisk view on-prem, an NBD client of the cloud
cache). Operation ``i`` is drawn from one PRNG stream seeded by the
workload's seed, so the same seed gives the same operations; the bytes of
write ``n`` depend only on ``(seed, n, length)`` (:func:`write_content`), so the
log keeps a hash, not the data. Sizes run from 512 B to 1 MiB (log-uniform),
half 4 KiB-aligned and half at any byte, half of them in a hot region so
writes overwrite each other.

Operations run one at a time, in order, so "the disk after write K" is well
defined; that is what crash-consistency checks compare against. A write is
logged once the backend has acknowledged it, and the log is fsync'd in
batches: after a crash the log may lack the last acknowledged writes (at
most one batch), and a write in flight at the crash may have landed
without a record. :func:`verify` checks, for every byte range, the content
of the last logged write that covered it.
"""

from __future__ import annotations

import asyncio
import bisect
import json
import math
import os
import random
from collections.abc import Iterator
from dataclasses import dataclass, replace
from enum import StrEnum
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import xxhash

from appliance.clock import Clock, SystemClock
from appliance.storage.backend import Backend

__all__ = [
    "FlushRecord",
    "GuestWorkload",
    "Mismatch",
    "OpKind",
    "Operation",
    "WorkloadLog",
    "WorkloadSpec",
    "WorkloadStats",
    "WriteLog",
    "WriteRecord",
    "content_hash",
    "nth_write",
    "operations",
    "read_write_log",
    "verify",
    "write_content",
]

ALIGNMENT = 4096
LOG_FORMAT = 1


# -- the write log ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class WriteRecord:
    sequence: int
    offset: int
    length: int
    digest: str  # xxh3-128 of the bytes written
    time: float  # seconds since the epoch


@dataclass(frozen=True, slots=True)
class FlushRecord:
    """The backend was flushed after write ``upto_sequence``: everything up to it is durable."""

    upto_sequence: int
    time: float


@dataclass(frozen=True, slots=True)
class WorkloadLog:
    seed: int
    disk_size: int
    writes: tuple[WriteRecord, ...]
    flushes: tuple[FlushRecord, ...]

    @property
    def last_sequence(self) -> int:
        return self.writes[-1].sequence if self.writes else 0


def _line(document: dict[str, Any]) -> bytes:
    return json.dumps(document, separators=(",", ":")).encode() + b"\n"


def _append_and_sync(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
    os.fsync(fd)


class WriteLog:
    """An append-only JSON-lines log, one line per write, fsync'd every ``batch`` records.

    The first line names the seed and disk size; a torn last line (a crash
    while appending) is ignored when the log is read.
    """

    def __init__(self, path: Path, fd: int, *, seed: int, batch: int) -> None:
        self.path = path
        self.seed = seed
        self._fd = fd
        self._batch = batch
        self._pending: list[bytes] = []
        self._sync_lock = asyncio.Lock()

    @classmethod
    async def create(
        cls, path: Path | str, *, seed: int, disk_size: int, batch: int = 64
    ) -> WriteLog:
        path = Path(path)
        header = {"type": "header", "format": LOG_FORMAT, "seed": seed, "disk_size": disk_size}
        fd = await asyncio.to_thread(cls._create_file, path, _line(header))
        return cls(path, fd, seed=seed, batch=batch)

    @staticmethod
    def _create_file(path: Path, header: bytes) -> int:
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_CLOEXEC
        fd = os.open(path, flags, 0o600)
        try:
            _append_and_sync(fd, header)
            directory = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                os.fsync(directory)
            finally:
                os.close(directory)
        except BaseException:
            os.close(fd)
            raise
        return fd

    async def record_write(self, record: WriteRecord) -> None:
        self._pending.append(
            _line(
                {
                    "type": "write",
                    "seq": record.sequence,
                    "offset": record.offset,
                    "length": record.length,
                    "hash": record.digest,
                    "time": record.time,
                }
            )
        )
        if len(self._pending) >= self._batch:
            await self.sync()

    async def record_flush(self, upto_sequence: int, time: float) -> None:
        """Log a backend flush, durably: it promises everything up to it is on disk."""
        self._pending.append(_line({"type": "flush", "upto": upto_sequence, "time": time}))
        await self.sync()

    async def sync(self) -> None:
        async with self._sync_lock:
            if self._fd < 0:
                raise ValueError(f"write log {self.path} is closed")
            data, self._pending = b"".join(self._pending), []
            await asyncio.to_thread(_append_and_sync, self._fd, data)

    async def close(self) -> None:
        if self._fd >= 0:
            await self.sync()
            os.close(self._fd)
            self._fd = -1

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()


def _parse_log(path: Path, data: bytes) -> WorkloadLog:
    lines = data.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    elif lines:
        lines.pop()  # torn by a crash while appending
    if not lines:
        raise ValueError(f"{path}: not a workload log (no header)")
    header = json.loads(lines[0])
    if header.get("type") != "header" or header.get("format") != LOG_FORMAT:
        raise ValueError(f"{path}: not a version {LOG_FORMAT} workload log")
    writes: list[WriteRecord] = []
    flushes: list[FlushRecord] = []
    for line in lines[1:]:
        item = json.loads(line)
        if item["type"] == "write":
            writes.append(
                WriteRecord(item["seq"], item["offset"], item["length"], item["hash"], item["time"])
            )
        elif item["type"] == "flush":
            flushes.append(FlushRecord(item["upto"], item["time"]))
    return WorkloadLog(header["seed"], header["disk_size"], tuple(writes), tuple(flushes))


def load_write_log(path: Path) -> WorkloadLog:
    return _parse_log(path, path.read_bytes())


async def read_write_log(path: Path | str) -> WorkloadLog:
    return await asyncio.to_thread(load_write_log, Path(path))


# -- the workload ---------------------------------------------------------------------------------


class OpKind(StrEnum):
    READ = "read"
    WRITE = "write"


@dataclass(frozen=True, slots=True)
class WorkloadSpec:
    seed: int
    read_ratio: float = 0.3
    aligned_ratio: float = 0.5
    min_length: int = 512
    max_length: int = 1024 * 1024
    hot_ratio: float = 0.5  # share of operations that land in the hot region
    hot_fraction: float = 0.05  # the hot region: this share of the disk, from its start

    def __post_init__(self) -> None:
        if not 0 < self.min_length <= self.max_length:
            raise ValueError(f"bad lengths {self.min_length}..{self.max_length}")
        for name in ("read_ratio", "aligned_ratio", "hot_ratio", "hot_fraction"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be between 0 and 1")


@dataclass(frozen=True, slots=True)
class Operation:
    """One guest I/O; ``sequence`` numbers writes from 1 (0 for reads)."""

    kind: OpKind
    offset: int
    length: int
    sequence: int = 0


@dataclass(frozen=True, slots=True)
class WorkloadStats:
    reads: int
    writes: int
    bytes_read: int
    bytes_written: int
    flushes: int
    last_sequence: int


@dataclass(frozen=True, slots=True)
class Mismatch:
    """Bytes where the last logged write ``sequence`` should be visible but is not."""

    offset: int
    length: int
    sequence: int
    first_difference: int  # the disk offset of the first byte that differs


def write_content(seed: int, sequence: int, length: int) -> bytes:
    """The exact bytes of write ``sequence`` of the workload seeded ``seed``."""
    return random.Random(f"ferry-workload:{seed}:{sequence}").randbytes(length)


def content_hash(data: bytes) -> str:
    return str(xxhash.xxh3_128_hexdigest(data))


def _draw(rng: random.Random, spec: WorkloadSpec, size: int) -> tuple[OpKind, int, int]:
    kind = OpKind.READ if rng.random() < spec.read_ratio else OpKind.WRITE
    length = int(math.exp(rng.uniform(math.log(spec.min_length), math.log(spec.max_length))))
    aligned = rng.random() < spec.aligned_ratio
    hot = rng.random() < spec.hot_ratio
    region = max(1, int(size * spec.hot_fraction)) if hot else size
    region = max(region, min(size, spec.max_length))  # room for the largest request
    length = min(max(length, spec.min_length), region)
    if aligned and length >= ALIGNMENT and region >= ALIGNMENT:
        length = length // ALIGNMENT * ALIGNMENT
        offset = rng.randrange((region - length) // ALIGNMENT + 1) * ALIGNMENT
    else:
        offset = rng.randrange(region - length + 1)
    return kind, offset, length


def operations(spec: WorkloadSpec, size: int) -> Iterator[Operation]:
    """The endless, reproducible stream of operations for a disk of ``size`` bytes."""
    if size <= 0:
        raise ValueError("a workload needs a disk of at least one byte")
    rng = random.Random(f"ferry-workload-ops:{spec.seed}")
    writes = 0
    while True:
        kind, offset, length = _draw(rng, spec, size)
        if kind is OpKind.WRITE:
            writes += 1
            yield Operation(kind, offset, length, writes)
        else:
            yield Operation(kind, offset, length)


def nth_write(spec: WorkloadSpec, size: int, sequence: int) -> tuple[Operation, bytes]:
    """Write ``sequence`` of a workload and its bytes, found again by replaying the stream."""
    if sequence < 1:
        raise ValueError(f"writes are numbered from 1, not {sequence}")
    for operation in operations(spec, size):
        if operation.sequence == sequence:
            return operation, write_content(spec.seed, sequence, operation.length)
    raise AssertionError("the operation stream is endless")


class GuestWorkload:
    """Drives a backend like a guest would; ``run`` may be called again to continue."""

    def __init__(
        self,
        backend: Backend,
        spec: WorkloadSpec,
        log: WriteLog | None = None,
        *,
        clock: Clock | None = None,
    ) -> None:
        if log is not None and log.seed != spec.seed:
            raise ValueError(f"the log is for seed {log.seed}, the workload has {spec.seed}")
        self._backend = backend
        self._spec = spec
        self._log = log
        self._clock = clock or SystemClock()
        self._stream = operations(spec, backend.size)
        self._stats = WorkloadStats(0, 0, 0, 0, 0, 0)

    def stats(self) -> WorkloadStats:
        return self._stats

    async def run(
        self,
        *,
        count: int | None = None,
        duration: float | None = None,
        rate: float | None = None,
        flush_every: int | None = None,
    ) -> WorkloadStats:
        """Do ``count`` operations, or for ``duration`` seconds, or until cancelled.

        ``rate`` caps operations per second; ``flush_every`` flushes the backend
        (like a guest's fsync) after every that many writes, and logs the flush.
        """
        start = self._clock.monotonic()
        done = 0
        while (count is None or done < count) and (
            duration is None or self._clock.monotonic() - start < duration
        ):
            if rate is not None:
                delay = start + done / rate - self._clock.monotonic()
                if delay > 0:
                    await self._clock.sleep(delay)
            operation = next(self._stream)
            await self._perform(operation)
            done += 1
            if flush_every and operation.kind is OpKind.WRITE:
                if operation.sequence % flush_every == 0:
                    await self.flush()
        return self._stats

    async def _perform(self, operation: Operation) -> None:
        stats = self._stats
        if operation.kind is OpKind.READ:
            await self._backend.read(operation.offset, operation.length)
            self._stats = replace(
                stats, reads=stats.reads + 1, bytes_read=stats.bytes_read + operation.length
            )
            return
        data, digest = await asyncio.to_thread(
            _content_and_hash, self._spec.seed, operation.sequence, operation.length
        )
        await self._backend.write(operation.offset, data)
        self._stats = replace(
            stats,
            writes=stats.writes + 1,
            bytes_written=stats.bytes_written + operation.length,
            last_sequence=operation.sequence,
        )
        if self._log is not None:
            record = WriteRecord(
                sequence=operation.sequence,
                offset=operation.offset,
                length=operation.length,
                digest=digest,
                time=self._clock.now().timestamp(),
            )
            await self._log.record_write(record)

    async def flush(self) -> None:
        """Flush the backend, like a guest's fsync, and log that everything so far is durable."""
        await self._backend.flush()
        self._stats = replace(self._stats, flushes=self._stats.flushes + 1)
        if self._log is not None:
            now = self._clock.now().timestamp()
            await self._log.record_flush(self._stats.last_sequence, now)


def _content_and_hash(seed: int, sequence: int, length: int) -> tuple[bytes, str]:
    data = write_content(seed, sequence, length)
    return data, content_hash(data)


# -- checking ------------------------------------------------------------------------------------


def visible_pieces(writes: list[WriteRecord]) -> list[tuple[int, int, WriteRecord]]:
    """``(start, end, write)``: which write's bytes each range must hold, last write wins."""
    starts: list[int] = []  # covered ranges, sorted and disjoint
    ends: list[int] = []
    pieces: list[tuple[int, int, WriteRecord]] = []
    for write in sorted(writes, key=lambda w: w.sequence, reverse=True):
        start, end = write.offset, write.offset + write.length
        first = bisect.bisect_right(ends, start)
        last, position = first, start
        while last < len(starts) and starts[last] < end:
            if position < starts[last]:
                pieces.append((position, starts[last], write))
            position = max(position, ends[last])
            last += 1
        if position < end:
            pieces.append((position, end, write))
        merged_start = min(start, starts[first]) if first < last else start
        merged_end = max(end, ends[last - 1]) if first < last else end
        starts[first:last] = [merged_start]
        ends[first:last] = [merged_end]
    return sorted(pieces, key=lambda piece: piece[0])


def _first_difference(expected: bytes, found: bytes) -> int:
    for index, (a, b) in enumerate(zip(expected, found, strict=True)):
        if a != b:
            return index
    return 0


async def verify(
    backend: Backend, log: WorkloadLog | Path, upto_sequence: int | None = None
) -> list[Mismatch]:
    """Where ``backend`` does not hold the last logged write (up to ``upto_sequence``).

    Bytes no logged write covered are not checked. Raises ValueError if a
    record's hash does not match the content its seed regenerates (the wrong
    log, or a damaged one).
    """
    if isinstance(log, Path):
        log = await read_write_log(log)
    writes = [w for w in log.writes if upto_sequence is None or w.sequence <= upto_sequence]
    by_write: dict[int, list[tuple[int, int]]] = {}
    records = {write.sequence: write for write in writes}
    for start, end, write in visible_pieces(writes):
        by_write.setdefault(write.sequence, []).append((start, end))
    mismatches: list[Mismatch] = []
    for sequence in sorted(by_write):
        write = records[sequence]
        content, digest = await asyncio.to_thread(
            _content_and_hash, log.seed, sequence, write.length
        )
        if digest != write.digest:
            raise ValueError(f"write {sequence}: the log's hash does not match seed {log.seed}")
        for start, end in by_write[sequence]:
            expected = content[start - write.offset : end - write.offset]
            found = await backend.read(start, end - start)
            if found != expected:
                first = start + _first_difference(expected, found)
                mismatches.append(Mismatch(start, end - start, sequence, first))
    return sorted(mismatches, key=lambda m: m.offset)
