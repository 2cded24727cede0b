"""A disk's epoch journal: an append-only file of checksummed commit and applied records.

Record layout (big-endian)::

    length:u32  kind:u8  epoch:u64  token:u64  payload[length]  check:16

``check`` is the xxh3-128 of every byte before it in the record. ``kind`` 1
is a *commit* (payload: the epoch's manifest, see ``manifest``), 2 an
*applied* record (payload: the epoch's 16-byte digest). Every append is
fsynced before the caller goes on, so the records reach the disk in order.

The records must read ``commit 1, applied 1, commit 2, applied 2, ...``: at
most one epoch is committed and not yet applied, always the last one. A
crash during an append can only tear the last record: a record that is
short or fails its check *at the end of the file* is a torn tail, ignored
on read and cut off before the next append. Anything else (a bad record
with more after it, records out of sequence) is ``JournalCorrupt``.

:class:`JournalState` answers what the recovery issue needs: the last
applied epoch, the epoch committed but not yet applied (if any), and
whether the current image is a committed prefix (no such epoch pending).
"""

from __future__ import annotations

import enum
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

import xxhash

from appliance.components.onprem.manifest import EpochManifest, decode_manifest, encode_manifest
from appliance.errors import JournalCorrupt

_HEAD = struct.Struct(">IBQQ")
_CHECK = 16
MAX_PAYLOAD = 1 << 30


class RecordKind(enum.IntEnum):
    COMMIT = 1
    APPLIED = 2


@dataclass(frozen=True, slots=True)
class JournalState:
    """What a journal says; ``digests[n - 1]`` is the whole-epoch digest of epoch ``n``."""

    applied_epoch: int = 0
    pending: EpochManifest | None = None
    """The manifest of epoch ``applied_epoch + 1`` if it is committed but not applied."""
    digests: tuple[bytes, ...] = field(default=())
    length: int = 0
    """Bytes of whole, valid records (a torn tail starts here)."""

    @property
    def committed_epoch(self) -> int:
        return self.applied_epoch + (1 if self.pending is not None else 0)

    @property
    def committed_prefix(self) -> bool:
        """True when the current image is exactly snapshot + epochs 1..applied_epoch."""
        return self.pending is None

    def digest(self, epoch: int) -> bytes | None:
        return self.digests[epoch - 1] if 1 <= epoch <= len(self.digests) else None


def _record(kind: RecordKind, epoch: int, token: int, payload: bytes) -> bytes:
    body = _HEAD.pack(len(payload), kind, epoch, token) + payload
    check: bytes = xxhash.xxh3_128_digest(body)
    return body + check


def _next(state: JournalState, kind: int, epoch: int, payload: bytes) -> JournalState | str:
    """The state after one more record, or why that record cannot come next."""
    end = state.length + _HEAD.size + len(payload) + _CHECK
    if kind == RecordKind.COMMIT:
        if state.pending is not None or epoch != state.applied_epoch + 1:
            return f"commit of epoch {epoch} after epoch {state.committed_epoch}"
        try:
            manifest = decode_manifest(payload)
        except ValueError as exc:
            return f"commit of epoch {epoch}: {exc}"
        return JournalState(state.applied_epoch, manifest, (*state.digests, manifest.digest), end)
    if kind == RecordKind.APPLIED:
        if state.pending is None or epoch != state.committed_epoch:
            return f"applied record for epoch {epoch}, which is not pending"
        return JournalState(epoch, None, state.digests, end)
    return f"unknown record kind {kind}"


def parse(path: Path, data: bytes) -> JournalState:
    """The state the records in ``data`` describe (a torn tail ignored)."""
    state = JournalState()
    pos = 0
    while pos < len(data):
        if len(data) - pos < _HEAD.size:
            break  # torn head
        length, kind, epoch, _token = _HEAD.unpack_from(data, pos)
        end = pos + _HEAD.size + length + _CHECK
        if length > MAX_PAYLOAD or end > len(data):
            if length > MAX_PAYLOAD and end <= len(data):
                raise JournalCorrupt(path, pos, f"record length {length}")
            break  # torn body
        body = data[pos : end - _CHECK]
        if xxhash.xxh3_128_digest(body) != data[end - _CHECK : end]:
            if end == len(data):
                break  # torn last record
            raise JournalCorrupt(path, pos, "record checksum mismatch")
        after = _next(state, kind, epoch, body[_HEAD.size :])
        if isinstance(after, str):
            raise JournalCorrupt(path, pos, after)
        state, pos = after, end
    return state


def read_journal(path: Path) -> JournalState:
    """The state of the journal at ``path`` (blocking); an absent file is an empty journal."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return JournalState()
    return parse(path, data)


class EpochJournal:
    """One disk's journal, open for appending. Blocking: call from a worker thread."""

    def __init__(self, path: Path, fd: int, state: JournalState) -> None:
        self.path = path
        self._fd = fd
        self.state = state

    @classmethod
    def open(cls, path: Path) -> EpochJournal:
        """Open (creating) the journal and cut off a torn tail, durably."""
        state = read_journal(path)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            if os.fstat(fd).st_size != state.length:
                os.ftruncate(fd, state.length)
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            raise
        return cls(path, fd, state)

    def append_commit(self, epoch: int, token: int, manifest: EpochManifest) -> None:
        self._append(RecordKind.COMMIT, epoch, token, encode_manifest(manifest))

    def append_applied(self, epoch: int, token: int) -> None:
        digest = self.state.digest(epoch)
        if digest is None:
            raise ValueError(f"epoch {epoch} was never committed")
        self._append(RecordKind.APPLIED, epoch, token, digest)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def _append(self, kind: RecordKind, epoch: int, token: int, payload: bytes) -> None:
        after = _next(self.state, kind, epoch, payload)
        if isinstance(after, str):
            raise ValueError(after)
        record = _record(kind, epoch, token, payload)
        view = memoryview(record)
        pos = self.state.length
        while view:
            written = os.pwrite(self._fd, view, pos)
            view, pos = view[written:], pos + written
        os.fsync(self._fd)
        self.state = after
