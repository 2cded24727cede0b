"""``NbdBackend``: the block backend protocol on top of an NBD export.

Requests larger than the server's maximum block size are split and sent
concurrently on the one connection. ``extents`` pages BLOCK_STATUS to the
end of the range and merges the answers. ``checksum`` asks a Ferry server
for the hash of a range, ``write_verified`` writes and returns the hash of
what the server received (both None from servers without the extension).

Reconnects: when the connection drops, the requests in flight raise
``ConnectionDropped`` (a ``TransientError``); the next call opens a new
connection to the same export, so a caller's retry simply works. Byte
counters add up over every connection this backend has used.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from types import TracebackType
from typing import Self

from appliance.datapath.nbd import protocol as p
from appliance.datapath.nbd.channel import NbdAddress
from appliance.datapath.nbd.client import CONNECT_TIMEOUT, NbdClient
from appliance.errors import NbdProtocolError
from appliance.storage.extents import Extent, merge
from appliance.storage.file import check_range, read_only_error

# BLOCK_STATUS lengths are 32-bit; ask for large, aligned pieces.
MAX_STATUS_REQUEST = 2**32 - 2**20
_ZERO_BUFFER = bytes(1024 * 1024)


def _pieces(offset: int, length: int, step: int) -> list[tuple[int, int]]:
    return [(pos, min(step, offset + length - pos)) for pos in range(offset, offset + length, step)]


async def _all(calls: list[Awaitable[None]]) -> None:
    if len(calls) == 1:
        await calls[0]
    else:
        await asyncio.gather(*calls)


class NbdBackend:
    def __init__(
        self,
        address: NbdAddress,
        export: str,
        client: NbdClient,
        *,
        name: str | None = None,
        connect_timeout: float = CONNECT_TIMEOUT,
    ) -> None:
        self._address = address
        self._export = export
        self._client = client
        self._name = name or f"nbd:{address}/{export}"
        self._size = client.size
        self._connect_timeout = connect_timeout
        self._reconnect_lock = asyncio.Lock()
        self._retired_sent = 0
        self._retired_received = 0
        self._closed = False
        self.reconnects = 0

    @classmethod
    async def connect(
        cls,
        address: NbdAddress,
        export: str = "",
        *,
        name: str | None = None,
        connect_timeout: float = CONNECT_TIMEOUT,
    ) -> Self:
        client = await NbdClient.connect(address, export, connect_timeout=connect_timeout)
        return cls(address, export, client, name=name, connect_timeout=connect_timeout)

    @property
    def name(self) -> str:
        return self._name

    @property
    def size(self) -> int:
        return self._size

    @property
    def readonly(self) -> bool:
        return self._client.info.readonly

    @property
    def max_block(self) -> int:
        return self._client.info.max_block

    @property
    def can_checksum(self) -> bool:
        return self._client.can_checksum

    @property
    def bytes_sent(self) -> int:
        """Bytes written to the socket(s), protocol overhead included."""
        return self._retired_sent + self._client.bytes_sent

    @property
    def bytes_received(self) -> int:
        return self._retired_received + self._client.bytes_received

    async def read(self, offset: int, length: int) -> bytes:
        check_range(self._name, self._size, offset, length)
        client = await self._connected()
        if length <= client.info.max_block:
            return await client.read(offset, length)
        buffer = bytearray(length)
        await self.read_into(offset, buffer)
        return bytes(buffer)

    async def read_into(self, offset: int, buffer: bytearray | memoryview) -> None:
        """Fill ``buffer`` from ``offset``: ``read`` without its final copy into ``bytes``."""
        view = memoryview(buffer).cast("B")
        check_range(self._name, self._size, offset, len(view))
        client = await self._connected()
        pieces = _pieces(offset, len(view), client.info.max_block)
        await _all([client.read_into(pos, view[pos - offset :][:size]) for pos, size in pieces])

    async def write(self, offset: int, data: bytes | memoryview) -> None:
        view = memoryview(data).cast("B")
        check_range(self._name, self._size, offset, len(view))
        client = await self._writable()
        pieces = _pieces(offset, len(view), client.info.max_block)
        await _all(
            [client.write(pos, view[pos - offset : pos - offset + size]) for pos, size in pieces]
        )

    async def write_verified(self, offset: int, data: bytes | memoryview) -> bytes | None:
        """Write ``data``; the chunk_hash of the bytes the server received and wrote, or None.

        None when the server lacks Ferry's extension or ``data`` needs more than
        one request: the data is written all the same, only not verified.
        """
        view = memoryview(data).cast("B")
        check_range(self._name, self._size, offset, len(view))
        client = await self._writable()
        if client.can_checksum and 0 < len(view) <= client.info.max_block:
            return await client.write_hashed(offset, view)
        await self.write(offset, view)
        return None

    async def zero(self, offset: int, length: int, *, punch_hole: bool = False) -> None:
        check_range(self._name, self._size, offset, length)
        client = await self._writable()
        if not length:
            return
        pieces = _pieces(offset, length, client.info.max_block)
        if client.info.has(p.TransmissionFlag.SEND_WRITE_ZEROES):
            await _all(
                [client.write_zeroes(pos, size, no_hole=not punch_hole) for pos, size in pieces]
            )
        else:
            zeroes = memoryview(_ZERO_BUFFER)
            await _all(
                [
                    client.write(pos + step, zeroes[: min(len(zeroes), size - step)])
                    for pos, size in pieces
                    for step in range(0, size, len(zeroes))
                ]
            )

    async def flush(self) -> None:
        client = await self._connected()
        if client.info.has(p.TransmissionFlag.SEND_FLUSH):
            await client.flush()

    async def extents(self, offset: int = 0, length: int | None = None) -> list[Extent]:
        if length is None:
            length = self._size - offset
        check_range(self._name, self._size, offset, length)
        client = await self._connected()
        if client.info.allocation_context is None:
            return [Extent(offset, length)] if length else []
        extents: list[Extent] = []
        pos, end = offset, offset + length
        while pos < end:
            described = await client.block_status(pos, min(end - pos, MAX_STATUS_REQUEST))
            if not described:
                raise NbdProtocolError(f"empty block status reply at offset {pos}")
            extents.extend(described)
            pos = described[-1].end
        return merge(extents)

    async def checksum(self, offset: int, length: int) -> bytes | None:
        """The server-side chunk_hash of a range (at most ``max_block`` bytes), or None."""
        check_range(self._name, self._size, offset, length)
        client = await self._connected()
        if not client.can_checksum:
            return None
        if length > client.info.max_block:
            raise ValueError(f"checksum range of {length} bytes exceeds {client.info.max_block}")
        return await client.checksum(offset, length)

    async def hash_blocks(self, offset: int, length: int, block: int) -> list[bytes] | None:
        """The server-side chunk_hash of each ``block`` of a range (the last one clipped).

        None when the server lacks Ferry's extension or ``block`` is not a size
        it can ask for (a power of two, 4 KiB to 32 MiB); ranges over the
        maximum block size are asked for in pieces.
        """
        check_range(self._name, self._size, offset, length)
        client = await self._connected()
        if not client.can_checksum or not p.ferry_block_supported(block):
            return None
        step = client.info.max_block // block * block
        if not step:
            return None
        pieces = _pieces(offset, length, step)
        replies = await asyncio.gather(
            *(client.checksum_blocks(pos, size, block) for pos, size in pieces)
        )
        return [digest for reply in replies for digest in reply]

    async def close(self) -> None:
        """Disconnect for good: unlike a dropped link, this never reconnects."""
        self._closed = True
        await self._client.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def _writable(self) -> NbdClient:
        client = await self._connected()
        if client.info.readonly:
            raise read_only_error(self._name)
        return client

    async def _connected(self) -> NbdClient:
        """The live client, reconnecting first if the last connection dropped."""
        if not self._client.closed:
            return self._client
        if self._closed:
            raise ValueError(f"{self._name} is closed")
        async with self._reconnect_lock:
            if self._client.closed:
                await self._replace(self._client)
        return self._client

    async def _replace(self, old: NbdClient) -> None:
        new = await NbdClient.connect(
            self._address, self._export, connect_timeout=self._connect_timeout
        )
        if self._closed:  # closed while this reconnected: the new client is not kept
            await new.close()
            raise ValueError(f"{self._name} is closed")
        if new.size != self._size:
            await new.close()
            raise NbdProtocolError(
                f"export {self._export!r} changed size from {self._size} to {new.size}"
            )
        # The new client is in place before any await: a close (or a cancellation) from
        # here on closes it rather than leaving its socket open.
        self._client = new
        self.reconnects += 1
        await old.close()
        self._retired_sent += old.bytes_sent
        self._retired_received += old.bytes_received
