"""Optional zstd on the WAN link: bytes across it are exact, fewer of them cross it for
compressible data (counted at a proxy on the WAN side), and a cache's misses and epochs
go through it end to end (both component runtimes with ``link_zstd`` on)."""

from __future__ import annotations

import asyncio
import os
import random
from pathlib import Path

import redis.asyncio as aioredis
from pydantic import SecretStr

from appliance.components.cache_runtime import CacheRuntime
from appliance.components.epochs import parse_address
from appliance.components.onprem import current_export
from appliance.components.onprem_runtime import OnpremRuntime
from appliance.components.orders import ComponentId, Order, OrderAction, OutcomeKind, ParamValue
from appliance.components.runtimes import ComponentConfig
from appliance.datapath.link import ZstdRelay
from appliance.datapath.nbd import NbdBackend, NbdServer, TcpAddress
from appliance.embedded import RedisServer
from appliance.errors import ConnectionDropped
from appliance.settings import Settings
from appliance.state.keys import Keys
from appliance.storage.file import FileBackend
from tests.support.faultproxy import FaultProxy
from tests.support.onprem import CHUNK, MIB, make_lab_disk

SIZE = 2 * MIB
DISK = "disk-0"
WAIT_S = 30.0
LOOPBACK = TcpAddress("127.0.0.1", 0)


def compressible(size: int, seed: int) -> bytes:
    """Text-like data: words from a small vocabulary (compresses several times over)."""
    rng = random.Random(seed)
    words = [rng.randbytes(rng.randrange(3, 9)).hex() for _ in range(64)]
    out = bytearray()
    while len(out) < size:
        out += rng.choice(words).encode() + b" "
    return bytes(out[:size])


async def test_nbd_across_a_compressed_link_is_exact_and_sends_fewer_bytes(
    tmp_path: Path,
) -> None:
    image = tmp_path / "disk.raw"
    content = compressible(SIZE - 3 * CHUNK, 1) + os.urandom(3 * CHUNK)
    image.write_bytes(content)
    model = bytearray(content)
    async with (
        FileBackend.open(image) as backend,
        NbdServer({"d": backend}) as server,
        ZstdRelay(LOOPBACK, TcpAddress("127.0.0.1", server.port), accepts="zstd") as far,
        FaultProxy("127.0.0.1", far.port) as wan,
        ZstdRelay(LOOPBACK, TcpAddress("127.0.0.1", wan.port), accepts="plain") as near,
    ):
        async with await NbdBackend.connect(near.address, "d") as disk:
            assert await disk.read(0, SIZE) == content
            rng = random.Random(2)
            for _ in range(30):
                offset = rng.randrange(0, SIZE - 1)
                data = compressible(rng.randrange(1, min(200_000, SIZE - offset)), offset)
                await disk.write(offset, data)
                model[offset : offset + len(data)] = data
            await disk.zero(5000, 70_000)
            model[5000:75_000] = bytes(70_000)
            await disk.flush()
            assert await disk.read(0, SIZE) == model
        wire = wan.bytes_up + wan.bytes_down
        assert near.plain_bytes > 3 * SIZE  # three whole reads' worth and the writes
        assert wire == near.wire_bytes == far.wire_bytes
        assert wire < near.plain_bytes / 2
    assert image.read_bytes() == model


async def test_a_damaged_compressed_stream_cuts_the_connection(tmp_path: Path) -> None:
    image = tmp_path / "disk.raw"
    image.write_bytes(os.urandom(SIZE))
    async with (
        FileBackend.open(image) as backend,
        NbdServer({"d": backend}) as server,
        ZstdRelay(LOOPBACK, TcpAddress("127.0.0.1", server.port), accepts="zstd") as far,
    ):
        # A plain NBD client on the compressed side: the relay sees garbage and hangs up.
        reader, writer = await asyncio.open_connection("127.0.0.1", far.port)
        writer.write(b"NBDMAGIC" + bytes(100))
        await writer.drain()
        assert await asyncio.wait_for(reader.read(), WAIT_S) == b""
        writer.close()


def config(kind: str, directory: Path, redis_server: RedisServer, keys: Keys) -> ComponentConfig:
    settings = Settings(
        redis_url=SecretStr(redis_server.url),
        cache_scale=1 / 256,
        cache_retry_delay_s=0.1,
        component_epoch_timeout_s=WAIT_S,
        link_zstd=True,
    )
    return ComponentConfig(
        ComponentId(kind, f"{kind}-1"), directory, "127.0.0.1", 0,
        redis_server.url, keys.prefix, 1.0, 3.0, 30.0, settings,
    )  # fmt: skip


async def test_cache_misses_and_an_epoch_go_through_the_compressed_link(
    redis: aioredis.Redis, redis_server: RedisServer, keys: Keys, tmp_path: Path
) -> None:
    snapshot_id, snapshot = await make_lab_disk(tmp_path / "lab", SIZE)
    onprem_config = config("onprem", tmp_path / "onprem", redis_server, keys)
    cache_config = config("cache", tmp_path / "cache", redis_server, keys)
    data = compressible(5 * CHUNK + 77, 9)
    async with OnpremRuntime(onprem_config) as onprem, CacheRuntime(cache_config) as cache:
        params: dict[str, ParamValue] = {"disk_dir": str(tmp_path / "lab")}
        params["snapshot_id"] = snapshot_id
        opened = await onprem.apply(Order(DISK, OrderAction.OPEN, "m-1", 1, "l", params=params))
        assert opened.kind is OutcomeKind.APPLIED, opened
        zstd = parse_address(str(opened.result["zstd_address"]))
        async with FaultProxy(zstd.host, zstd.port) as wan:
            params = {"size": SIZE, "upstream": f"127.0.0.1:{wan.port}", "onprem": "onprem-1"}
            opened = await cache.apply(Order(DISK, OrderAction.OPEN, "m-1", 1, "l", params=params))
            assert opened.kind is OutcomeKind.APPLIED, opened
            vm = parse_address(str(opened.result["address"]))
            async with await NbdBackend.connect(vm, DISK) as disk:
                assert await disk.read(0, SIZE) == snapshot  # every chunk a miss, then kept
                await disk.write(CHUNK - 7, data)
                await disk.flush()
            cut = await cache.apply(Order(DISK, OrderAction.CUT_EPOCH, "m-1", 1, "l", 1))
            epoch = cut.result["epoch"]
            assert isinstance(epoch, int)
            await asyncio.wait_for(cache.cache.wait_committed(DISK, epoch), WAIT_S)
            wire = wan.bytes_up + wan.bytes_down
        status = cache.status()["link_zstd"]
        assert isinstance(status, dict)
        (figures,) = status.values()
        assert figures["wire_bytes"] == wire
        assert wire < figures["plain_bytes"]
        address = onprem.manager.address
        async with await NbdBackend.connect(address, current_export(DISK)) as current:
            image = await current.read(0, SIZE)
    expected = bytearray(snapshot)
    expected[CHUNK - 7 : CHUNK - 7 + len(data)] = data
    assert image == bytes(expected)


async def test_a_dropped_compressed_link_is_reconnected_with_a_fresh_stream(
    tmp_path: Path,
) -> None:
    image = tmp_path / "disk.raw"
    content = compressible(SIZE, 3)
    image.write_bytes(content)
    async with (
        FileBackend.open(image) as backend,
        NbdServer({"d": backend}) as server,
        ZstdRelay(LOOPBACK, TcpAddress("127.0.0.1", server.port), accepts="zstd") as far,
        FaultProxy("127.0.0.1", far.port) as wan,
        ZstdRelay(LOOPBACK, TcpAddress("127.0.0.1", wan.port), accepts="plain") as near,
    ):
        async with await NbdBackend.connect(near.address, "d") as disk:
            assert await disk.read(0, MIB) == content[:MIB]
            wan.drop_now()  # mid-stream: both compressors' state is lost with the link
            try:
                data = await disk.read(MIB, MIB)
            except ConnectionDropped:  # this call found the link gone: the next reconnects
                data = await disk.read(MIB, MIB)
            assert data == content[MIB:]
            assert disk.reconnects == 1
        assert near.connections == 2 and wan.drops == 1
