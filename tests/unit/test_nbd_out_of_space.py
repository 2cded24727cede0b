"""ENOSPC at an NBD server's storage reaches the client as OutOfSpace naming the export.

It used to surface as ``data_path`` "NBD WRITE ... failed with errno 28"; now it
says "no space left on volume '<export>'" with the ``out_of_space`` code, and a
transfer into such a target stops at the first one without retrying it.
"""

from __future__ import annotations

import errno
import random

import pytest

from appliance.datapath.nbd.backend import NbdBackend
from appliance.datapath.nbd.server import NbdServer
from appliance.datapath.transfer import Transfer, TransferOptions
from appliance.errors import OutOfSpace
from appliance.storage.memory import MemoryBackend
from messages.errors import ErrorCode

MIB = 1024 * 1024


class FullDisk(MemoryBackend):
    """Takes ``room`` bytes of writes, then answers ENOSPC (as a full file system does)."""

    def __init__(self, size: int, room: int) -> None:
        super().__init__(size, name="full")
        self.room = room
        self.refused = 0

    async def write(self, offset: int, data: bytes | memoryview) -> None:
        if len(data) > self.room:
            self.refused += 1
            raise OSError(errno.ENOSPC, "No space left on device")
        self.room -= len(data)
        await super().write(offset, data)


async def test_enospc_on_the_server_is_out_of_space_at_the_client() -> None:
    disk = FullDisk(4 * MIB, room=MIB)
    async with (
        NbdServer({"m-42-disk-0": disk}) as server,
        await NbdBackend.connect(server.address, "m-42-disk-0") as target,
    ):
        await target.write(0, bytes(range(256)) * 4096)  # 1 MiB: fits
        with pytest.raises(OutOfSpace) as raised:
            await target.write(MIB, b"\x01" * 4096)
        # The link is fine: other requests still work.
        assert await target.read(0, 256) == bytes(range(256))
    assert raised.value.code is ErrorCode.OUT_OF_SPACE
    assert str(raised.value).startswith("no space left on volume 'm-42-disk-0'")


async def test_a_transfer_into_a_full_target_stops_at_once_without_retries() -> None:
    source = MemoryBackend.from_bytes(random.Random(1).randbytes(16 * MIB), name="source")
    disk = FullDisk(source.size, room=4 * MIB)
    async with (
        NbdServer({"vol": disk}) as server,
        await NbdBackend.connect(server.address, "vol") as target,
    ):
        transfer = Transfer("t", source, target, options=TransferOptions(chunk_size=MIB, workers=2))
        with pytest.raises(OutOfSpace):
            await transfer.run()
    assert transfer.stats.retries == 0
    assert disk.refused <= 2  # the first refusal aborted the copy (one per worker at most)
