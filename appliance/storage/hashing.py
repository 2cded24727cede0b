"""The chunk hash: xxh3-128, fast enough to hash every chunk at memory speed.

Both ends of a transfer hash the same bytes the same way, so a receiver can
check a chunk without sending it back. A range that reads as zeroes (a hole)
hashes like the same number of zero bytes; ``zero_hash`` caches those.
"""

from __future__ import annotations

import functools

import xxhash

HASH_NAME = "xxh3-128"
DIGEST_SIZE = 16

_ZERO_BLOCK = bytes(1024 * 1024)


def chunk_hash(data: bytes | bytearray | memoryview) -> bytes:
    """The 16-byte xxh3-128 digest of ``data``."""
    digest: bytes = xxhash.xxh3_128_digest(data)
    return digest


@functools.lru_cache(maxsize=64)
def zero_hash(length: int) -> bytes:
    """The digest of ``length`` zero bytes, computed without allocating them all."""
    if length < 0:
        raise ValueError(f"negative length {length}")
    if length <= len(_ZERO_BLOCK):
        return chunk_hash(memoryview(_ZERO_BLOCK)[:length])
    hasher = xxhash.xxh3_128()
    whole, rest = divmod(length, len(_ZERO_BLOCK))
    for _ in range(whole):
        hasher.update(_ZERO_BLOCK)
    hasher.update(memoryview(_ZERO_BLOCK)[:rest])
    digest: bytes = hasher.digest()
    return digest
