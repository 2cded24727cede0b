"""Helpers for the on-prem I/O manager tests: a lab disk, epochs, and a sender that ships them.

An epoch here is a dict ``chunk index -> bytes`` (a whole chunk, the last
one clipped; all-zero bytes are the guest zeroing it). ``ship`` sends one
the way the cloud cache does: the data path's ``Transfer`` over NBD, with an
explicit extent list and Ferry's hashed writes, then returns its manifest.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path

from appliance.components.onprem import EpochManifest, ManifestEntry, OnpremIoManager
from appliance.datapath.nbd import NbdAddress, NbdBackend
from appliance.datapath.retry import RetryPolicy
from appliance.datapath.transfer import Transfer, TransferOptions, TransferResult
from appliance.storage.backend import Backend
from appliance.storage.extents import Extent
from appliance.storage.hashing import chunk_hash
from appliance.storage.layered import LayeredDisk
from appliance.storage.memory import MemoryBackend

KIB = 1024
MIB = 1024 * KIB
GRANULARITY = 64 * KIB
CHUNK = 64 * KIB
FAST_RETRY = RetryPolicy(attempts=4, initial_s=0.001, max_s=0.005)

Epoch = dict[int, bytes]


def base_content(size: int, seed: int) -> bytes:
    """Random data in some regions, holes elsewhere (unaligned edges included)."""
    rng = random.Random(seed)
    content = bytearray(size)
    for start in range(0, size, 4 * GRANULARITY):
        if rng.random() < 0.6:
            begin = start + rng.randrange(0, GRANULARITY)
            length = rng.randrange(1, 3 * GRANULARITY)
            end = min(size, begin + length)
            content[begin:end] = rng.randbytes(end - begin)
    return bytes(content)


async def write_sparse(view: Backend, content: bytes, piece: int = GRANULARITY) -> None:
    """Write only the non-zero pieces of ``content``: the rest stays a hole."""
    for start in range(0, len(content), piece):
        data = content[start : start + piece]
        if data.count(0) != len(data):
            await view.write(start, data)


async def make_lab_disk(directory: Path, size: int, seed: int = 1) -> tuple[str, bytes]:
    """A layered disk with sparse content and a migrate-time snapshot; (snapshot id, bytes)."""
    content = base_content(size, seed)
    async with await LayeredDisk.create(directory, size, granularity=GRANULARITY) as disk:
        await write_sparse(disk.active(), content)
        snapshot = await disk.snapshot("migrate")
    return snapshot.id, content


def random_epoch(rng: random.Random, size: int, chunk: int = CHUNK, most: int = 8) -> Epoch:
    """Some chunks with new random content, now and then one the guest zeroed."""
    count = -(-size // chunk)
    epoch: Epoch = {}
    for index in rng.sample(range(count), rng.randint(1, min(most, count))):
        length = min(chunk, size - index * chunk)
        epoch[index] = bytes(length) if rng.random() < 0.2 else rng.randbytes(length)
    return epoch


def apply_to(image: bytes, epoch: Epoch, chunk: int = CHUNK) -> bytes:
    """The reference model: ``image`` with the epoch's chunks written over it."""
    result = bytearray(image)
    for index, data in epoch.items():
        result[index * chunk : index * chunk + len(data)] = data
    return bytes(result)


def manifest_of(epoch: Epoch, chunk: int = CHUNK) -> EpochManifest:
    return EpochManifest.build(
        ManifestEntry(index * chunk, len(data), chunk_hash(data)) for index, data in epoch.items()
    )


async def epoch_source(
    size: int, epoch: Epoch, chunk: int = CHUNK
) -> tuple[MemoryBackend, list[Extent]]:
    """What the cache ships from: the epoch's bytes at their offsets, and its extent list."""
    source = MemoryBackend(size, name="epoch")
    for index, data in epoch.items():
        await source.write(index * chunk, data)
    extents = [Extent(index * chunk, len(data)) for index, data in sorted(epoch.items())]
    return source, extents


async def ship(
    manager: OnpremIoManager,
    disk_id: str,
    number: int,
    token: int,
    size: int,
    epoch: Epoch,
    *,
    chunk: int = CHUNK,
    wrap: Callable[[NbdBackend], Backend] | None = None,
    via: NbdAddress | None = None,
) -> tuple[EpochManifest, TransferResult]:
    """Land ``epoch`` in its staging export as the cache would; its manifest and the result.

    ``via`` is where to connect instead of the manager's own address (a proxy).
    """
    address, export = await manager.stage_export(disk_id, number, token)
    address = via or address
    source, extents = await epoch_source(size, epoch, chunk)
    async with await NbdBackend.connect(address, export) as staged:
        target: Backend = staged if wrap is None else wrap(staged)
        transfer = Transfer(
            f"epoch-{disk_id}-{number}",
            source,
            target,
            extents=extents,
            options=TransferOptions(
                chunk_size=chunk, workers=4, whole_image_check=False, retry=FAST_RETRY
            ),
        )
        result = await transfer.run()
        await staged.flush()
    return manifest_of(epoch, chunk), result
