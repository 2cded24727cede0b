"""Realistic content for a new lab disk: about half allocated, the rest left as holes.

The layout is drawn from a seeded PRNG, so the same seed gives the same
bytes: runs of allocated 1 MiB chunks alternate with runs of holes, the way
a used file system looks. Each allocated chunk is random (incompressible,
like media or encrypted files), text-like (compressible logs) or all zero
(allocated but zero, like a preallocated file, which the transfer engine
must detect). A quarter of the runs start or end part-way into a chunk.

Bytes are generated in a worker thread and written in large requests, so a
4 GiB disk fills in seconds and the event loop stays free.
"""

from __future__ import annotations

import asyncio
import itertools
import random
from dataclasses import dataclass
from enum import StrEnum

from appliance.storage.backend import Backend

CHUNK_SIZE = 1024 * 1024
WRITE_SIZE = 8 * CHUNK_SIZE
PARTIAL_ALIGNMENT = 4096
MEAN_RUN_CHUNKS = 12

_TEXT_POOL_SIZE = CHUNK_SIZE
_WORDS = (
    "GET POST PUT DELETE /api/v1/vms /api/v1/disks /healthz /metrics user session token "
    "cache miss hit flush commit rollback snapshot replica primary backup index query "
    "timeout retry connected closed accepted rejected started stopped ok warning error"
).split()
_SERVICES = ("nginx", "postgres", "sshd", "kernel", "systemd", "cron", "app", "redis")
_LEVELS = ("INFO", "INFO", "INFO", "DEBUG", "WARN", "ERROR")


class ContentKind(StrEnum):
    RANDOM = "random"
    TEXT = "text"
    ZERO = "zero"


_KIND_WEIGHTS = {ContentKind.RANDOM: 45, ContentKind.TEXT: 40, ContentKind.ZERO: 15}


@dataclass(frozen=True, slots=True)
class ContentPiece:
    """``length`` bytes of one kind at ``offset``, written as one request or a few."""

    offset: int
    length: int
    kind: ContentKind

    @property
    def end(self) -> int:
        return self.offset + self.length


@dataclass(frozen=True, slots=True)
class ContentSummary:
    size: int
    allocated_bytes: int
    data_bytes: int  # allocated and not all zero
    zero_bytes: int  # allocated, all zero
    random_bytes: int
    text_bytes: int
    pieces: int

    @property
    def hole_bytes(self) -> int:
        return self.size - self.allocated_bytes


def _run_lengths(rng: random.Random, total: int) -> list[int]:
    """Split ``total`` chunks into runs of about MEAN_RUN_CHUNKS."""
    runs: list[int] = []
    while total > 0:
        length = min(total, 1 + int(rng.expovariate(1 / (MEAN_RUN_CHUNKS - 1))))
        runs.append(length)
        total -= length
    return runs


def _gaps(rng: random.Random, total: int, count: int) -> list[int]:
    """Split ``total`` hole chunks into ``count`` gaps (some empty) at random cut points."""
    cuts = sorted(rng.randint(0, total) for _ in range(count - 1))
    edges = [0, *cuts, total]
    return [b - a for a, b in itertools.pairwise(edges)]


def _chunk_pieces(rng: random.Random, start: int, end: int) -> list[ContentPiece]:
    """One piece per chunk of ``[start, end)``, each of a random kind; same kinds joined."""
    kinds = list(_KIND_WEIGHTS)
    weights = list(_KIND_WEIGHTS.values())
    pieces: list[ContentPiece] = []
    position = start
    while position < end:
        piece_end = min(end, (position // CHUNK_SIZE + 1) * CHUNK_SIZE)
        kind = rng.choices(kinds, weights)[0]
        last = pieces[-1] if pieces else None
        if last is not None and last.kind is kind:
            pieces[-1] = ContentPiece(last.offset, piece_end - last.offset, kind)
        else:
            pieces.append(ContentPiece(position, piece_end - position, kind))
        position = piece_end
    return pieces


def plan_content(size: int, *, seed: int, allocated_ratio: float = 0.5) -> list[ContentPiece]:
    """Where each kind of content goes on a disk of ``size`` bytes, in offset order."""
    if not 0.0 <= allocated_ratio <= 1.0:
        raise ValueError(f"allocated_ratio {allocated_ratio} is not between 0 and 1")
    rng = random.Random(f"ferry-content-layout:{seed}")
    chunks = -(-size // CHUNK_SIZE)
    allocated = round(chunks * allocated_ratio)
    runs = _run_lengths(rng, allocated)
    gaps = _gaps(rng, chunks - allocated, len(runs) + 1)
    pieces: list[ContentPiece] = []
    chunk = gaps[0]
    for run, gap in zip(runs, gaps[1:], strict=True):
        start, end = chunk * CHUNK_SIZE, min((chunk + run) * CHUNK_SIZE, size)
        if rng.random() < 0.25:  # a run that starts or ends part-way into a chunk
            cut = rng.randrange(1, CHUNK_SIZE // PARTIAL_ALIGNMENT) * PARTIAL_ALIGNMENT
            if rng.random() < 0.5:
                start = min(start + cut, end - 1)
            else:
                end = max(end - cut, start + 1)
        pieces.extend(_chunk_pieces(rng, start, end))
        chunk += run + gap
    return pieces


def text_pool(seed: int) -> bytes:
    """About a chunk of log-like lines: compressible, but not trivially so."""
    rng = random.Random(f"ferry-content-text:{seed}")
    lines: list[str] = []
    size = 0
    second = 1_767_225_600  # 2026-01-01, only a label
    while size < _TEXT_POOL_SIZE:
        second += rng.randrange(3)
        words = " ".join(rng.choices(_WORDS, k=rng.randrange(3, 12)))
        line = (
            f"{second} host-{rng.randrange(40):02d} {rng.choice(_SERVICES)}"
            f"[{rng.randrange(1, 65536)}]: {rng.choice(_LEVELS)} {words} "
            f"id={rng.getrandbits(32):08x} took={rng.randrange(2000)}ms\n"
        )
        lines.append(line)
        size += len(line)
    return "".join(lines).encode()[:_TEXT_POOL_SIZE]


class _ContentSource:
    """Bytes of each kind, drawn from seeded streams in offset order."""

    def __init__(self, seed: int) -> None:
        self._random = random.Random(f"ferry-content-bytes:{seed}")
        self._pool = text_pool(seed) * 2  # doubled, so any rotation is one slice

    def make(self, kind: ContentKind, length: int) -> bytes:
        if kind is ContentKind.RANDOM:
            return self._random.randbytes(length)
        if kind is ContentKind.ZERO:
            return bytes(length)
        parts = []
        while length > 0:
            start = self._random.randrange(_TEXT_POOL_SIZE)
            part = self._pool[start : start + min(length, _TEXT_POOL_SIZE)]
            parts.append(part)
            length -= len(part)
        return b"".join(parts)


def summarize(size: int, pieces: list[ContentPiece]) -> ContentSummary:
    by_kind = dict.fromkeys(ContentKind, 0)
    for piece in pieces:
        by_kind[piece.kind] += piece.length
    allocated = sum(by_kind.values())
    return ContentSummary(
        size=size,
        allocated_bytes=allocated,
        data_bytes=allocated - by_kind[ContentKind.ZERO],
        zero_bytes=by_kind[ContentKind.ZERO],
        random_bytes=by_kind[ContentKind.RANDOM],
        text_bytes=by_kind[ContentKind.TEXT],
        pieces=len(pieces),
    )


def _requests(pieces: list[ContentPiece]) -> list[tuple[int, int, ContentKind]]:
    """``(offset, length, kind)`` write requests of at most WRITE_SIZE bytes."""
    requests = []
    for piece in pieces:
        for position in range(piece.offset, piece.end, WRITE_SIZE):
            requests.append((position, min(WRITE_SIZE, piece.end - position), piece.kind))
    return requests


async def fill_disk(
    backend: Backend, *, seed: int, allocated_ratio: float = 0.5, flush: bool = True
) -> ContentSummary:
    """Write realistic content into a new (all-hole) disk; same seed, same bytes.

    Zero chunks are written as zero bytes, so they are allocated, as a guest
    would leave them; everything else stays a hole. The next request's bytes
    are generated while the current one is written.
    """
    pieces = plan_content(backend.size, seed=seed, allocated_ratio=allocated_ratio)
    source = _ContentSource(seed)
    requests = _requests(pieces)
    upcoming: asyncio.Future[bytes] | None = None
    try:
        for index, (offset, length, kind) in enumerate(requests):
            data = await (upcoming or asyncio.to_thread(source.make, kind, length))
            upcoming = None
            if index + 1 < len(requests):
                _, next_length, next_kind = requests[index + 1]
                upcoming = asyncio.ensure_future(
                    asyncio.to_thread(source.make, next_kind, next_length)
                )
            await backend.write(offset, data)
    finally:
        if upcoming is not None:
            upcoming.cancel()
    if flush:
        await backend.flush()
    return summarize(backend.size, pieces)
