"""An epoch's manifest: what the sender says the epoch holds, and its whole-epoch digest.

Entries are ``(offset, length, hash)``: ``hash`` is the xxh3-128
``chunk_hash`` of the epoch's bytes in that range (a range the epoch
zeroes hashes like that many zero bytes). Entries are sorted, do not
overlap and lie inside the disk. The whole-epoch digest is the xxh3-128 of
the entries, each packed as ``offset:u64 length:u64 hash:16`` big-endian
and concatenated in order (:func:`epoch_digest`), so one value names the
whole epoch: a replayed commit is recognised by it.

Binary form (in the journal's commit record): ``count:u32 digest:16``
then the packed entries.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from dataclasses import dataclass

import xxhash

from appliance.storage.hashing import DIGEST_SIZE

_ENTRY = struct.Struct(">QQ16s")
_HEAD = struct.Struct(">I16s")


@dataclass(frozen=True, slots=True)
class ManifestEntry:
    offset: int
    length: int
    hash: bytes

    def __post_init__(self) -> None:
        if self.offset < 0 or self.length <= 0 or len(self.hash) != DIGEST_SIZE:
            raise ValueError(f"bad manifest entry {self.offset}+{self.length}")

    @property
    def end(self) -> int:
        return self.offset + self.length


def epoch_digest(entries: Iterable[ManifestEntry]) -> bytes:
    """The whole-epoch digest of ``entries`` (in the order given)."""
    hasher = xxhash.xxh3_128()
    for entry in entries:
        hasher.update(_ENTRY.pack(entry.offset, entry.length, entry.hash))
    digest: bytes = hasher.digest()
    return digest


@dataclass(frozen=True, slots=True)
class EpochManifest:
    entries: tuple[ManifestEntry, ...]
    digest: bytes

    @classmethod
    def build(cls, entries: Iterable[ManifestEntry]) -> EpochManifest:
        ordered = tuple(sorted(entries, key=lambda entry: entry.offset))
        return cls(ordered, epoch_digest(ordered))

    @property
    def data_bytes(self) -> int:
        return sum(entry.length for entry in self.entries)

    def problem(self, size: int) -> str | None:
        """Why this manifest cannot describe an epoch of a ``size``-byte disk, or None."""
        end = 0
        for entry in self.entries:
            if entry.offset < end:
                return f"entry at {entry.offset} overlaps or precedes offset {end}"
            if entry.end > size:
                return f"entry {entry.offset}+{entry.length} is outside the {size}-byte disk"
            end = entry.end
        if epoch_digest(self.entries) != self.digest:
            return "the whole-epoch digest does not match the entries"
        return None


def encode_manifest(manifest: EpochManifest) -> bytes:
    parts = [_HEAD.pack(len(manifest.entries), manifest.digest)]
    parts.extend(_ENTRY.pack(e.offset, e.length, e.hash) for e in manifest.entries)
    return b"".join(parts)


def decode_manifest(data: bytes) -> EpochManifest:
    """The manifest packed by :func:`encode_manifest`; ValueError if it is malformed."""
    if len(data) < _HEAD.size:
        raise ValueError("manifest shorter than its header")
    count, digest = _HEAD.unpack_from(data)
    if len(data) != _HEAD.size + count * _ENTRY.size:
        raise ValueError(f"manifest of {len(data)} bytes cannot hold {count} entries")
    entries = tuple(
        ManifestEntry(offset, length, hash_)
        for offset, length, hash_ in _ENTRY.iter_unpack(memoryview(data)[_HEAD.size :])
    )
    return EpochManifest(entries, digest)
