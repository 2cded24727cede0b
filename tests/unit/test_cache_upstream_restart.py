"""The cache's upstream rides out an I/O manager that restarted: listening again on its port
before it has reopened its disks, it refuses the export for a moment (NBD_REP_ERR_UNKNOWN).
That refusal is retried like a dropped link, not failed (the fault suite's "I/O manager
killed mid-commit" saw the guest's reads fail there)."""

from __future__ import annotations

import asyncio

import pytest

from appliance.components.cache.upstream import Upstream
from appliance.datapath.nbd.server import NbdServer
from appliance.errors import LinkDown
from appliance.storage.memory import MemoryBackend

SIZE = 1 << 20
EXPORT = "cur/disk-1"


async def test_a_refused_export_is_retried_until_the_server_serves_it() -> None:
    content = MemoryBackend(SIZE)
    await content.write(4096, b"on-prem" * 100)
    async with NbdServer() as server:
        upstream = Upstream(server.address, EXPORT, retry_delay_s=0.01, timeout_s=30)
        try:
            reading = asyncio.create_task(upstream.read(4096, 700))
            await asyncio.wait_for(upstream.retrying.wait(), 30)  # refused, retrying
            assert not reading.done()
            server.add_export(EXPORT, content, readonly=True)  # its disk reopened
            assert await asyncio.wait_for(reading, 30) == b"on-prem" * 100
        finally:
            await upstream.close()


async def test_a_refused_export_fails_once_the_upstream_timeout_has_passed() -> None:
    async with NbdServer() as server:
        upstream = Upstream(server.address, EXPORT, retry_delay_s=0.01, timeout_s=0.05)
        try:
            # Refused all along: retried until the timeout (the WAN threshold), then the link is
            # down for the guest's read (EIO), as for any other upstream that never answers.
            with pytest.raises(LinkDown):
                await upstream.read(0, 512)
            assert upstream.retrying.is_set()
        finally:
            await upstream.close()
