"""LayeredDisk after a crash: tracking survives, unflushed writes fall back, merges resume."""

from __future__ import annotations

import asyncio
import gc
import json
import os
import random
import signal
import sys
import textwrap
from pathlib import Path

import pytest

from appliance.storage import bitmap
from appliance.storage.extents import Extent
from appliance.storage.layered import LayeredDisk

G = 64 * 1024
SIZE = 16 * G


def pattern(seed: int, length: int) -> bytes:
    return random.Random(seed).randbytes(length)


CHILD = textwrap.dedent(
    """
    import asyncio, random, sys
    from appliance.storage.layered import LayeredDisk

    async def main(directory):
        disk = await LayeredDisk.open(directory)
        view = disk.active()
        snapshot = await disk.snapshot("migration")
        print(snapshot.id, flush=True)
        for block in (1, 2, 7):
            await view.write(block * 65536 + 100, random.Random(block).randbytes(70000))
        await view.zero(12 * 65536, 65536)
        await disk.flush()
        print("flushed", flush=True)
        for block in (4, 14):  # never flushed
            await view.write(block * 65536, random.Random(block).randbytes(65536))
        print("written", flush=True)
        await asyncio.sleep(3600)

    asyncio.run(main(sys.argv[1]))
    """
)


async def test_change_tracking_survives_sigkill_after_flush(tmp_path: Path) -> None:
    directory = tmp_path / "disk"
    async with await LayeredDisk.create(directory, SIZE, granularity=G) as disk:
        await disk.active().write(0, pattern(0, SIZE))
    child = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        CHILD,
        str(directory),
        stdout=asyncio.subprocess.PIPE,
        cwd=Path(__file__).parents[2],
    )
    assert child.stdout is not None
    try:
        snapshot_id = (await child.stdout.readline()).decode().strip()
        assert await child.stdout.readline() == b"flushed\n"
        assert await child.stdout.readline() == b"written\n"
    finally:
        child.send_signal(signal.SIGKILL)
        await child.wait()
    assert child.returncode == -signal.SIGKILL

    async with await LayeredDisk.open(directory) as reopened:
        changed = await reopened.changed_extents(snapshot_id)
        # Blocks 1-3 and 7-8 (writes spill over), 12 zeroed; 4 and 14 were never flushed.
        assert changed == [Extent(G, 3 * G), Extent(7 * G, 2 * G), Extent(12 * G, G, zero=True)]
        old = pattern(0, SIZE)
        assert await reopened.at(snapshot_id).read(0, SIZE) == old
        expected = bytearray(old)  # flushed writes landed; blocks 4 and 14 read as before
        for block in (1, 2, 7):
            expected[block * G + 100 : block * G + 70100] = pattern(block, 70000)
        expected[12 * G : 13 * G] = bytes(G)
        assert await reopened.active().read(0, SIZE) == expected


async def test_a_dropped_disk_keeps_what_was_flushed(tmp_path: Path) -> None:
    disk = await LayeredDisk.create(tmp_path / "d", SIZE, granularity=G)
    snapshot = await disk.snapshot("s")
    await disk.active().write(3 * G, b"flushed")
    await disk.flush()
    flushed = await disk.changed_extents(snapshot.id)
    await disk.active().write(9 * G, b"not flushed")
    del disk  # no close: the descriptors (and the lock) go with the object
    gc.collect()
    async with await LayeredDisk.open(tmp_path / "d") as reopened:
        assert await reopened.changed_extents(snapshot.id) == flushed == [Extent(3 * G, G)]
        assert await reopened.active().read(9 * G, 11) == bytes(11)


async def history(directory: Path) -> tuple[list[str], dict[str | None, bytes], list[Extent]]:
    """Three snapshots with overlapping writes; the content of every view; a change list."""
    async with await LayeredDisk.create(directory, SIZE, granularity=G) as disk:
        view = disk.active()
        ids = []
        for step in range(3):
            await view.write(step * G + 5, pattern(step, 3 * G))
            await view.zero((10 + step) * G, G)
            ids.append((await disk.snapshot(f"s{step}")).id)
        await view.write(2, pattern(9, G))
        contents: dict[str | None, bytes] = {None: await view.read(0, SIZE)}
        for snapshot_id in ids:
            contents[snapshot_id] = await disk.at(snapshot_id).read(0, SIZE)
        return ids, contents, await disk.changed_extents(ids[0])


def half_copy(directory: Path, upper: int, lower_file: str) -> None:
    """Copy the first half of what layer ``upper`` holds into a lower file, as a crash would."""
    upper_bits = bitmap.load(directory / f"overlay-{upper:06d}.bitmap", G, SIZE // G)
    runs = upper_bits.runs()
    upper_fd = os.open(directory / f"overlay-{upper:06d}.raw", os.O_RDONLY)
    lower_fd = os.open(directory / lower_file, os.O_RDWR)
    try:
        for first, end in runs[: max(1, len(runs) // 2)]:
            os.pwrite(lower_fd, os.pread(upper_fd, (end - first) * G, first * G), first * G)
    finally:
        os.close(upper_fd)
        os.close(lower_fd)


@pytest.mark.parametrize("victim", [0, 1])
async def test_a_merge_cut_short_is_finished_on_open(tmp_path: Path, victim: int) -> None:
    directory = tmp_path / "d"
    ids, contents, _ = await history(directory)
    manifest = json.loads((directory / "manifest.json").read_text())
    lower = manifest["snapshots"][victim]["layer"]
    upper = manifest["layers"][manifest["layers"].index(lower) + 1]
    # What delete_snapshot writes first, then a crash half-way through copying.
    manifest["snapshots"].pop(victim)
    manifest["pending"] = {"kind": "merge", "upper": upper, "lower": lower}
    (directory / "manifest.json").write_text(json.dumps(manifest))
    half_copy(directory, upper, "base.raw" if lower == 0 else f"overlay-{lower:06d}.raw")

    async with await LayeredDisk.open(directory) as disk:
        assert [s.id for s in disk.snapshots()] == [i for i in ids if i != ids[victim]]
        for snapshot_id, content in contents.items():
            if snapshot_id != ids[victim]:
                view = disk.active() if snapshot_id is None else disk.at(snapshot_id)
                assert await view.read(0, SIZE) == content
    assert not (directory / f"overlay-{upper:06d}.raw").exists()
    assert json.loads((directory / "manifest.json").read_text())["pending"] is None


async def test_a_consolidation_cut_short_is_finished_on_open(tmp_path: Path) -> None:
    directory = tmp_path / "d"
    _, contents, _ = await history(directory)
    manifest = json.loads((directory / "manifest.json").read_text())
    manifest["snapshots"] = []
    manifest["pending"] = {"kind": "consolidate"}
    (directory / "manifest.json").write_text(json.dumps(manifest))
    half_copy(directory, manifest["layers"][1], "base.raw")
    async with await LayeredDisk.open(directory) as disk:
        assert disk.snapshots() == []
        assert await disk.active().read(0, SIZE) == contents[None]
    assert sorted(p.name for p in directory.iterdir()) == [
        "base.raw",
        "base.zeroed",
        "lock",
        "manifest.json",
    ]


async def test_files_of_a_snapshot_cut_short_are_removed(tmp_path: Path) -> None:
    directory = tmp_path / "d"
    ids, contents, changed = await history(directory)
    for name in ("overlay-000042.raw", "overlay-000042.bitmap", "manifest.json.tmp", "keep.txt"):
        (directory / name).write_bytes(b"left over")
    async with await LayeredDisk.open(directory) as disk:
        assert await disk.changed_extents(ids[0]) == changed
        assert await disk.active().read(0, SIZE) == contents[None]
    names = {p.name for p in directory.iterdir()}
    assert "keep.txt" in names  # only our own leftovers are removed
    assert not names & {"overlay-000042.raw", "overlay-000042.bitmap", "manifest.json.tmp"}
