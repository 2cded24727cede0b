"""DiskView: a LayeredDisk seen through the Backend protocol, now or at a snapshot."""

from __future__ import annotations

import errno
from types import TracebackType
from typing import TYPE_CHECKING, Self

from appliance.storage.extents import Extent

if TYPE_CHECKING:
    from appliance.storage.layered import LayeredDisk


class DiskView:
    """A :class:`LayeredDisk` through the Backend protocol: now (read-write) or a snapshot."""

    def __init__(self, disk: LayeredDisk, snapshot_id: str | None) -> None:
        self._disk = disk
        self._snapshot_id = snapshot_id

    @property
    def name(self) -> str:
        suffix = "" if self._snapshot_id is None else f"@{self._snapshot_id}"
        return f"{self._disk.name}{suffix}"

    @property
    def size(self) -> int:
        return self._disk.size

    @property
    def readonly(self) -> bool:
        return self._snapshot_id is not None

    @property
    def snapshot_id(self) -> str | None:
        return self._snapshot_id

    def _check_writable(self) -> None:
        if self.readonly:
            raise PermissionError(errno.EPERM, f"{self.name} is a snapshot, read-only")

    async def read(self, offset: int, length: int) -> bytes:
        return await self._disk._read(self._snapshot_id, offset, length)

    async def read_into(self, offset: int, buffer: bytearray | memoryview) -> None:
        """Fill ``buffer`` from ``offset`` (``read`` without allocating the result)."""
        await self._disk._read_into(self._snapshot_id, offset, memoryview(buffer).cast("B"))

    async def write(self, offset: int, data: bytes | memoryview) -> None:
        self._check_writable()
        await self._disk._write(offset, data)

    async def zero(self, offset: int, length: int, *, punch_hole: bool = False) -> None:
        self._check_writable()
        await self._disk._zero(offset, length, punch_hole)

    async def flush(self) -> None:
        if not self.readonly:
            await self._disk.flush()

    async def extents(self, offset: int = 0, length: int | None = None) -> list[Extent]:
        if length is None:
            length = self.size - offset
        return await self._disk._extents(self._snapshot_id, offset, length)

    async def close(self) -> None:
        """A view holds nothing of its own; the disk is closed by its owner."""

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()
