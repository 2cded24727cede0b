"""The one narrow interface every block backend implements (file, memory, NBD, snapshot)."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from appliance.storage.extents import Extent


@runtime_checkable
class Backend(Protocol):
    """A fixed-size array of bytes that can be read, written and mapped.

    All methods are safe to call concurrently for non-overlapping ranges.
    ``extents`` returns the whole requested range, in order, with no gaps,
    never cut short at some internal limit.
    """

    @property
    def name(self) -> str: ...

    @property
    def size(self) -> int: ...

    @property
    def readonly(self) -> bool: ...

    async def read(self, offset: int, length: int) -> bytes: ...

    async def write(self, offset: int, data: bytes | memoryview) -> None: ...

    async def zero(self, offset: int, length: int, *, punch_hole: bool = False) -> None: ...

    async def flush(self) -> None: ...

    async def extents(self, offset: int = 0, length: int | None = None) -> list[Extent]: ...

    async def close(self) -> None: ...


@runtime_checkable
class HashesBlocks(Protocol):
    """A backend that hashes its own blocks where the data lies (a file, a Ferry NBD peer)."""

    async def hash_blocks(self, offset: int, length: int, block: int) -> list[bytes] | None:
        """chunk_hash of each ``block`` of the range, the last one clipped at its end.

        None when this backend cannot for that block size or peer; callers then
        read the range and hash it themselves.
        """
        ...
