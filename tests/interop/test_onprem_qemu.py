"""The on-prem I/O manager's exports, checked by qemu's tools as independent peers.

``qemu-img map`` sees the holes of the snapshot and current exports,
``qemu-img compare`` finds them byte-equal to the reference images, and
``qemu-io`` lands an epoch in a staging export that then commits.
"""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from appliance.components.onprem import (
    OnpremDiskOrder,
    OnpremIoManager,
    current_export,
    snapshot_export,
)
from appliance.datapath.nbd import NbdBackend, nbd_url
from tests.support.onprem import CHUNK, MIB, apply_to, make_lab_disk, manifest_of, ship

SIZE = 4 * MIB
DISK = "disk-q"
TOKEN = 1
TOOL_TIMEOUT = 60.0


async def run(*args: str, check: bool = True) -> str:
    process = await asyncio.create_subprocess_exec(
        *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    try:
        output, _ = await asyncio.wait_for(process.communicate(), TOOL_TIMEOUT)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise
    text = output.decode()
    if check:
        assert process.returncode == 0, f"{' '.join(args)} failed:\n{text}"
    return text


async def qemu_map(url: str) -> list[tuple[int, int, bool, bool]]:
    """``qemu-img map`` as (start, length, data, zero) entries."""
    entries = json.loads(await run("qemu-img", "map", "--output=json", "-f", "raw", url))
    return [(e["start"], e["length"], e["data"], e["zero"]) for e in entries]


def raw_file(path: Path, content: bytes) -> Path:
    path.write_bytes(content)
    return path


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[tuple[OnpremIoManager, bytes]]:
    snapshot_id, snapshot = await make_lab_disk(tmp_path / "lab-disk", SIZE, seed=5)
    order = OnpremDiskOrder("mig-q", DISK, TOKEN, tmp_path / "lab-disk", snapshot_id)
    async with OnpremIoManager(tmp_path / "onprem") as manager:
        await manager.open_disk(order)
        yield manager, snapshot


async def test_qemu_img_map_sees_the_holes_and_compare_the_bytes(
    served: tuple[OnpremIoManager, bytes], tmp_path: Path
) -> None:
    manager, snapshot = served
    # An epoch that zeroes a chunk holding data and fills a chunk that was a hole.
    data_chunk = next(
        i for i in range(SIZE // CHUNK) if snapshot[i * CHUNK : (i + 1) * CHUNK].count(0) < CHUNK
    )
    hole_chunk = next(
        i for i in range(SIZE // CHUNK) if snapshot[i * CHUNK : (i + 1) * CHUNK].count(0) == CHUNK
    )
    epoch = {data_chunk: bytes(CHUNK), hole_chunk: random.Random(1).randbytes(CHUNK)}
    manifest, _ = await ship(manager, DISK, 1, TOKEN, SIZE, epoch)
    await manager.commit_epoch(DISK, 1, TOKEN, manifest)
    current = apply_to(snapshot, epoch)
    for export, content in ((snapshot_export(DISK), snapshot), (current_export(DISK), current)):
        url = nbd_url(manager.address, export)
        runs = await qemu_map(url)
        assert any(not data for _, _, data, _ in runs), runs  # holes are seen
        for start, length, data, zero in runs:
            if zero or not data:
                assert content[start : start + length].count(0) == length, (export, start)
        reference = raw_file(tmp_path / f"{export.replace('/', '-')}.raw", content)
        await run("qemu-img", "compare", "-f", "raw", "-F", "raw", url, str(reference))
    current_runs = await qemu_map(nbd_url(manager.address, current_export(DISK)))
    at_hole_chunk = [r for r in current_runs if r[0] <= hole_chunk * CHUNK < r[0] + r[1]]
    assert at_hole_chunk[0][2] and not at_hole_chunk[0][3]  # now data
    at_zeroed = [r for r in current_runs if r[0] <= data_chunk * CHUNK < r[0] + r[1]]
    assert at_zeroed[0][3]  # reads as zero now


async def test_qemu_io_lands_an_epoch_in_a_staging_export_that_commits(
    served: tuple[OnpremIoManager, bytes],
) -> None:
    manager, snapshot = served
    epoch = {2: b"\x5c" * CHUNK, 3: b"\x5d" * CHUNK}
    address, export = await manager.stage_export(DISK, 1, TOKEN)
    url = nbd_url(address, export)
    output = await run(
        "qemu-io",
        "-f",
        "raw",
        url,
        "-c",
        f"write -P 0x5c {2 * CHUNK} {CHUNK}",
        "-c",
        f"write -P 0x5d {3 * CHUNK} {CHUNK}",
        "-c",
        "flush",
    )
    assert output.count("wrote") == 2, output
    await manager.commit_epoch(DISK, 1, TOKEN, manifest_of(epoch))
    current = nbd_url(manager.address, current_export(DISK))
    output = await run(
        "qemu-io",
        "-r",
        "-f",
        "raw",
        current,
        "-c",
        f"read -P 0x5c {2 * CHUNK} {CHUNK}",
        "-c",
        f"read -P 0x5d {3 * CHUNK} {CHUNK}",
    )
    assert output.count("read ") == 2 and "fail" not in output.lower(), output
    # The current image is read-only to peers: only commits change it.
    refused = await run("qemu-io", "-f", "raw", current, "-c", "write -P 1 0 512", check=False)
    assert "wrote" not in refused
    assert manager.committed_epoch(DISK) == 1
    async with await NbdBackend.connect(manager.address, current_export(DISK)) as backend:
        assert await backend.read(0, SIZE) == apply_to(snapshot, epoch)
