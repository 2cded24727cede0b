"""The package manifest: what an offline bulk package holds, and its own hash.

A package is one ``manifest.json`` and one object per data chunk. The
manifest is the only thing that says what the chunks mean, so it is checked
as a whole against the SHA-256 the appliance kept when it exported it
(:func:`manifest_sha256`), and parsed strictly (:class:`Manifest`): chunks
lie on the chunk grid, data chunks and zero ranges cover each disk exactly
once, and every object name is the canonical one for its disk, offset and
hash (:func:`object_name`), so a name read from a package can never point
outside it.

The bytes are deterministic (sorted keys, no timestamps): an export resumed
after an interruption writes the same manifest, with the same hash.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Literal, Self

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from appliance.datapath.chunks import ChunkTable
from appliance.datapath.imagecheck import image_digest
from appliance.storage.hashing import DIGEST_SIZE, zero_hash

FORMAT: Literal["ferry-package"] = "ferry-package"
VERSION: Literal[1] = 1
MANIFEST_NAME = "manifest.json"
DISK_ID = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
_HEX_DIGEST = rf"^[0-9a-f]{{{2 * DIGEST_SIZE}}}$"
_DISK_ID = re.compile(DISK_ID)


def object_name(disk_id: str, offset: int, digest_hex: str) -> str:
    """The object that holds the data chunk of ``disk_id`` at ``offset`` with that hash."""
    return f"{disk_id}/{offset:016x}-{digest_hex}.chunk"


def check_disk_id(disk_id: str) -> str:
    """``disk_id`` when it is safe as a path component, else ValueError (names are data)."""
    if not _DISK_ID.fullmatch(disk_id) or disk_id in (".", ".."):
        raise ValueError(f"disk id {disk_id!r} cannot name a package directory")
    return disk_id


class _Strict(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)


class ChunkEntry(_Strict):
    """One stored data chunk: ``length`` bytes at ``offset`` whose chunk_hash is ``hash``."""

    offset: int = Field(ge=0)
    length: int = Field(gt=0)
    hash: str = Field(pattern=_HEX_DIGEST)
    object: str


class ZeroRange(_Strict):
    """Whole chunks that read as zeroes at the source (holes or zeroes): nothing stored."""

    offset: int = Field(ge=0)
    length: int = Field(gt=0)


class DiskEntry(_Strict):
    disk_id: str = Field(pattern=DISK_ID)
    size: int = Field(ge=0)
    chunk_size: int = Field(gt=0)
    image_digest: str = Field(pattern=_HEX_DIGEST)
    """Hash of every chunk's hash in order (zero chunks included): the whole-image check."""
    chunks: tuple[ChunkEntry, ...]
    zero: tuple[ZeroRange, ...]

    @model_validator(mode="after")
    def _covers_disk_once(self) -> Self:
        pieces = sorted(
            [(c.offset, c.length, c) for c in self.chunks]
            + [(z.offset, z.length, None) for z in self.zero],
            key=lambda piece: piece[0],
        )
        position = 0
        for offset, length, chunk in pieces:
            if offset != position or offset % self.chunk_size:
                raise ValueError(f"disk {self.disk_id}: a gap or overlap at offset {position}")
            if chunk is not None:
                if length != min(self.chunk_size, self.size - offset):
                    raise ValueError(f"disk {self.disk_id}: chunk at {offset} is {length} bytes")
                if chunk.object != object_name(self.disk_id, offset, chunk.hash):
                    raise ValueError(f"disk {self.disk_id}: object name {chunk.object!r}")
            elif (offset + length) % self.chunk_size and offset + length != self.size:
                raise ValueError(f"disk {self.disk_id}: zero range at {offset} ends off the grid")
            position = offset + length
        if position != self.size:
            raise ValueError(f"disk {self.disk_id}: covered to {position} of {self.size} bytes")
        if list(self.chunks) != sorted(self.chunks, key=lambda chunk: chunk.offset):
            raise ValueError(f"disk {self.disk_id}: chunks out of order")
        return self

    @property
    def data_bytes(self) -> int:
        return sum(chunk.length for chunk in self.chunks)

    def table(self) -> ChunkTable:
        """The hash of every chunk, as the whole-image check compares them."""
        table = ChunkTable(self.size, self.chunk_size)
        for zero in self.zero:
            first = zero.offset // self.chunk_size
            for index in range(first, -(-(zero.offset + zero.length) // self.chunk_size)):
                table.set(index, zero_hash(table.bounds(index)[1]))
        for chunk in self.chunks:
            table.set(chunk.offset // self.chunk_size, bytes.fromhex(chunk.hash))
        return table


class Manifest(_Strict):
    format: Literal["ferry-package"] = FORMAT
    version: Literal[1] = VERSION
    migration_id: str = Field(min_length=1, max_length=200)
    hash: Literal["xxh3-128"] = "xxh3-128"
    disks: tuple[DiskEntry, ...]

    @model_validator(mode="after")
    def _unique_disks(self) -> Self:
        ids = [disk.disk_id for disk in self.disks]
        if len(set(ids)) != len(ids):
            raise ValueError(f"disk ids repeat: {ids}")
        return self

    def disk(self, disk_id: str) -> DiskEntry:
        return next(disk for disk in self.disks if disk.disk_id == disk_id)

    @property
    def data_bytes(self) -> int:
        return sum(disk.data_bytes for disk in self.disks)


def digest_of(table: ChunkTable) -> str:
    """The whole-image digest of a complete table, in hex."""
    return image_digest(table).hex()


def encode(manifest: Manifest) -> bytes:
    """The manifest's bytes: deterministic, one object per line for whoever reads it."""
    document = manifest.model_dump(mode="json")
    return json.dumps(document, sort_keys=True, indent=1).encode() + b"\n"


def manifest_sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def decode(data: bytes) -> Manifest:
    """Parse and check a manifest; ValueError says what is wrong with it."""
    try:
        return Manifest.model_validate_json(data, strict=False)
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        raise ValueError(f"invalid manifest at {where or 'top'}: {first['msg']}") from None
