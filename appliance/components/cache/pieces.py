"""How the cache cuts a request into per-chunk pieces, runs many at once, and finds the
chunks that read as zeroes on-prem."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine, Iterable
from dataclasses import dataclass
from typing import Any

from appliance.components.cache.store import Geometry
from appliance.storage.extents import Extent

PIECES_AT_ONCE = 64


@dataclass(frozen=True, slots=True)
class Piece:
    chunk: int
    start: int
    """Offset inside the chunk."""
    length: int
    at: int
    """Offset inside the request."""


def pieces_of(offset: int, length: int, chunk_size: int) -> list[Piece]:
    """The request ``[offset, offset + length)`` cut at chunk boundaries."""
    found: list[Piece] = []
    pos, end = offset, offset + length
    while pos < end:
        chunk, start = divmod(pos, chunk_size)
        size = min(chunk_size - start, end - pos)
        found.append(Piece(chunk, start, size, pos - offset))
        pos += size
    return found


async def in_batches(calls: Iterable[Coroutine[Any, Any, None]]) -> None:
    """Run the calls, ``PIECES_AT_ONCE`` at a time (a 32 MiB request is 512 pieces)."""
    batch: list[Coroutine[Any, Any, None]] = []
    for call in calls:
        batch.append(call)
        if len(batch) == PIECES_AT_ONCE:
            await asyncio.gather(*batch)
            batch = []
    if batch:
        await asyncio.gather(*batch)


def hole_chunks(upstream_map: list[Extent], geometry: Geometry) -> bytearray:
    """Bitmap of the chunks that read wholly as zeroes on-prem (at open)."""
    chunk_size, chunks = geometry.chunk_size, geometry.chunks
    bits = bytearray((chunks + 7) // 8)
    for extent in upstream_map:
        if not extent.zero:
            continue
        first = -(-extent.start // chunk_size)
        # Exclusive; a clipped last chunk counts when the extent runs to the disk's end.
        last = chunks if extent.end >= geometry.disk_size else extent.end // chunk_size
        for chunk in range(first, last):
            bits[chunk >> 3] |= 1 << (chunk & 7)
    return bits
