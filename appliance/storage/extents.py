"""Extents: immutable runs of bytes with their allocation state, and their arithmetic.

A disk map is a sorted list of non-overlapping extents. The functions here
merge, clip, split and complete such maps; every one accepts unaligned
offsets, empty maps and zero-sized disks, and raises ``ValueError`` on a map
that is out of order or overlaps itself (a bug upstream, never data).

Chunks are the fixed-size units the transfer engine works in: chunk ``i``
covers ``[i * chunk_size, (i + 1) * chunk_size)``, the last one clipped to
the disk size.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace


@dataclass(frozen=True, slots=True)
class Extent:
    """``length`` bytes from ``start``; ``zero`` reads as zeroes, ``hole`` is unallocated.

    A hole always reads as zeroes (``hole`` implies ``zero``); an allocated
    extent may still be known to be zero (written zeroes).
    """

    start: int
    length: int
    zero: bool = False
    hole: bool = False

    def __post_init__(self) -> None:
        if self.start < 0 or self.length < 0:
            raise ValueError(f"negative extent start={self.start} length={self.length}")
        if self.hole and not self.zero:
            raise ValueError("a hole must read as zero")

    @property
    def end(self) -> int:
        return self.start + self.length

    @property
    def data(self) -> bool:
        """True when this extent holds bytes that must be read and sent."""
        return not self.zero


def same_state(a: Extent, b: Extent) -> bool:
    """True when both extents have the same allocation state (position aside)."""
    return a.zero == b.zero and a.hole == b.hole


def _checked(extents: Iterable[Extent]) -> Iterator[Extent]:
    """Yield the non-empty extents, checking that they are sorted and do not overlap."""
    end = 0
    for extent in extents:
        if extent.start < end:
            raise ValueError(f"extent at {extent.start} overlaps or precedes offset {end}")
        end = extent.end
        if extent.length:
            yield extent


def merge(extents: Iterable[Extent]) -> list[Extent]:
    """Join adjacent extents of the same state; drop empty ones."""
    merged: list[Extent] = []
    for extent in _checked(extents):
        if merged and merged[-1].end == extent.start and same_state(merged[-1], extent):
            merged[-1] = replace(merged[-1], length=merged[-1].length + extent.length)
        else:
            merged.append(extent)
    return merged


def clip(extents: Iterable[Extent], start: int, end: int) -> list[Extent]:
    """The parts of ``extents`` inside ``[start, end)``."""
    if start < 0 or end < start:
        raise ValueError(f"bad range [{start}, {end})")
    clipped: list[Extent] = []
    for extent in _checked(extents):
        if extent.end <= start:
            continue
        if extent.start >= end:
            break
        lo, hi = max(extent.start, start), min(extent.end, end)
        if lo < hi:
            clipped.append(replace(extent, start=lo, length=hi - lo))
    return clipped


def fill_gaps(extents: Iterable[Extent], start: int, end: int) -> list[Extent]:
    """Cover ``[start, end)`` exactly: clip, and fill what is missing with data extents.

    A gap is a range nothing was said about, so it must be read: it becomes
    an extent with ``zero=False``.
    """
    filled: list[Extent] = []
    pos = start
    for extent in clip(extents, start, end):
        if extent.start > pos:
            filled.append(Extent(pos, extent.start - pos))
        filled.append(extent)
        pos = extent.end
    if pos < end:
        filled.append(Extent(pos, end - pos))
    return merge(filled)


def split(extents: Iterable[Extent], max_length: int) -> Iterator[Extent]:
    """Cut every extent into pieces of at most ``max_length`` bytes."""
    if max_length <= 0:
        raise ValueError(f"max_length must be positive, got {max_length}")
    for extent in _checked(extents):
        pos = extent.start
        while pos < extent.end:
            length = min(max_length, extent.end - pos)
            yield replace(extent, start=pos, length=length)
            pos += length


def split_at_chunks(extents: Iterable[Extent], chunk_size: int) -> Iterator[Extent]:
    """Cut every extent at multiples of ``chunk_size``, so no piece spans two chunks."""
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    for extent in _checked(extents):
        pos = extent.start
        while pos < extent.end:
            boundary = (pos // chunk_size + 1) * chunk_size
            length = min(boundary, extent.end) - pos
            yield replace(extent, start=pos, length=length)
            pos += length


def chunk_count(size: int, chunk_size: int) -> int:
    """How many chunks a disk of ``size`` bytes has (the last one may be short)."""
    if chunk_size <= 0 or size < 0:
        raise ValueError(f"bad size {size} or chunk_size {chunk_size}")
    return -(-size // chunk_size)


def chunk_indexes(start: int, length: int, chunk_size: int) -> range:
    """Indexes of the chunks that ``[start, start + length)`` touches (empty for length 0)."""
    if chunk_size <= 0 or start < 0 or length < 0:
        raise ValueError(f"bad range start={start} length={length} chunk_size={chunk_size}")
    if length == 0:
        return range(0)
    return range(start // chunk_size, (start + length - 1) // chunk_size + 1)


def chunk_span(index: int, chunk_size: int, size: int) -> tuple[int, int]:
    """``(start, length)`` of chunk ``index`` on a disk of ``size`` bytes."""
    if not 0 <= index < chunk_count(size, chunk_size):
        raise ValueError(f"chunk {index} is outside a disk of {size} bytes")
    start = index * chunk_size
    return start, min(chunk_size, size - start)


def iter_chunks(extents: Iterable[Extent], chunk_size: int) -> Iterator[tuple[int, list[Extent]]]:
    """Group a map into chunks: ``(chunk index, the extents inside that chunk)``, in order.

    Only chunks that some extent touches are yielded, so a map of data
    extents yields exactly the chunks holding data.
    """
    current: int | None = None
    pieces: list[Extent] = []
    for piece in split_at_chunks(extents, chunk_size):
        index = piece.start // chunk_size
        if index != current:
            if current is not None:
                yield current, merge(pieces)
            current, pieces = index, []
        pieces.append(piece)
    if current is not None:
        yield current, merge(pieces)


def allocated_length(extents: Iterable[Extent]) -> int:
    """Bytes in the extents that are allocated (data and written zeroes, not holes)."""
    return sum(extent.length for extent in extents if not extent.hole)


def data_length(extents: Iterable[Extent]) -> int:
    """Bytes in the extents that must be read and sent (not known to be zero)."""
    return sum(extent.length for extent in extents if extent.data)
