"""Reconcile passes: the in-process cloud cache copies what the guest wrote to a volume
(a raw file the bulk copy filled, served over real NBD), pass after pass, while it writes.

Capacity: scale 1/1024 makes the cache 3 MiB (48 chunks of 64 KiB) for a disk of a
little over 4 MiB (66 chunks), so written chunks get committed and evicted, and a pass
reads those back from on-prem through the cache.
"""

from __future__ import annotations

import asyncio
import errno
import random
from collections.abc import Iterable
from pathlib import Path

import pytest

from appliance.components.cache import reconcile
from appliance.components.cache.image import image_export
from appliance.components.cache.reconcile import (
    DIRECTORY,
    VolumeTarget,
    decode_chunks,
    encode_chunks,
)
from appliance.components.reconciling import (
    check_chunk_size,
    compare_images,
    parse_pass,
    parse_volume,
    volume_params,
)
from appliance.datapath.nbd.backend import NbdBackend
from appliance.datapath.nbd.channel import TcpAddress, UnixAddress
from appliance.errors import DiskCorrupt, OrderConflict, StaleToken
from appliance.storage.file import FileBackend
from appliance.storage.hashing import chunk_hash
from tests.support.cachelab import DISK, CacheLab, KiB, MiB, cache_lab, image_bytes
from tests.support.volumes import served_volume

SIZE = 4 * MiB + 12345
CHUNK = 64 * KiB


def chunk_bytes(chunks: set[int]) -> int:
    return sum(min(CHUNK, SIZE - c * CHUNK) for c in chunks)


async def guest_writes(
    lab: CacheLab, model: bytearray, rng: random.Random, count: int, written: set[int]
) -> None:
    """``count`` writes at random offsets and lengths (unaligned, some across chunks)."""
    for _ in range(count):
        offset = rng.randrange(0, SIZE - 1)
        data = rng.randbytes(rng.randrange(1, min(100 * KiB, SIZE - offset)))
        await lab.vm.write(offset, data)
        model[offset : offset + len(data)] = data
        written.update(range(offset // CHUNK, (offset + len(data) - 1) // CHUNK + 1))


async def committed(lab: CacheLab) -> int:
    epoch = await lab.cache.cut_epoch(DISK, lab.order.token)
    await lab.cache.wait_committed(DISK, epoch)
    return epoch


async def test_passes_while_the_guest_writes_then_a_last_pass_make_the_volume_equal(
    tmp_path: Path,
) -> None:
    content = image_bytes(SIZE, seed=3)
    model = bytearray(content)
    rng = random.Random(11)
    async with (
        cache_lab(tmp_path, content) as lab,
        served_volume(tmp_path / "volume.raw", content) as volume,
    ):
        store = lab.cache.disk(DISK).store
        before: set[int] = set()
        await guest_writes(lab, model, rng, 40, before)
        await committed(lab)
        assert await lab.vm.read(0, SIZE) == model  # reads evict committed written chunks
        assert before - set(store.live), "some written chunks must be read back from on-prem"

        cached = set(store.live)
        first = await lab.cache.reconcile(DISK, 1, 1, volume.target)
        assert (first.pass_no, first.chunks, first.bytes) == (1, len(before), chunk_bytes(before))
        evicted = before - cached
        assert first.fetched_bytes == chunk_bytes(evicted)  # read from on-prem...
        assert set(store.live) == cached  # ...and not kept: the guest's cache is untouched
        assert first.remainder_chunks == first.remainder_bytes == 0 and not first.redone
        assert volume.backend.chunks_written(CHUNK) == before  # never an unwritten chunk
        assert volume.read() == model

        between: set[int] = set()
        await guest_writes(lab, model, rng, 10, between)
        # Pass 2 held at its first write to the volume while the guest goes on writing:
        # an epoch of those writes commits (its chunks then known from its record), more
        # stay dirty in the open epoch.
        volume.backend.writes.clear()
        volume.backend.write_started.clear()
        gate = volume.backend.gate = asyncio.Event()
        second_pass = asyncio.create_task(lab.cache.reconcile(DISK, 1, 2, volume.target))
        await volume.backend.write_started.wait()
        during: set[int] = set()
        await guest_writes(lab, model, rng, 30, during)
        epoch = await committed(lab)
        assert (store.directory / DIRECTORY / f"epoch-{epoch}.chunks").exists()
        await guest_writes(lab, model, rng, 5, during)
        gate.set()
        second = await second_pass
        assert (second.chunks, second.bytes) == (len(between), chunk_bytes(between))
        assert (second.remainder_chunks, second.remainder_bytes) == (
            len(during),
            chunk_bytes(during),
        )
        assert second.mark > first.mark
        assert volume.backend.chunks_written(CHUNK) == between

        # The guest has stopped: the last pass copies what it wrote during pass 2, and
        # leaves nothing.
        volume.backend.writes.clear()
        last = await lab.cache.reconcile(DISK, 1, 3, volume.target)
        assert (last.chunks, last.remainder_chunks) == (len(during), 0)
        assert volume.backend.chunks_written(CHUNK) == during
        assert volume.read() == model
        assert await lab.vm.read(0, SIZE) == model
        check = await compare_images(lab.vm, volume.backend)
        assert check.equal and check.left_digest == check.right_digest


async def test_the_same_pass_twice_is_one_pass_and_an_older_one_or_a_stale_token_is_refused(
    tmp_path: Path,
) -> None:
    content = image_bytes(SIZE, seed=4)
    model = bytearray(content)
    rng = random.Random(12)
    volume_file = tmp_path / "volume.raw"
    volume_file.write_bytes(content)  # the bulk copy, reached as a path this time
    target = VolumeTarget(path=volume_file)
    async with cache_lab(tmp_path, content, token=2) as lab:
        written: set[int] = set()
        await guest_writes(lab, model, rng, 12, written)
        one = await lab.cache.reconcile(DISK, 2, 1, target)
        assert one.chunks == len(written) and volume_file.read_bytes() == model

        later: set[int] = set()
        await guest_writes(lab, model, rng, 6, later)
        again = await lab.cache.reconcile(DISK, 2, 1, target, workers=1)
        assert again == one  # the same answer; nothing copied
        assert volume_file.read_bytes() != model

        assert lab.cache.status().disks[0].reconcile_pass == 1
        two = await lab.cache.reconcile(DISK, 2, 2, target)
        assert two.chunks == len(later) and volume_file.read_bytes() == model
        with pytest.raises(OrderConflict, match="pass 1 is behind pass 2"):
            await lab.cache.reconcile(DISK, 2, 1, target)
        await guest_writes(lab, model, rng, 3, set())
        with pytest.raises(StaleToken):
            await lab.cache.reconcile(DISK, 1, 3, target)
        assert volume_file.read_bytes() != model  # the stale order copied nothing
        assert (await lab.cache.reconcile(DISK, 2, 3, target)).chunks > 0
        assert volume_file.read_bytes() == model


async def test_a_pass_cut_short_by_a_restart_is_made_again_whole(tmp_path: Path) -> None:
    """The cache stops in the middle of pass 2 (its task cancelled, the cache closed) and
    opens again from its data directory: pass 2 copies its chunks again (``redone``) and the
    writes made during it are the next pass's, exactly."""
    content = image_bytes(SIZE, seed=5)
    model = bytearray(content)
    rng = random.Random(13)
    first_writes: set[int] = set()
    during: set[int] = set()
    async with served_volume(tmp_path / "volume.raw", content) as volume:
        async with cache_lab(tmp_path, content) as lab:
            await guest_writes(lab, model, rng, 15, first_writes)
            await lab.cache.reconcile(DISK, 1, 1, volume.target)
            second: set[int] = set()
            await guest_writes(lab, model, rng, 20, second)
            gate = volume.backend.gate = asyncio.Event()
            volume.backend.write_started.clear()
            cut_short = asyncio.create_task(lab.cache.reconcile(DISK, 1, 2, volume.target))
            await volume.backend.write_started.wait()
            await guest_writes(lab, model, rng, 8, during)
            await lab.vm.flush()  # acknowledged and durable: the restart keeps them
            cut_short.cancel()
            with pytest.raises(asyncio.CancelledError):
                await cut_short
        volume.backend.gate = None
        gate.set()
        await volume.backend.settled()  # the write held when the cache stopped lands now
        async with cache_lab(tmp_path, content) as lab:
            volume.backend.writes.clear()
            redone = await lab.cache.reconcile(DISK, 1, 2, volume.target)
            assert redone.redone and redone.chunks == len(second)
            assert volume.backend.chunks_written(CHUNK) == second
            assert redone.remainder_chunks == len(during)
            last = await lab.cache.reconcile(DISK, 1, 3, volume.target)
            assert (last.chunks, last.remainder_chunks) == (len(during), 0)
            assert volume.read() == model == await lab.vm.read(0, SIZE)


async def test_an_epoch_whose_chunks_were_not_kept_makes_the_pass_copy_all_written(
    tmp_path: Path,
) -> None:
    content = image_bytes(SIZE, seed=6)
    model = bytearray(content)
    rng = random.Random(14)
    async with (
        cache_lab(tmp_path, content) as lab,
        served_volume(tmp_path / "volume.raw", content) as volume,
    ):
        everything: set[int] = set()
        await guest_writes(lab, model, rng, 10, everything)
        await lab.cache.reconcile(DISK, 1, 1, volume.target)
        await guest_writes(lab, model, rng, 4, everything)
        epoch = await committed(lab)
        record = lab.cache.disk(DISK).store.directory / DIRECTORY / f"epoch-{epoch}.chunks"
        record.unlink()  # as if writing it had failed
        second = await lab.cache.reconcile(DISK, 1, 2, volume.target)
        assert second.chunks == len(everything)  # more than needed, never less
        assert volume.read() == model


async def test_a_failure_to_keep_an_epochs_chunks_stops_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Writing an epoch's record fails (a full disk): the epoch still commits and ships go
    on; the pass that needs the record copies every chunk written instead."""
    content = image_bytes(SIZE, seed=10)
    model = bytearray(content)
    rng = random.Random(16)
    async with (
        cache_lab(tmp_path, content) as lab,
        served_volume(tmp_path / "volume.raw", content) as volume,
    ):
        everything: set[int] = set()
        await guest_writes(lab, model, rng, 10, everything)
        await lab.cache.reconcile(DISK, 1, 1, volume.target)
        save = reconcile._Files.save_chunks

        def failing(files: reconcile._Files, path: Path, chunks: Iterable[int]) -> None:
            if path.name.startswith("epoch-"):
                raise OSError(errno.ENOSPC, "no space left on device")
            save(files, path, chunks)

        monkeypatch.setattr(reconcile._Files, "save_chunks", failing)
        await guest_writes(lab, model, rng, 4, everything)
        await committed(lab)  # committed all the same
        await guest_writes(lab, model, rng, 2, everything)
        await committed(lab)
        second = await lab.cache.reconcile(DISK, 1, 2, volume.target)
        assert second.chunks == len(everything)
        assert volume.read() == model


def test_the_check_keeps_its_tables_small_on_large_disks() -> None:
    assert check_chunk_size(SIZE) == CHUNK
    assert check_chunk_size(64 << 30) == CHUNK
    assert check_chunk_size((64 << 30) + 1) == 2 * CHUNK
    assert check_chunk_size(1 << 40) == 1 << 20


def test_a_chunk_list_is_checked(tmp_path: Path) -> None:
    data = encode_chunks({9, 1, 2**40})
    assert decode_chunks(tmp_path, data) == {1, 9, 2**40}
    assert decode_chunks(tmp_path, encode_chunks(set())) == set()
    damaged = bytearray(data)
    damaged[12] ^= 1
    with pytest.raises(DiskCorrupt, match="checksum"):
        decode_chunks(tmp_path, bytes(damaged))
    with pytest.raises(DiskCorrupt, match="not a chunk list"):
        decode_chunks(tmp_path, data[:-3])


@pytest.mark.parametrize("block", [4 * KiB, CHUNK, 1 * MiB, 8 * MiB])
async def test_the_image_export_hashes_what_the_vm_sees(tmp_path: Path, block: int) -> None:
    """Blocks wholly out of the cache are hashed on-prem (no data comes over), the others
    in the cache; either way the hash of the bytes the VM reads, the unaligned tail too."""
    content = image_bytes(SIZE, seed=9)
    model = bytearray(content)
    async with cache_lab(tmp_path, content) as lab:
        await guest_writes(lab, model, random.Random(15), 20, set())
        await committed(lab)
        await lab.vm.read(0, 8 * CHUNK)  # some clean chunks in the cache too
        store = lab.cache.disk(DISK).store
        assert 0 < len(store.live) < SIZE // CHUNK
        async with await NbdBackend.connect(lab.cache.server.address, image_export(DISK)) as image:
            assert image.readonly and image.size == SIZE
            fetched = lab.proxy.bytes_down
            digests = await image.hash_blocks(0, SIZE, block)
            starts = range(0, SIZE, block)
            assert digests == [chunk_hash(model[at : at + block]) for at in starts]
            if block <= CHUNK:  # every block wholly in the cache or wholly on-prem: only
                assert lab.proxy.bytes_down - fetched < CHUNK  # digests came over the link
            assert await image.read(0, SIZE) == model
        assert await lab.vm.read(0, SIZE) == model


@pytest.mark.parametrize("offset", [0, 4095, 1 << 20, SIZE - 1])
async def test_the_image_check_names_the_first_byte_that_differs(
    tmp_path: Path, offset: int
) -> None:
    content = image_bytes(SIZE, seed=8)
    other = bytearray(content)
    other[offset] ^= 0x5A
    if offset != SIZE - 1:
        other[SIZE - 1] ^= 0x01  # a later difference too: the first is named
    (tmp_path / "a").write_bytes(content)
    (tmp_path / "b").write_bytes(bytes(other))
    left, right = FileBackend.open(tmp_path / "a"), FileBackend.open(tmp_path / "b")
    try:
        found = await compare_images(left, right, chunk_size=256 * KiB)
        assert found.first_difference == offset and not found.equal
        same = await compare_images(left, left)
        assert same.equal and same.first_difference is None
    finally:
        await left.close()
        await right.close()


def test_a_reconcile_orders_params_name_a_volume_and_a_pass() -> None:
    tcp = parse_volume({"volume": "10.0.0.9:10809", "volume_export": "vm1_ARM"})
    assert tcp == VolumeTarget(TcpAddress("10.0.0.9", 10809), "vm1_ARM")
    unix = parse_volume({"volume": "unix:/run/vol.sock", "volume_export": "v"})
    assert unix == VolumeTarget(UnixAddress(Path("/run/vol.sock")), "v")
    assert parse_volume({"volume_path": "/vol/a.raw"}) == VolumeTarget(path=Path("/vol/a.raw"))
    for target in (tcp, unix, VolumeTarget(path=Path("/vol/a.raw"))):
        assert isinstance(target, VolumeTarget)
        assert parse_volume(volume_params(target)) == target  # what the control plane sends
    for bad in ({}, {"volume": "nowhere"}, {"volume": 5}, {"volume": "h:1", "volume_path": "/x"}):
        assert isinstance(parse_volume(bad), str)
    assert parse_pass({"pass": 3}) == (3, 4) and parse_pass({"pass": 1, "workers": 2}) == (1, 2)
    for bad_pass in ({}, {"pass": 0}, {"pass": True}, {"pass": "1"}, {"pass": 1, "workers": 65}):
        assert isinstance(parse_pass(bad_pass), str)
