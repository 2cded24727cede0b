"""Hashing ranges of a backend, and the whole-image check (DESIGN.md §9).

:class:`RangeHasher` asks the backend for the hash when it can compute it
where the data lives (``checksum()``, the Ferry NBD extension: no data comes
back over the link). Otherwise it reads the range back and hashes it here;
over a link that costs as many bytes as the data itself, so an NBD target
without the extension doubles the traffic of verification.

The whole-image digest is the hash of every chunk's hash in chunk order.
:func:`hash_image` fills a :class:`ChunkTable` for one side, taking chunks
the backend maps as zero (holes or zeroes: NBD BLOCK_STATUS over a link)
from its extent map without reading them; only chunks holding data are
hashed, by the backend itself when it can, and in runs of adjacent chunks
(``hash_blocks``: one request answers a digest per chunk of up to
:data:`MAX_HASH_RANGE` bytes). So a chunk the copy never wrote
shows up as a zero chunk where the source has data, and a chunk that holds
other bytes than the source's shows up in its hash. Comparing two tables
names the first chunk that differs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Protocol, runtime_checkable

from appliance.clock import Clock
from appliance.datapath.chunks import ChunkTable
from appliance.datapath.retry import RetryPolicy, with_retries
from appliance.datapath.workers import run_bounded
from appliance.storage.backend import Backend, HashesBlocks
from appliance.storage.extents import iter_chunks
from appliance.storage.hashing import chunk_hash, zero_hash

MAX_HASH_RANGE = 8 << 20
"""The image check asks for the hashes of up to this many bytes of adjacent chunks at once."""


@runtime_checkable
class Checksummer(Protocol):
    async def checksum(self, offset: int, length: int) -> bytes | None: ...


class RangeHasher:
    """The hash of a byte range of ``backend``, computed remotely when the backend can."""

    def __init__(self, backend: Backend) -> None:
        self._backend = backend
        self._remote = backend if isinstance(backend, Checksummer) else None
        self._blocks = backend if isinstance(backend, HashesBlocks) else None
        self.bytes_read_back = 0

    @property
    def remote(self) -> bool:
        return self._remote is not None

    async def hash(self, offset: int, length: int) -> bytes:
        if self._remote is not None:
            digest = await self._remote.checksum(offset, length)
            if digest is not None:
                return digest
            self._remote = None  # the peer lacks the extension: read back from now on
        data = await self._backend.read(offset, length)
        self.bytes_read_back += len(data)
        return chunk_hash(data)

    async def hash_blocks(self, offset: int, length: int, block: int) -> list[bytes]:
        """The hash of each ``block`` of a range (the last one clipped), where the data lies
        when the backend can (a file, a Ferry NBD peer), else by a checksum a block, else
        by reading the range back."""
        if self._blocks is not None:
            digests = await self._blocks.hash_blocks(offset, length, block)
            if digests is not None:
                return digests
            self._blocks = None  # not for this peer or block size: do without
        if self._remote is not None:
            starts = range(offset, offset + length, block)
            return [await self.hash(at, min(block, offset + length - at)) for at in starts]
        data = memoryview(await self._backend.read(offset, length))
        self.bytes_read_back += len(data)
        return [chunk_hash(data[at : at + block]) for at in range(0, length, block)]


def image_digest(table: ChunkTable) -> bytes:
    """Hash of the per-chunk hashes over the whole disk."""
    return chunk_hash(table.digests())


def first_difference(left: ChunkTable, right: ChunkTable) -> int | None:
    """Index of the first chunk whose hash differs, or None when the images match."""
    if left.digests() == right.digests():
        return None
    return next(i for i in range(left.count) if left.digest(i) != right.digest(i))


async def hash_image(
    backend: Backend,
    hasher: RangeHasher,
    table: ChunkTable,
    *,
    needed: Callable[[int], bool],
    workers: int,
    policy: RetryPolicy,
    clock: Clock,
) -> None:
    """Fill ``table`` with the hash of every chunk for which ``needed(index)``."""
    extents = await with_retries(policy, clock, 0, table.size, backend.extents)

    def to_hash() -> Iterator[range]:
        """Runs of adjacent chunks with data, up to MAX_HASH_RANGE bytes each."""
        run: list[int] = []
        most = max(1, MAX_HASH_RANGE // table.chunk_size)
        for index, segments in iter_chunks(extents, table.chunk_size):
            if not needed(index):
                continue
            length = table.bounds(index)[1]
            mapped_zero = sum(segment.length for segment in segments if segment.zero)
            if mapped_zero == length:  # holes and zeroes, however the map splits them
                table.set(index, zero_hash(length))
                continue
            if run and (run[-1] + 1 != index or len(run) == most):
                yield range(run[0], run[-1] + 1)
                run = []
            run.append(index)
        if run:
            yield range(run[0], run[-1] + 1)

    async def hash_chunks(indices: range) -> None:
        start = table.bounds(indices[0])[0]
        end = sum(table.bounds(indices[-1]))
        digests = await with_retries(
            policy,
            clock,
            start,
            end - start,
            lambda: hasher.hash_blocks(start, end - start, table.chunk_size),
        )
        for index, digest in zip(indices, digests, strict=True):
            table.set(index, digest)

    await run_bounded(to_hash(), hash_chunks, workers=workers)
