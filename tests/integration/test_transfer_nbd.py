"""The transfer engine between two of our NBD servers, with Redis checkpoints and a faulty link."""

from __future__ import annotations

import os
import random
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from appliance.datapath.nbd import NbdBackend, NbdServer, TcpAddress
from appliance.datapath.retry import RetryPolicy
from appliance.datapath.transfer import Transfer, TransferOptions
from appliance.errors import CertificationFailed, ConnectionDropped, TransferFailed
from appliance.state.checkpoints import RedisCheckpointStore
from appliance.state.keys import Keys
from appliance.storage.file import FileBackend
from tests.support.faultproxy import FaultProxy
from tests.support.sparse import file_data_ranges

KIB = 1024
MIB = 1024 * KIB
CHUNK = 256 * KIB
DISK = 8 * MIB + 3 * KIB  # not a multiple of the chunk size
FAST_RETRY = RetryPolicy(attempts=4, initial_s=0.01, max_s=0.05)


def write_lab_file(path: Path, size: int, seed: int) -> int:
    """A sparse file: random and compressible runs, written zeroes, holes. Returns data bytes."""
    rng = random.Random(seed)
    written = 0
    with path.open("wb") as file:
        file.truncate(size)
        pos = 0
        while pos < size:
            length = min(rng.randrange(4 * KIB, 3 * CHUNK), size - pos)
            kind = rng.choice(["random", "text", "zero", "hole", "hole"])
            if kind != "hole":
                file.seek(pos)
                if kind == "random":
                    file.write(rng.randbytes(length))
                elif kind == "text":
                    file.write((b"lab disk text " * (length // 14 + 1))[:length])
                else:
                    file.write(bytes(length))
                written += length
            pos += length
    return written


@dataclass
class Endpoints:
    source_path: Path
    target_path: Path
    source_server: NbdServer
    target_server: NbdServer


@pytest.fixture
async def endpoints(tmp_path: Path) -> AsyncIterator[Endpoints]:
    source_path, target_path = tmp_path / "source.raw", tmp_path / "target.raw"
    write_lab_file(source_path, DISK, seed=3)
    target_path.touch()
    os.truncate(target_path, DISK)
    async with (
        FileBackend.open(source_path, readonly=True) as source_file,
        FileBackend.open(target_path) as target_file,
        NbdServer({"src": source_file}) as source_server,
        NbdServer({"dst": target_file}) as target_server,
    ):
        yield Endpoints(source_path, target_path, source_server, target_server)


def store(redis: aioredis.Redis, keys: Keys, transfer_id: str) -> RedisCheckpointStore:
    return RedisCheckpointStore(redis, keys, transfer_id)


def options(**overrides: object) -> TransferOptions:
    base: dict[str, object] = {"chunk_size": CHUNK, "retry": FAST_RETRY}
    base.update(overrides)
    return TransferOptions(**base)  # type: ignore[arg-type]


async def test_copy_with_verification_over_nbd(
    endpoints: Endpoints, redis: aioredis.Redis, keys: Keys
) -> None:
    async with (
        await NbdBackend.connect(endpoints.source_server.address, "src") as source,
        await NbdBackend.connect(endpoints.target_server.address, "dst") as target,
    ):
        result = await Transfer(
            "nbd-copy", source, target, checkpoints=store(redis, keys, "nbd-copy"),
            options=options(),
        ).run()  # fmt: skip
        sent_to_target = target.bytes_sent

    assert endpoints.target_path.read_bytes() == endpoints.source_path.read_bytes()
    stats = result.stats
    assert stats.bytes_read_back == 0  # verified at the target, never read back
    # Chunks written wholly as data were verified by the digest in the write's reply;
    # only the others (zero segments, partial chunks) needed a checksum request.
    assert 0 < stats.chunks_verified_on_write <= stats.chunks_copied
    assert result.source_digest == result.target_digest
    # Only data travels: the wire carries what was written plus small headers.
    assert stats.bytes_written <= sum(
        end - start for start, end in file_data_ranges(endpoints.source_path)
    )
    assert stats.bytes_written <= sent_to_target <= stats.bytes_written * 1.02 + 64 * KIB
    target_data = file_data_ranges(endpoints.target_path)
    assert sum(end - start for start, end in target_data) <= stats.bytes_written + stats.zero_bytes
    saved = await redis.hgetall(keys.checkpoint("nbd-copy"))
    assert b"complete" in saved and int(saved[b"durable"]) >= 1


async def test_a_dropped_connection_is_retried_and_the_copy_completes(
    endpoints: Endpoints, redis: aioredis.Redis, keys: Keys
) -> None:
    async with FaultProxy("127.0.0.1", endpoints.target_server.port) as proxy:
        async with (
            await NbdBackend.connect(endpoints.source_server.address, "src") as source,
            await NbdBackend.connect(TcpAddress("127.0.0.1", proxy.port), "dst") as target,
        ):
            proxy.drop_after(2 * MIB)
            result = await Transfer(
                "drop", source, target, checkpoints=store(redis, keys, "drop"), options=options()
            ).run()
            reconnects = target.reconnects

    assert proxy.drops >= 1
    assert reconnects >= 1
    assert result.stats.retries >= 1
    assert endpoints.target_path.read_bytes() == endpoints.source_path.read_bytes()


async def test_a_link_that_keeps_dropping_fails_naming_the_chunk(
    endpoints: Endpoints, redis: aioredis.Redis, keys: Keys
) -> None:
    async with FaultProxy("127.0.0.1", endpoints.target_server.port) as proxy:
        async with (
            await NbdBackend.connect(endpoints.source_server.address, "src") as source,
            await NbdBackend.connect(TcpAddress("127.0.0.1", proxy.port), "dst") as target,
        ):
            proxy.drop_every(16 * KIB)  # handshakes pass; no chunk write ever does
            transfer = Transfer(
                "dead", source, target, checkpoints=store(redis, keys, "dead"),
                options=options(final_sync_timeout_s=2.0),
            )  # fmt: skip
            with pytest.raises(TransferFailed) as failure:
                await transfer.run()

    error = failure.value
    assert error.attempts == FAST_RETRY.attempts
    assert isinstance(error.cause, ConnectionDropped)
    # A chunk, or the run of adjacent data chunks that travelled with it.
    assert error.offset % CHUNK == 0 and 0 < error.length <= TransferOptions().max_data_run
    assert f"{error.length} bytes at offset {error.offset}" in str(error)


@pytest.mark.parametrize("certify", [True, False], ids=["certify", "image-check"])
async def test_a_bit_flipped_at_the_target_is_caught(
    endpoints: Endpoints, redis: aioredis.Redis, keys: Keys, certify: bool
) -> None:
    """Certification re-reads both sides; the plain whole-image check hashes the target
    afresh (data chunks by checksum, holes from BLOCK_STATUS): both see the flip."""
    checkpoints = store(redis, keys, "flip")
    async with (
        await NbdBackend.connect(endpoints.source_server.address, "src") as source,
        await NbdBackend.connect(endpoints.target_server.address, "dst") as target,
    ):
        await Transfer("flip", source, target, checkpoints=checkpoints, options=options()).run()
        start, end = file_data_ranges(endpoints.target_path)[-1]
        flip_at = (start + end) // 2
        with endpoints.target_path.open("r+b") as file:
            file.seek(flip_at)
            byte = file.read(1)[0]
            file.seek(flip_at)
            file.write(bytes([byte ^ 0x10]))

        check = Transfer(
            "flip", source, target, checkpoints=checkpoints, options=options(certify=certify)
        )
        with pytest.raises(CertificationFailed) as failure:
            await check.run()
    assert check.stats.chunks_skipped > 0  # nothing re-sent: the checkpoint said all done
    chunk_start = flip_at - flip_at % CHUNK
    assert failure.value.offset == chunk_start
    assert failure.value.offset <= flip_at < failure.value.offset + failure.value.length


async def test_a_chunk_missing_at_the_target_is_caught_by_the_image_check(
    endpoints: Endpoints, redis: aioredis.Redis, keys: Keys
) -> None:
    """A chunk the target does not hold (a lost write, a plan that skipped it) maps as a
    hole at the target: the check counts it as zeroes without reading, and differs."""
    checkpoints = store(redis, keys, "lost")
    async with (
        await NbdBackend.connect(endpoints.source_server.address, "src") as source,
        await NbdBackend.connect(endpoints.target_server.address, "dst") as target,
    ):
        await Transfer("lost", source, target, checkpoints=checkpoints, options=options()).run()
        content = endpoints.source_path.read_bytes()
        lost = next(
            at for at in range(CHUNK, DISK, CHUNK) if content[at : at + CHUNK].count(0) < CHUNK
        )
        await target.zero(lost, CHUNK, punch_hole=True)

        check = Transfer("lost", source, target, checkpoints=checkpoints, options=options())
        with pytest.raises(CertificationFailed) as failure:
            await check.run()
    assert (failure.value.offset, failure.value.length) == (lost, CHUNK)
