"""The files of a layered disk and the blocking work on them (worker threads only).

A ``Layer`` is one sparse raw file plus its bitmap. This module creates and
opens a disk's directory (taking an ``flock`` so one process at a time owns
it), plans reads and copy-on-write writes across layers, folds one layer's
blocks into another, makes a staged file a layer, and removes files the
manifest no longer names.

A *staged* file (``staged-<hex>.raw`` in the disk's directory, never a stray:
only its owner removes it) is written by someone else (the on-prem I/O
manager lands an epoch there) and then linked as a new top layer: its
partly covered blocks are filled from the layers below, it is hard-linked
under the layer's name (same inode: nothing is copied) next to a bitmap of
the blocks it covers, and the manifest then names it.
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from appliance.errors import DiskCorrupt, DiskInUse
from appliance.storage import bitmap, disk_manifest, sparse
from appliance.storage.bitmap import Bitmap, fsync_directory
from appliance.storage.disk_manifest import (
    BASE_LAYER,
    LOCK_NAME,
    MANIFEST_NAME,
    Manifest,
    bitmap_file_name,
    data_file_name,
)
from appliance.storage.layer_map import Geometry, LayerState, Run

_STRAY_FILE = re.compile(r"overlay-(\d{6})\.(?:raw|bitmap)")
_STAGED_FILE = re.compile(r"staged-[0-9a-f]{32}\.raw")
_TEMPORARY_FILE = re.compile(r"(?:manifest\.json|base\.zeroed|overlay-\d{6}\.bitmap)\.tmp")

ReadPlan = list[tuple[int, int, int]]
"""``(fd, start, end)`` pieces that together make one read."""


class Layer:
    """One layer file and its bitmap (overlay: blocks written; base: blocks zeroed)."""

    __slots__ = ("bitmap", "bitmap_path", "data_path", "fd", "number", "persisted")

    def __init__(self, directory: Path, number: int, fd: int, blocks: Bitmap) -> None:
        self.number = number
        self.fd = fd
        self.bitmap = blocks
        self.data_path = directory / data_file_name(number)
        self.bitmap_path = directory / bitmap_file_name(number)
        self.persisted = blocks.generation  # the bitmap generation last made durable

    @property
    def is_base(self) -> bool:
        return self.number == BASE_LAYER

    def state(self) -> LayerState:
        return LayerState(self.fd, self.bitmap.as_int())


class OpenFiles:
    """The descriptors a disk holds; closed once, by ``close`` or when the disk is dropped."""

    def __init__(self, lock_fd: int) -> None:
        self.lock_fd = lock_fd
        self.fds: set[int] = set()

    def close(self, fd: int) -> None:
        self.fds.discard(fd)
        os.close(fd)

    def close_all(self) -> None:
        for fd in self.fds:
            os.close(fd)
        self.fds.clear()
        if self.lock_fd >= 0:
            os.close(self.lock_fd)  # releases the flock
            self.lock_fd = -1


# -- reads and writes ---------------------------------------------------------------------------


def owner(layers: list[Layer], block: int) -> Layer:
    """The highest layer of a view that holds ``block`` (the base holds everything else)."""
    for index in range(len(layers) - 1, 0, -1):
        if block in layers[index].bitmap:
            return layers[index]
    return layers[0]


def plan_read(layers: list[Layer], geometry: Geometry, offset: int, end: int) -> ReadPlan:
    """Which file each block of ``[offset, end)`` comes from, joined into runs."""
    if len(layers) == 1:
        return [(layers[0].fd, offset, end)]
    granularity = geometry.granularity
    plan: ReadPlan = []
    first, stop = geometry.block_range(offset, end)
    for block in range(first, stop):
        fd = owner(layers, block).fd
        hi = min((block + 1) * granularity, end)
        if plan and plan[-1][0] == fd:
            plan[-1] = (fd, plan[-1][1], hi)
        else:
            plan.append((fd, max(block * granularity, offset), hi))
    return plan


def read_pieces(plan: ReadPlan) -> bytes:
    if len(plan) == 1:
        fd, start, end = plan[0]
        return sparse.read_exact(fd, start, end - start)
    return b"".join(sparse.read_exact(fd, start, end - start) for fd, start, end in plan)


def read_pieces_into(plan: ReadPlan, view: memoryview) -> None:
    """Fill ``view`` (the bytes from the plan's first offset on) straight from the files."""
    base = plan[0][1] if plan else 0
    for fd, start, end in plan:
        sparse.read_exact_into(fd, start, view[start - base : end - base])


@dataclass(frozen=True, slots=True)
class CopyOnWrite:
    """A partly written block not yet in the top layer: read it from below, patch, write whole."""

    source_fd: int
    block_start: int
    block_length: int
    inner_offset: int
    piece: memoryview


@dataclass(frozen=True, slots=True)
class WritePlan:
    copies: list[CopyOnWrite]
    direct_offset: int
    direct: memoryview


def plan_write(layers: list[Layer], geometry: Geometry, offset: int, data: memoryview) -> WritePlan:
    """How to write ``data`` into the top overlay so every block it then owns is whole."""
    top, end = layers[-1], offset + len(data)
    first, stop = geometry.block_range(offset, end)
    copies: list[CopyOnWrite] = []
    direct_start, direct_end = offset, end
    for block in sorted({first, stop - 1}):  # only the edge blocks can be partly written
        block_start, block_end = geometry.byte_range((block, block + 1))
        if (offset <= block_start and end >= block_end) or block in top.bitmap:
            continue
        lo, hi = max(block_start, offset), min(block_end, end)
        source = owner(layers[:-1], block)
        piece = data[lo - offset : hi - offset]
        length = block_end - block_start
        copies.append(CopyOnWrite(source.fd, block_start, length, lo - block_start, piece))
        if block == first:
            direct_start = max(direct_start, block_end)
        if block == stop - 1:
            direct_end = min(direct_end, block_start)
    direct = data[direct_start - offset : max(direct_start, direct_end) - offset]
    return WritePlan(copies, direct_start, direct)


def apply_write(fd: int, plan: WritePlan) -> None:
    for copy in plan.copies:
        block = bytearray(sparse.read_exact(copy.source_fd, copy.block_start, copy.block_length))
        block[copy.inner_offset : copy.inner_offset + len(copy.piece)] = copy.piece
        sparse.write_all(fd, copy.block_start, block)
    if plan.direct:
        sparse.write_all(fd, plan.direct_offset, plan.direct)


def fold(geometry: Geometry, sources: list[tuple[Layer, list[Run]]], target: Layer) -> list[Run]:
    """Copy the given block runs of each source into ``target``: data copied, holes punched.

    Returns the block runs that became zero (the base must remember them) and
    ends with the target's data durable. Repeating it gives the same result.
    """
    zeroed: list[Run] = []
    for source, runs in sources:
        for run in runs:
            lo, hi = geometry.byte_range(run)
            for piece_lo, piece_hi, is_data in sparse.allocation(source.fd, lo, hi):
                if is_data:
                    sparse.copy(source.fd, target.fd, piece_lo, piece_hi)
                else:
                    sparse.punch(target.fd, piece_lo, piece_hi - piece_lo)
                    zeroed.append(geometry.block_range(piece_lo, piece_hi))
    os.fdatasync(target.fd)
    return zeroed


# -- the directory ------------------------------------------------------------------------------


def _save_empty_bitmap(path: Path, geometry: Geometry) -> Bitmap:
    blocks = Bitmap(geometry.blocks)
    bitmap.save(path, blocks.to_bytes(), blocks.nbits, geometry.granularity)
    return blocks


def create_disk(directory: Path, manifest: Manifest) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    if (directory / MANIFEST_NAME).exists():
        raise FileExistsError(errno.EEXIST, "a disk already exists there", str(directory))
    geometry = Geometry(manifest.size, manifest.granularity)
    for name in (data_file_name(BASE_LAYER), bitmap_file_name(BASE_LAYER)):
        (directory / name).unlink(missing_ok=True)  # left by a create that did not finish
    sparse.create(directory / data_file_name(BASE_LAYER), manifest.size)
    _save_empty_bitmap(directory / bitmap_file_name(BASE_LAYER), geometry)
    disk_manifest.save(directory, manifest)  # last: a manifest means a complete disk


def open_disk(directory: Path) -> tuple[Manifest, list[Layer], OpenFiles]:
    lock_fd = os.open(directory / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    files = OpenFiles(lock_fd)
    try:
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as error:
            raise DiskInUse(directory) from error
        manifest = disk_manifest.load(directory)
        geometry = Geometry(manifest.size, manifest.granularity)
        layers = [_open_layer(directory, number, geometry, files) for number in manifest.layers]
    except BaseException:
        files.close_all()
        raise
    return manifest, layers, files


def _open_layer(directory: Path, number: int, geometry: Geometry, files: OpenFiles) -> Layer:
    path = directory / data_file_name(number)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError as error:
        raise DiskCorrupt(path, "layer file is missing") from error
    files.fds.add(fd)
    if os.fstat(fd).st_size != geometry.size:
        raise DiskCorrupt(path, f"layer file is not {geometry.size} bytes long")
    bitmap_path = directory / bitmap_file_name(number)
    return Layer(
        directory, number, fd, bitmap.load(bitmap_path, geometry.granularity, geometry.blocks)
    )


def new_overlay(directory: Path, number: int, geometry: Geometry, files: OpenFiles) -> Layer:
    """An empty overlay's files, durable (its bitmap's save fsyncs the directory), and opened."""
    path = directory / data_file_name(number)
    sparse.create(path, geometry.size)
    blocks = _save_empty_bitmap(directory / bitmap_file_name(number), geometry)
    fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    files.fds.add(fd)
    return Layer(directory, number, fd, blocks)


def drop_layers(directory: Path, layers: list[Layer], files: OpenFiles) -> None:
    for layer in layers:
        files.close(layer.fd)
        layer.data_path.unlink(missing_ok=True)
        layer.bitmap_path.unlink(missing_ok=True)
    fsync_directory(directory)


def remove_strays(directory: Path, layers: set[int]) -> None:
    """Delete files of layers the manifest does not name (a snapshot or merge cut short)."""
    removed = False
    for path in directory.iterdir():
        stray = _STRAY_FILE.fullmatch(path.name)
        if (stray and int(stray[1]) not in layers) or _TEMPORARY_FILE.fullmatch(path.name):
            path.unlink()
            removed = True
    if removed:
        fsync_directory(directory)


# -- staged files -------------------------------------------------------------------------------


def staged_name() -> str:
    """A fresh name for a staged file."""
    return f"staged-{uuid.uuid4().hex}.raw"


def is_staged(directory: Path, path: Path) -> bool:
    return path.parent == directory and _STAGED_FILE.fullmatch(path.name) is not None


def staged_files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.iterdir() if _STAGED_FILE.fullmatch(p.name))


def remove_staged(directory: Path, paths: Sequence[Path]) -> None:
    """Remove staged files (absent is fine), durably."""
    for path in paths:
        path.unlink(missing_ok=True)
    if paths:
        fsync_directory(directory)


def covered_runs(geometry: Geometry, extents: Sequence[tuple[int, int]]) -> list[Run]:
    """The block runs that byte ranges ``(offset, length)`` touch, merged."""
    runs: list[Run] = []
    for offset, length in sorted(extents):
        first, stop = geometry.block_range(offset, offset + length)
        if runs and runs[-1][1] >= first:
            runs[-1] = (runs[-1][0], max(runs[-1][1], stop))
        else:
            runs.append((first, stop))
    return runs


def _partial_blocks(
    geometry: Geometry, extents: Sequence[tuple[int, int]]
) -> dict[int, list[tuple[int, int]]]:
    """The blocks the ranges cover only in part: block -> the byte ranges covered in it."""
    touched: dict[int, list[tuple[int, int]]] = {}
    for offset, length in extents:
        end = offset + length
        first, stop = geometry.block_range(offset, end)
        for block in {first, stop - 1}:
            lo, hi = geometry.byte_range((block, block + 1))
            touched.setdefault(block, []).append((max(lo, offset), min(hi, end)))
    partial: dict[int, list[tuple[int, int]]] = {}
    for block, pieces in touched.items():
        lo, hi = geometry.byte_range((block, block + 1))
        position = lo
        for start, end in sorted(pieces):
            if start > position:
                break
            position = max(position, end)
        if position < hi:
            partial[block] = sorted(pieces)
    return partial


def fill_partial_blocks(
    layers: list[Layer], geometry: Geometry, fd: int, extents: Sequence[tuple[int, int]]
) -> int:
    """Make every block the ranges touch whole in the staged file ``fd``: the bytes of a
    partly covered block outside the ranges come from ``layers`` (the disk before the
    link), so the block reads right once the file owns it. Repeating it changes nothing.
    Returns the number of blocks filled."""
    partial = _partial_blocks(geometry, extents)
    for block, pieces in partial.items():
        lo, hi = geometry.byte_range((block, block + 1))
        below = bytearray(read_pieces(plan_read(layers, geometry, lo, hi)))
        for start, end in pieces:  # the staged bytes win where the ranges cover the block
            below[start - lo : end - lo] = sparse.read_exact(fd, start, end - start)
        sparse.write_all(fd, lo, below)
    return len(partial)


def link_staged(
    directory: Path,
    staged: Path,
    number: int,
    geometry: Geometry,
    below: list[Layer],
    extents: Sequence[tuple[int, int]],
    files: OpenFiles,
) -> Layer:
    """Layer ``number`` made of ``staged`` (not named by the manifest yet): filled, durable,
    hard-linked under the layer's name beside its bitmap, and opened. Files of an earlier
    attempt under that name are replaced; the staged name is left to the caller."""
    fd = os.open(staged, os.O_RDWR | os.O_CLOEXEC)
    try:
        if os.fstat(fd).st_size != geometry.size:
            raise DiskCorrupt(staged, f"staged file is not {geometry.size} bytes long")
        fill_partial_blocks(below, geometry, fd, extents)
        os.fdatasync(fd)  # the data is durable before the bitmap that points at it
    finally:
        os.close(fd)
    data_path = directory / data_file_name(number)
    data_path.unlink(missing_ok=True)
    os.link(staged, data_path)
    blocks = Bitmap(geometry.blocks)
    for run in covered_runs(geometry, extents):
        blocks.set_range(*run)
    # Its save fsyncs the directory: the hard link is durable with it.
    bitmap.save(
        directory / bitmap_file_name(number), blocks.to_bytes(), blocks.nbits, geometry.granularity
    )
    layer_fd = os.open(data_path, os.O_RDWR | os.O_CLOEXEC)
    files.fds.add(layer_fd)
    return Layer(directory, number, layer_fd, blocks)
