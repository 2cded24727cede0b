"""An in-memory block backend for fast tests, sparse and allocation-aware like a file.

Storage is a dict of fixed-size blocks: a block is absent (a hole), zeroed
(allocated, reads as zeroes, holds no memory) or holds data. A write
allocates every block it touches; ``zero(punch_hole=True)`` frees the blocks
it covers whole, ``zero()`` marks them allocated-zero; partly covered blocks
get their bytes zeroed in place. ``extents`` reports the state per block.
"""

from __future__ import annotations

from types import TracebackType
from typing import Self

from appliance.storage.extents import Extent, merge
from appliance.storage.file import check_range, read_only_error

DEFAULT_BLOCK_SIZE = 4096


class MemoryBackend:
    def __init__(
        self,
        size: int,
        *,
        name: str = "memory",
        readonly: bool = False,
        block_size: int = DEFAULT_BLOCK_SIZE,
    ) -> None:
        if size < 0 or block_size <= 0:
            raise ValueError(f"bad size {size} or block size {block_size}")
        self._size = size
        self._name = name
        self._readonly = readonly
        self._block_size = block_size
        self._blocks: dict[int, bytearray] = {}
        self._zeroed: set[int] = set()
        self.flushes = 0
        self.closed = False

    @classmethod
    def from_bytes(cls, data: bytes, *, name: str = "memory", readonly: bool = False) -> Self:
        """A backend holding ``data``, with all-zero blocks left as holes."""
        backend = cls(len(data), name=name)
        bs = backend._block_size
        for start in range(0, len(data), bs):
            block = data[start : start + bs]
            if block.count(0) != len(block):
                backend._block(start // bs)[: len(block)] = block
        backend._readonly = readonly
        return backend

    @property
    def name(self) -> str:
        return self._name

    @property
    def size(self) -> int:
        return self._size

    @property
    def readonly(self) -> bool:
        return self._readonly

    @property
    def block_size(self) -> int:
        return self._block_size

    @property
    def allocated_bytes(self) -> int:
        """Bytes in allocated blocks (data or zeroed), like a file's disk usage."""
        return (len(self._blocks) + len(self._zeroed)) * self._block_size

    async def read(self, offset: int, length: int) -> bytes:
        out = bytearray(length)
        await self.read_into(offset, out)
        return bytes(out)

    async def read_into(self, offset: int, buffer: bytearray | memoryview) -> None:
        out = memoryview(buffer).cast("B")
        check_range(self._name, self._size, offset, len(out))
        for index, lo, hi in self._pieces(offset, len(out)):
            block = self._blocks.get(index)
            base = index * self._block_size
            if block is None:
                out[lo - offset : hi - offset] = bytes(hi - lo)
            else:
                out[lo - offset : hi - offset] = block[lo - base : hi - base]

    async def write(self, offset: int, data: bytes | memoryview) -> None:
        self._check_writable()
        view = memoryview(data).cast("B")
        check_range(self._name, self._size, offset, len(view))
        for index, lo, hi in self._pieces(offset, len(view)):
            base = index * self._block_size
            self._block(index)[lo - base : hi - base] = view[lo - offset : hi - offset]

    async def zero(self, offset: int, length: int, *, punch_hole: bool = False) -> None:
        self._check_writable()
        check_range(self._name, self._size, offset, length)
        whole = self._whole_blocks(offset, length)
        for index, lo, hi in self._edges(offset, length, whole):
            base = index * self._block_size
            if index in self._blocks:
                self._blocks[index][lo - base : hi - base] = bytes(hi - lo)
            elif not punch_hole:
                self._block(index)
        for index in self._allocated_in(whole):
            self._blocks.pop(index, None)
            self._zeroed.discard(index)
        if not punch_hole:
            self._zeroed.update(whole)

    async def flush(self) -> None:
        self.flushes += 1

    async def extents(self, offset: int = 0, length: int | None = None) -> list[Extent]:
        if length is None:
            length = self._size - offset
        check_range(self._name, self._size, offset, length)
        bs, end = self._block_size, offset + length
        extents: list[Extent] = []
        pos = offset
        for index in self._allocated_in(range(offset // bs, -(-end // bs))):
            lo, hi = max(offset, index * bs), min(end, (index + 1) * bs)
            if lo > pos:
                extents.append(Extent(pos, lo - pos, zero=True, hole=True))
            extents.append(Extent(lo, hi - lo, zero=index in self._zeroed))
            pos = hi
        if pos < end:
            extents.append(Extent(pos, end - pos, zero=True, hole=True))
        return merge(extents)

    async def close(self) -> None:
        self.closed = True

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    def _check_writable(self) -> None:
        if self._readonly:
            raise read_only_error(self._name)

    def _block(self, index: int) -> bytearray:
        """The data block ``index``, allocating it (zero-filled) if needed."""
        block = self._blocks.get(index)
        if block is None:
            block = self._blocks[index] = bytearray(self._block_size)
            self._zeroed.discard(index)
        return block

    def _allocated_in(self, indexes: range) -> list[int]:
        """Allocated block indexes within ``indexes``, sorted; cost follows allocation only."""
        if len(indexes) <= len(self._blocks) + len(self._zeroed):
            return [i for i in indexes if i in self._blocks or i in self._zeroed]
        return sorted(i for i in (*self._blocks, *self._zeroed) if i in indexes)

    def _whole_blocks(self, offset: int, length: int) -> range:
        """Indexes of the blocks ``[offset, offset + length)`` covers entirely."""
        bs, end = self._block_size, offset + length
        stop = -(-end // bs) if end == self._size else end // bs
        start = -(-offset // bs)
        return range(start, max(start, stop))

    def _edges(self, offset: int, length: int, whole: range) -> list[tuple[int, int, int]]:
        """The pieces of the range in blocks it covers only partly."""
        if not whole:
            return self._pieces(offset, length)
        bs, end = self._block_size, offset + length
        head = self._pieces(offset, whole.start * bs - offset)
        tail_start = min(whole.stop * bs, end)
        return head + self._pieces(tail_start, end - tail_start)

    def _pieces(self, offset: int, length: int) -> list[tuple[int, int, int]]:
        """``(block index, start, end)`` for each block ``[offset, offset + length)`` touches."""
        bs = self._block_size
        end = offset + length
        return [
            (index, max(offset, index * bs), min(end, (index + 1) * bs))
            for index in range(offset // bs, -(-end // bs))
        ]
