"""``CacheImage``: the cache's view of a disk, read-only, without touching the cache.

What a reconcile pass copies from, and what the cache exports as ``image/<disk>`` for
the cutover's whole-image check (``reconcile.py``, ``reconciling.py``). A chunk in the
cache is read from its slot; one that is not (never read, or written, committed
on-prem and evicted since) from on-prem's current image, and *not kept*: neither the
guest's working set nor the journal is touched. Hashes of blocks with no chunk in the
cache are computed on-prem, where the data lies (no data crosses the WAN link).
"""

from __future__ import annotations

from appliance.components.cache.disk import CacheDisk
from appliance.storage.extents import Extent
from appliance.storage.file import check_range, read_only_error
from appliance.storage.hashing import chunk_hash


class CacheImage:
    """The cache's view of a disk, read-only, for a pass: a chunk in the cache is read from
    its slot; one that is not (written, committed on-prem and evicted since) from on-prem's
    current image, *without* keeping it: a pass neither evicts the guest's working set nor
    journals anything. A write racing a read is the next pass's (it is after the mark)."""

    def __init__(self, disk: CacheDisk) -> None:
        self._disk = disk
        self._store = disk.store
        self._chunk = disk.store.geometry.chunk_size
        self.fetched_bytes = 0
        """Bytes read from on-prem (chunks no longer in the cache)."""

    @property
    def name(self) -> str:
        return f"{self._disk.name}:image"

    @property
    def size(self) -> int:
        return self._disk.size

    @property
    def readonly(self) -> bool:
        return True

    async def read(self, offset: int, length: int) -> bytes:
        check_range(self.name, self.size, offset, length)
        out = bytearray(length)
        missing: list[tuple[int, int]] = []
        pos, end = offset, offset + length
        while pos < end:  # no await: a slot read here is the chunk's content right now
            chunk, start = divmod(pos, self._chunk)
            size = min(self._chunk - start, end - pos)
            entry = self._store.live.get(chunk)
            if entry is None:
                missing.append((pos, size))
            else:
                out[pos - offset : pos - offset + size] = self._store.read_slot(
                    entry.slot, start, size
                )
            pos += size
        for at, size in merge_ranges(missing):
            out[at - offset : at - offset + size] = await self._disk.upstream.read(at, size)
            self.fetched_bytes += size
        return bytes(out)

    async def write(self, offset: int, data: bytes | memoryview) -> None:
        raise read_only_error(self.name)

    async def zero(self, offset: int, length: int, *, punch_hole: bool = False) -> None:
        raise read_only_error(self.name)

    async def flush(self) -> None:
        return None

    async def extents(self, offset: int = 0, length: int | None = None) -> list[Extent]:
        return await self._disk.extents(offset, length)

    async def hash_blocks(self, offset: int, length: int, block: int) -> list[bytes] | None:
        """The hash of each ``block`` of a range: blocks with no chunk in the cache are
        hashed by on-prem where they lie (no data crosses the WAN link), the others here."""
        check_range(self.name, self.size, offset, length)
        if block <= 0:
            raise ValueError(f"block size must be positive, got {block}")
        end = offset + length
        starts = range(offset, end, block)
        digests: list[bytes | None] = [None] * len(starts)
        remote: list[list[int]] = []  # runs of adjacent blocks on-prem hashes
        for index, at in enumerate(starts):  # no await: the map stays as it is
            last = min(at + block, end) - 1
            chunks = range(at // self._chunk, last // self._chunk + 1)
            if any(c in self._store.live for c in chunks):
                continue
            if remote and remote[-1][-1] == index - 1:
                remote[-1].append(index)
            else:
                remote.append([index])
        for run in remote:
            start = starts[run[0]]
            stop = min(starts[run[-1]] + block, end)
            found = await self._disk.upstream.hash_blocks(start, stop - start, block)
            if found is not None:
                digests[run[0] : run[-1] + 1] = found
        for index, at in enumerate(starts):
            if digests[index] is None:
                digests[index] = chunk_hash(await self.read(at, min(block, end - at)))
        return [digest for digest in digests if digest is not None]

    async def close(self) -> None:
        return None


def image_export(disk_id: str) -> str:
    """The cache's read-only export of a disk's :class:`CacheImage` (the cutover's check)."""
    return f"image/{disk_id}"


def merge_ranges(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Adjacent (offset, length) ranges joined (one upstream read for a run of chunks)."""
    merged: list[tuple[int, int]] = []
    for at, size in ranges:
        if merged and sum(merged[-1]) == at:
            merged[-1] = (merged[-1][0], merged[-1][1] + size)
        else:
            merged.append((at, size))
    return merged
