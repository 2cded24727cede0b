"""Which layer holds each block of a layered disk, and the extent map that follows.

Blocking (``lseek`` on the layer files): call from a worker thread, with
bitmaps copied as ints in the event loop. Ownership is worked out with
big-int bit operations over whole bitmaps (top layer first: a block belongs
to the highest layer that wrote it), then each owner's file is asked for its
allocation only over the runs it owns, so no data is ever read.

Labels: in an overlay, an owned block is data where the file is allocated and
zero (allocated, reads as zeroes) where it is a hole. In the base, a hole is
a hole unless the base's zeroed bitmap marks the block as zeroed on purpose.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from appliance.storage import sparse
from appliance.storage.bitmap import int_runs, range_mask
from appliance.storage.extents import Extent

Run = tuple[int, int]


@dataclass(frozen=True, slots=True)
class LayerState:
    """One layer as mapping sees it: its open file and a copy of its bitmap."""

    fd: int
    bits: int


@dataclass(frozen=True, slots=True)
class Geometry:
    size: int
    granularity: int

    @property
    def blocks(self) -> int:
        return -(-self.size // self.granularity)

    def block_range(self, start: int, end: int) -> Run:
        """The blocks that bytes ``[start, end)`` touch."""
        return start // self.granularity, -(-end // self.granularity)

    def byte_range(self, run: Run, start: int = 0, end: int | None = None) -> Run:
        """The bytes of blocks ``run``, clipped to ``[start, end)`` and the disk."""
        limit = self.size if end is None else end
        return max(run[0] * self.granularity, start), min(run[1] * self.granularity, limit)


def owner_runs(overlays_top_down: Sequence[int], wanted: int, blocks: int) -> list[list[Run]]:
    """For each overlay (top first) the wanted block runs it owns, then the base's share."""
    taken = 0
    shares: list[list[Run]] = []
    for written in overlays_top_down:
        shares.append(int_runs(written & wanted & ~taken, blocks))
        taken |= written
    shares.append(int_runs(wanted & ~taken, blocks))
    return shares


def merge_extents(extents: Iterable[Extent]) -> list[Extent]:
    """Sort and join adjacent extents with the same labels."""
    merged: list[Extent] = []
    for extent in sorted(extents, key=lambda e: e.start):
        if not extent.length:
            continue
        last = merged[-1] if merged else None
        if (
            last is not None
            and last.end == extent.start
            and (last.zero, last.hole) == (extent.zero, extent.hole)
        ):
            merged[-1] = Extent(last.start, last.length + extent.length, last.zero, last.hole)
        else:
            merged.append(extent)
    return merged


def _overlay_extents(fd: int, start: int, end: int) -> list[Extent]:
    return [
        Extent(lo, hi - lo, zero=not is_data)
        for lo, hi, is_data in sparse.allocation(fd, start, end)
    ]


class _ZeroedRanges:
    """The base's deliberately zeroed blocks as sorted byte ranges, for splitting holes."""

    def __init__(self, geometry: Geometry, bits: int) -> None:
        self._ranges = [geometry.byte_range(run) for run in int_runs(bits, geometry.blocks)]
        self._ends = [end for _, end in self._ranges]

    def split_hole(self, start: int, end: int) -> list[Extent]:
        pieces: list[Extent] = []
        position = start
        index = bisect.bisect_right(self._ends, start)
        while index < len(self._ranges) and self._ranges[index][0] < end:
            lo, hi = max(self._ranges[index][0], start), min(self._ranges[index][1], end)
            if lo > position:
                pieces.append(Extent(position, lo - position, zero=True, hole=True))
            pieces.append(Extent(lo, hi - lo, zero=True))
            position = hi
            index += 1
        if position < end:
            pieces.append(Extent(position, end - position, zero=True, hole=True))
        return pieces


def _base_extents(
    base: LayerState, geometry: Geometry, runs: list[Run], start: int, end: int
) -> list[Extent]:
    zeroed = _ZeroedRanges(geometry, base.bits) if base.bits else None
    pieces: list[Extent] = []
    for run in runs:
        lo, hi = geometry.byte_range(run, start, end)
        for piece_lo, piece_hi, is_data in sparse.allocation(base.fd, lo, hi):
            if is_data:
                pieces.append(Extent(piece_lo, piece_hi - piece_lo))
            elif zeroed is not None:
                pieces.extend(zeroed.split_hole(piece_lo, piece_hi))
            else:
                pieces.append(Extent(piece_lo, piece_hi - piece_lo, zero=True, hole=True))
    return pieces


def map_view(
    layers: Sequence[LayerState],
    geometry: Geometry,
    start: int,
    end: int,
    only_blocks: int | None = None,
) -> list[Extent]:
    """The extent map of bytes ``[start, end)`` of the view made of ``layers`` (base first).

    With ``only_blocks`` (a bitmap as an int) the map covers just those blocks:
    that is how a change list gets its zero/data labels.
    """
    if end <= start:
        return []
    wanted = range_mask(*geometry.block_range(start, end))
    if only_blocks is not None:
        wanted &= only_blocks
    overlays = list(reversed(layers[1:]))
    shares = owner_runs([layer.bits for layer in overlays], wanted, geometry.blocks)
    pieces: list[Extent] = []
    for layer, runs in zip(overlays, shares, strict=False):
        for run in runs:
            pieces.extend(_overlay_extents(layer.fd, *geometry.byte_range(run, start, end)))
    pieces.extend(_base_extents(layers[0], geometry, shares[-1], start, end))
    return merge_extents(pieces)


def whole_blocks(extents: list[Extent], geometry: Geometry, blocks: int) -> list[Extent]:
    """Relabel a map of the given blocks at block granularity: zero only if the whole block is."""
    with_data = 0
    for extent in extents:
        if extent.data:
            with_data |= range_mask(*geometry.block_range(extent.start, extent.end))
    pieces = [
        Extent(lo, hi - lo, zero=zero)
        for bits, zero in ((blocks & with_data, False), (blocks & ~with_data, True))
        for lo, hi in (geometry.byte_range(run) for run in int_runs(bits, geometry.blocks))
    ]
    return merge_extents(pieces)
