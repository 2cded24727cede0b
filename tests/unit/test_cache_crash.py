"""Crash durability: a cache process SIGKILLed after a FLUSH keeps every write acknowledged
before it (and every FUA write), and its record of the chunks written since the migration
began; and the journal cuts a torn tail and compacts without losing state."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from appliance.components.cache.journal import MAGIC, Journal, Kind, Record, encode
from appliance.components.cache.store import CacheStore
from appliance.datapath.nbd.backend import NbdBackend
from appliance.datapath.nbd.channel import TcpAddress
from appliance.datapath.nbd.client import NbdClient
from tests.support.cachelab import DISK, KiB, MiB, image_bytes, write_sparse

SIZE = 4 * MiB + 4096
CHUNK = 64 * KiB
REPO = Path(__file__).resolve().parents[2]


@asynccontextmanager
async def cache_process(directory: Path) -> AsyncIterator[NbdBackend]:
    """The cache in a child process; SIGKILLed on the way out, whatever happened."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tests.support.cache_process",
        str(directory),
        cwd=REPO,
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        assert process.stdout is not None
        async with asyncio.timeout(60):
            while not (line := await process.stdout.readline()).startswith(b"READY"):
                assert line, "cache process exited before it was ready"
        port = int(line.split()[1])
        backend = await NbdBackend.connect(TcpAddress("127.0.0.1", port), DISK)
        try:
            yield backend
        finally:
            process.send_signal(signal.SIGKILL)
            await process.wait()
            await asyncio.gather(backend.close(), return_exceptions=True)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


def vm_address(vm: NbdBackend) -> TcpAddress:
    address = vm._address
    assert isinstance(address, TcpAddress)
    return address


async def test_flushed_writes_survive_sigkill_and_restart(tmp_path: Path) -> None:
    content = image_bytes(SIZE, seed=21)
    write_sparse(tmp_path / "onprem.raw", content)
    model = bytearray(content)
    rng = random.Random(13)
    written: set[int] = set()
    async with cache_process(tmp_path) as vm:
        for _ in range(60):
            offset = rng.randrange(0, SIZE - 1)
            data = rng.randbytes(rng.randrange(1, min(40 * KiB, SIZE - offset)))
            await vm.write(offset, data)
            model[offset : offset + len(data)] = data
            written.update(range(offset // CHUNK, (offset + len(data) - 1) // CHUNK + 1))
        await vm.flush()
        # Acknowledged after the flush, never flushed: may or may not survive.
        await vm.write(0, b"\xee" * 5000)
        # A FUA write is durable when acknowledged, flush or not: into a chunk not yet
        # written, so only a durable journal record can bring it back.
        fresh = min(set(range(1, SIZE // CHUNK)) - written)
        async with await NbdClient.connect(vm_address(vm), DISK) as client:
            await client.write(fresh * CHUNK + 3, b"F" * 3000, fua=True)
        model[fresh * CHUNK + 3 : fresh * CHUNK + 3003] = b"F" * 3000
        written.add(fresh)
    # SIGKILLed. Every write acknowledged before the flush reads back after a restart.
    async with cache_process(tmp_path) as vm:
        after = bytearray(await vm.read(0, SIZE))
        assert after[5000:] == model[5000:]
        assert after[:5000] in (model[:5000], b"\xee" * 5000)
    store = CacheStore.open(tmp_path / "cache" / "disks" / "mig-1" / DISK, SIZE, CHUNK, 1)
    try:
        assert set(store.written_chunks()) >= written
        assert set(store.written_chunks()) <= written | {0}
    finally:
        store.close()
    assert (tmp_path / "onprem.raw").read_bytes() == content  # nothing was committed


def test_journal_cuts_a_torn_or_corrupt_tail(tmp_path: Path) -> None:
    path = tmp_path / "journal"
    good = [Record(Kind.MAP, (1, 2, 1)), Record(Kind.CUT, (1,))]
    bad = bytearray(encode(Record(Kind.COMMIT, (1,))))
    bad[-1] ^= 0xFF
    path.write_bytes(MAGIC + b"".join(encode(r) for r in good) + bytes(bad) + b"\x00\x01")
    journal = Journal(path)
    assert journal.open() == good
    journal.append([Record(Kind.COMMIT, (1,))])
    journal.close()
    assert Journal(path).open() == [*good, Record(Kind.COMMIT, (1,))]


async def test_compaction_keeps_the_whole_state(tmp_path: Path) -> None:
    directory = tmp_path / "disk"
    store = CacheStore.open(directory, 20 * CHUNK + 100, CHUNK, 16)
    store.compact_after = 8
    for chunk in range(6):
        slot = store.allocate()
        assert slot is not None
        store.write_slot(slot, 0, bytes([chunk]) * CHUNK)
        store.map(chunk, slot, store.open_epoch)
    first = store.cut()
    for chunk in (2, 3, 7):  # 2 and 3 copied on write; 7 new
        slot = store.allocate()
        assert slot is not None
        store.write_slot(slot, 0, bytes([100 + chunk]) * CHUNK)
        store.map(chunk, slot, store.open_epoch)
    await store.sync()  # compacts: more records than compact_after
    state = (
        {c: (e.slot, e.epoch) for c, e in store.live.items()},
        store.held,
        store.open_epoch,
        store.written_chunks(),
    )
    store.close()
    assert os.path.getsize(directory / "journal") > len(MAGIC)
    again = CacheStore.open(directory, 20 * CHUNK + 100, CHUNK, 16)
    try:
        assert state == (
            {c: (e.slot, e.epoch) for c, e in again.live.items()},
            again.held,
            again.open_epoch,
            again.written_chunks(),
        )
        assert again.held[first][2] != again.live[2].slot
        assert again.read_slot(again.held[first][2], 0, 4) == bytes([2]) * 4
        assert again.read_slot(again.live[2].slot, 0, 4) == bytes([102]) * 4
        assert again.free_slots == 16 - 9
    finally:
        again.close()


async def test_inline_writes_flushed_survive_sigkill_and_restart(tmp_path: Path) -> None:
    """4 KiB writes into cached chunks, served inline by the NBD reader (copy on write of
    clean chunks, then in place), are as durable at a FLUSH as any other."""
    content = image_bytes(SIZE, seed=22)
    write_sparse(tmp_path / "onprem.raw", content)
    model = bytearray(content)
    rng = random.Random(22)
    async with cache_process(tmp_path) as vm:
        assert await vm.read(0, SIZE) == content  # every chunk cached, clean
        for _ in range(3):
            for _ in range(100):
                offset = rng.randrange(0, SIZE // 4096) * 4096
                data = rng.randbytes(4096)
                await vm.write(offset, data)
                model[offset : offset + 4096] = data
            await vm.flush()
        await vm.write(8192, b"\xee" * 4096)  # never flushed: may or may not survive
    async with cache_process(tmp_path) as vm:
        after = bytearray(await vm.read(0, SIZE))
        assert after[:8192] == model[:8192]
        assert after[8192:12288] in (model[8192:12288], b"\xee" * 4096)
        assert after[12288:] == model[12288:]
