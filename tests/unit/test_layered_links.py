"""Staged files linked as layers of a LayeredDisk, and compaction: bytes, crashes, replays."""

from __future__ import annotations

import asyncio
import json
import random
import signal
import sys
import textwrap
from pathlib import Path

import pytest

from appliance.storage.layered import LayeredDisk, LinkStep
from appliance.storage.sparse import create

KIB = 1024
GRANULARITY = 128 * KIB
SIZE = 4 * 1024 * KIB + 5000  # the last block clipped
Ranges = list[tuple[int, bytes]]


class Crash(Exception):
    """Stands for the process dying at a step."""


def layers_of(directory: Path) -> list[int]:
    return list(json.loads((directory / "manifest.json").read_text())["layers"])


def apply(image: bytes, ranges: Ranges) -> bytes:
    out = bytearray(image)
    for offset, data in ranges:
        out[offset : offset + len(data)] = data
    return bytes(out)


async def base_disk(directory: Path, seed: int = 1) -> tuple[str, bytes]:
    """Random data here and there, a snapshot, then writes after it; (snapshot id, bytes)."""
    rng = random.Random(seed)
    async with await LayeredDisk.create(directory, SIZE, granularity=GRANULARITY) as disk:
        for _ in range(12):
            offset = rng.randrange(0, SIZE - 1000)
            await disk.active().write(offset, rng.randbytes(min(70_000, SIZE - offset)))
        snapshot = await disk.snapshot("migrate")
        await disk.active().write(3 * GRANULARITY + 7, rng.randbytes(9000))
        content = await disk.active().read(0, SIZE)
    return snapshot.id, content


def stage(path: Path, ranges: Ranges) -> None:
    """What a sender lands: the ranges' bytes at their offsets, holes elsewhere."""
    create(path, SIZE)
    with path.open("r+b") as file:
        for offset, data in ranges:
            file.seek(offset)
            file.write(data)


def epoch_ranges(rng: random.Random) -> Ranges:
    """64 KiB pieces (half a block), a spanning run, a zeroed piece, the clipped tail."""
    return [
        (0, rng.randbytes(64 * KIB)),  # the first half of block 0
        (5 * GRANULARITY + 64 * KIB, rng.randbytes(64 * KIB)),  # the second half of block 5
        (7 * GRANULARITY + 1000, rng.randbytes(3 * GRANULARITY)),  # unaligned both ends
        (12 * GRANULARITY, bytes(64 * KIB)),  # zeroed half block
        (13 * GRANULARITY, rng.randbytes(GRANULARITY)),  # one whole block
        (SIZE - 3000, rng.randbytes(3000)),  # inside the clipped last block
    ]


async def read_all(directory: Path, snapshot_id: str | None = None) -> bytes:
    async with await LayeredDisk.open(directory) as disk:
        view = disk.active() if snapshot_id is None else disk.at(snapshot_id)
        return await view.read(0, SIZE)


async def test_a_staged_file_becomes_the_top_layer_with_partial_blocks_filled(
    tmp_path: Path,
) -> None:
    directory = tmp_path / "disk"
    snapshot_id, before = await base_disk(directory)
    ranges = epoch_ranges(random.Random(2))
    async with await LayeredDisk.open(directory) as disk:
        frozen = await disk.at(snapshot_id).read(0, SIZE)
        staged = disk.staged_path()
        stage(staged, ranges)
        extents = [(offset, len(data)) for offset, data in ranges]
        assert await disk.link_layer(staged, extents) is True
        assert not staged.exists()
        assert await disk.active().read(0, SIZE) == apply(before, ranges)
        assert await disk.at(snapshot_id).read(0, SIZE) == frozen
        # Change tracking since the snapshot covers the linked blocks.
        changed = await disk.changed_extents(snapshot_id)
        for offset, data in ranges:
            assert any(e.start <= offset and offset + len(data) <= e.end for e in changed)
        # A later write goes to the linked layer (the top) like any other.
        await disk.active().write(GRANULARITY + 5, b"later")
        after = apply(apply(before, ranges), [(GRANULARITY + 5, b"later")])
        assert await disk.active().read(0, SIZE) == after
    assert await read_all(directory) == after
    assert await read_all(directory, snapshot_id) == frozen


async def test_linking_the_same_file_again_does_nothing(tmp_path: Path) -> None:
    directory = tmp_path / "disk"
    _, before = await base_disk(directory)
    ranges = epoch_ranges(random.Random(3))
    async with await LayeredDisk.open(directory) as disk:
        staged = disk.staged_path()
        stage(staged, ranges)
        extents = [(offset, len(data)) for offset, data in ranges]
        assert await disk.link_layer(staged, extents) is True
        count = len(layers_of(directory))
        assert await disk.link_layer(staged, extents) is False  # a replay: recognised by name
        assert len(layers_of(directory)) == count
        assert await disk.active().read(0, SIZE) == apply(before, ranges)
    with pytest.raises(ValueError, match="not a staged file"):
        async with await LayeredDisk.open(directory) as disk:
            await disk.link_layer(tmp_path / "elsewhere.raw", [(0, 10)])


@pytest.mark.parametrize("step", [LinkStep.PREPARED, LinkStep.LINKED])
async def test_a_link_stopped_after_a_step_leaves_before_or_after_and_completes(
    tmp_path: Path, step: LinkStep
) -> None:
    directory = tmp_path / "disk"
    _, before = await base_disk(directory)
    ranges = epoch_ranges(random.Random(4))
    extents = [(offset, len(data)) for offset, data in ranges]

    async def hook(at: LinkStep) -> None:
        if at == step:
            raise Crash(at)

    async with await LayeredDisk.open(directory) as disk:
        staged = disk.staged_path()
        stage(staged, ranges)
        with pytest.raises(Crash):
            await disk.link_layer(staged, extents, hook)
    # Reopened (strays removed): the disk is before or after the link, never between.
    after = apply(before, ranges)
    assert await read_all(directory) == (before if step == LinkStep.PREPARED else after)
    assert staged.exists()  # kept until the manifest names the layer (and a bit after)
    async with await LayeredDisk.open(directory) as disk:
        assert await disk.link_layer(staged, extents) is (step == LinkStep.PREPARED)
        assert not staged.exists()
        assert await disk.active().read(0, SIZE) == after
    assert await read_all(directory) == after


async def linked_chain(directory: Path, epochs: int, seed: int) -> tuple[str, list[bytes]]:
    """A disk with ``epochs`` linked layers; its snapshot id and the image after each."""
    snapshot_id, image = await base_disk(directory, seed)
    rng = random.Random(seed)
    images = [image]
    async with await LayeredDisk.open(directory) as disk:
        for _ in range(epochs):
            ranges = epoch_ranges(rng)
            rng.shuffle(ranges)
            ranges = sorted(ranges[:4])
            staged = disk.staged_path()
            stage(staged, ranges)
            await disk.link_layer(staged, [(offset, len(data)) for offset, data in ranges])
            images.append(apply(images[-1], ranges))
    return snapshot_id, images


async def test_compaction_folds_unfrozen_layers_and_every_view_reads_the_same(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("appliance.storage.layer_links.FOLD_PIECE", GRANULARITY)  # many pieces
    directory = tmp_path / "disk"
    snapshot_id, images = await linked_chain(directory, 4, seed=5)
    frozen = await read_all(directory, snapshot_id)
    assert len(layers_of(directory)) == 2 + 4  # base, the writes after the snapshot, 4 links
    async with await LayeredDisk.open(directory) as disk:
        changed = await disk.changed_extents(snapshot_id)
        seen: list[bytes] = []

        async def reader(at: LinkStep) -> None:  # reads between the pieces see the same
            seen.append(await disk.active().read(0, SIZE))

        removed = await disk.compact(reader)
        assert removed == 3  # all but the top folded into the layer above the snapshot
        assert seen and all(image == images[-1] for image in seen)
        assert await disk.active().read(0, SIZE) == images[-1]
        assert await disk.at(snapshot_id).read(0, SIZE) == frozen
        assert await disk.changed_extents(snapshot_id) == changed
        assert await disk.compact() == 0
    assert len(layers_of(directory)) == 3
    assert await read_all(directory) == images[-1]
    assert sorted(p.name for p in directory.glob("overlay-*.raw")) == [
        f"overlay-{n:06d}.raw" for n in layers_of(directory)[1:]
    ]


async def test_an_empty_unfrozen_layer_is_dropped_at_once(tmp_path: Path) -> None:
    directory = tmp_path / "disk"
    async with await LayeredDisk.create(directory, SIZE, granularity=GRANULARITY) as disk:
        snapshot = await disk.snapshot("migrate")  # an empty top above it
        staged = disk.staged_path()
        stage(staged, [(0, b"x" * GRANULARITY)])
        await disk.link_layer(staged, [(0, GRANULARITY)])
        assert len(layers_of(directory)) == 3
        assert await disk.compact() == 1  # the empty layer below the linked top, no copy
        assert len(layers_of(directory)) == 2
        assert await disk.active().read(0, GRANULARITY) == b"x" * GRANULARITY
        assert await disk.at(snapshot.id).read(0, GRANULARITY) == bytes(GRANULARITY)


@pytest.mark.parametrize("step", [LinkStep.FOLDED_PART, LinkStep.FOLDED])
async def test_a_compaction_stopped_after_a_step_reads_the_same_and_finishes_later(
    tmp_path: Path, step: LinkStep, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("appliance.storage.layer_links.FOLD_PIECE", GRANULARITY)
    directory = tmp_path / "disk"
    snapshot_id, images = await linked_chain(directory, 3, seed=6)
    frozen = await read_all(directory, snapshot_id)
    layers = layers_of(directory)

    async def hook(at: LinkStep) -> None:
        if at == step:
            raise Crash(at)

    async with await LayeredDisk.open(directory) as disk:
        with pytest.raises(Crash):
            await disk.compact(hook)
    assert layers_of(directory) == layers  # the manifest never named a half-folded state
    assert await read_all(directory) == images[-1]
    assert await read_all(directory, snapshot_id) == frozen
    async with await LayeredDisk.open(directory) as disk:
        assert await disk.compact() == 2
        assert await disk.active().read(0, SIZE) == images[-1]
        assert await disk.at(snapshot_id).read(0, SIZE) == frozen


async def test_closing_stops_a_compaction_between_pieces(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("appliance.storage.layer_links.FOLD_PIECE", GRANULARITY)
    directory = tmp_path / "disk"
    _, images = await linked_chain(directory, 3, seed=7)
    layers = layers_of(directory)
    reached, gate = asyncio.Event(), asyncio.Event()

    async def hold(at: LinkStep) -> None:
        if at == LinkStep.FOLDED_PART and not reached.is_set():
            reached.set()
            await gate.wait()

    disk = await LayeredDisk.open(directory)
    compaction = asyncio.create_task(disk.compact(hold))
    await reached.wait()
    # The close's first step runs before the compaction wakes (the ready queue is FIFO):
    # it marks the disk as closing, so the compaction stops after this piece.
    closing = asyncio.create_task(disk.close())
    gate.set()
    assert await compaction == 0
    await closing
    assert layers_of(directory) == layers
    assert await read_all(directory) == images[-1]


CHILD = textwrap.dedent(
    """
    import asyncio, sys
    from appliance.storage import layer_links
    from appliance.storage.layered import LayeredDisk

    async def main(directory, step):
        layer_links.FOLD_PIECE = 128 * 1024

        async def hook(at):
            if at == step:
                print("stopped", at, flush=True)
                await asyncio.Event().wait()  # the parent kills us here

        disk = await LayeredDisk.open(directory)
        await disk.compact(hook)
        print("finished", flush=True)

    asyncio.run(main(*sys.argv[1:]))
    """
)


@pytest.mark.parametrize("step", [LinkStep.FOLDED_PART, LinkStep.FOLDED])
async def test_a_compaction_killed_after_a_step_reads_the_same_and_finishes_later(
    tmp_path: Path, step: LinkStep
) -> None:
    directory = tmp_path / "disk"
    snapshot_id, images = await linked_chain(directory, 3, seed=8)
    frozen = await read_all(directory, snapshot_id)
    layers = layers_of(directory)
    child = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        CHILD,
        str(directory),
        step.value,
        stdout=asyncio.subprocess.PIPE,
        cwd=Path(__file__).parents[2],
    )
    assert child.stdout is not None
    try:
        line = (await asyncio.wait_for(child.stdout.readline(), 60)).decode()
        assert line.split() == ["stopped", step.value], line
    finally:
        if child.returncode is None:
            child.send_signal(signal.SIGKILL)
        await child.wait()
    assert child.returncode == -signal.SIGKILL
    assert layers_of(directory) == layers
    assert await read_all(directory) == images[-1]
    assert await read_all(directory, snapshot_id) == frozen
    async with await LayeredDisk.open(directory) as disk:
        assert await disk.compact() == 2
        assert await disk.active().read(0, SIZE) == images[-1]
        assert await disk.at(snapshot_id).read(0, SIZE) == frozen
