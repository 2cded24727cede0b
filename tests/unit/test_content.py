"""Lab disk content: about half allocated, a seeded mix of random, text and zero chunks."""

from __future__ import annotations

import itertools
import zlib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from appliance.sites.lab.content import (
    CHUNK_SIZE,
    ContentKind,
    fill_disk,
    plan_content,
    summarize,
    text_pool,
)
from appliance.storage.layered import LayeredDisk

MiB = CHUNK_SIZE
SIZE = 48 * MiB


@pytest.fixture
async def disk(tmp_path: Path) -> AsyncIterator[LayeredDisk]:
    async with await LayeredDisk.create(tmp_path / "disk", SIZE) as opened:
        yield opened


def test_a_4_gib_plan_is_about_half_allocated_with_every_kind() -> None:
    size = 4 * 1024**3
    pieces = plan_content(size, seed=3)
    summary = summarize(size, pieces)
    assert 0.45 < summary.allocated_bytes / size < 0.55
    assert summary.allocated_bytes == summary.data_bytes + summary.zero_bytes
    assert summary.data_bytes == summary.random_bytes + summary.text_bytes
    for kind_bytes in (summary.random_bytes, summary.text_bytes, summary.zero_bytes):
        assert kind_bytes > 0.05 * summary.allocated_bytes
    edges = [e for piece in pieces for e in (piece.offset, piece.end)]
    unaligned = [e for e in edges if e % MiB]
    assert 0 < len(unaligned) < 0.25 * len(edges)  # mostly whole chunks, some partial ones
    assert all(e % 4096 == 0 for e in unaligned)
    assert all(a.end <= b.offset for a, b in itertools.pairwise(pieces))
    assert pieces[-1].end <= size


def test_the_plan_depends_on_the_seed_only() -> None:
    assert plan_content(SIZE, seed=1) == plan_content(SIZE, seed=1)
    assert plan_content(SIZE, seed=1) != plan_content(SIZE, seed=2)


@pytest.mark.parametrize(("size", "ratio"), [(0, 0.5), (1000, 0.5), (5 * MiB + 1, 1.0), (SIZE, 0)])
def test_odd_sizes_and_ratios(size: int, ratio: float) -> None:
    summary = summarize(size, plan_content(size, seed=1, allocated_ratio=ratio))
    assert 0 <= summary.allocated_bytes <= size
    if ratio == 1.0:
        assert summary.allocated_bytes > size - MiB  # a partial run may trim a chunk
    if ratio == 0:
        assert summary.allocated_bytes == 0


def test_text_is_compressible() -> None:
    pool = text_pool(1)
    assert len(pool) == MiB
    assert len(zlib.compress(pool)) < 0.5 * len(pool)
    assert pool.count(b"\n") > 5000


async def test_fill_writes_what_the_summary_says(disk: LayeredDisk) -> None:
    view = disk.active()
    summary = await fill_disk(view, seed=7)
    extents = await view.extents()
    assert sum(e.length for e in extents if not e.hole) == summary.allocated_bytes
    assert summary.allocated_bytes == pytest.approx(SIZE / 2, rel=0.25)
    for piece in plan_content(SIZE, seed=7):
        data = await view.read(piece.offset, piece.length)
        if piece.kind is ContentKind.ZERO:
            assert data == bytes(piece.length)
        elif piece.kind is ContentKind.RANDOM:
            assert len(zlib.compress(data, 1)) > 0.99 * len(data)
        else:
            assert len(zlib.compress(data, 1)) < 0.6 * len(data)


async def test_same_seed_same_bytes(tmp_path: Path) -> None:
    contents = []
    for name, seed in (("a", 5), ("b", 5), ("c", 6)):
        async with await LayeredDisk.create(tmp_path / name, 16 * MiB) as disk:
            await fill_disk(disk.active(), seed=seed)
            contents.append(await disk.active().read(0, 16 * MiB))
    assert contents[0] == contents[1] != contents[2]
