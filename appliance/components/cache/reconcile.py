"""Reconcile passes: what the guest wrote in the cloud, applied over the bulk copy in the volume.

A warm migration bulk-copies the migrate-time snapshot into the cloud volume
while the VM runs over the cache (DESIGN.md §5, §6). Each pass then copies,
from the cache's view of the disk to the volume, every chunk written since the
previous pass's *mark* (the first pass: every chunk written since the migration
began), until what is left is small; the cutover's last pass runs with the VM
powered off. Chunks never written equal the snapshot, which the bulk copy put
in the volume already: no pass copies them.

A mark is an epoch cut: writes acknowledged before it are in epochs up to
``mark``, later ones in later epochs, and a chunk's first write after a cut
always maps it afresh (copy on write), so "written since mark M" is the union
of the chunk sets of the epochs after M. The store knows the sets of the epochs
not yet committed (``held``, and the open epoch's dirty chunks); the sets of
committed ones are kept here, each written durably *before* its commit is
recorded (``CacheDisk.before_commit``), for every epoch after the last mark.

    reconciler = await Reconciler.open(disk)          # at open, before shipping starts
    result = await reconciler.run_pass(2, target, workers=4)
    result.remainder_bytes                            # what pass 3 would copy now

Files, in the disk's cache directory (a new migration starts without them)::

    reconcile/state.json           {"pass", "mark", "since", "done", "result"}
    reconcile/pass.chunks          the chunks of the pass under way
    reconcile/epoch-<N>.chunks     the chunks of committed epoch N (N > the last mark)

A ``.chunks`` file is ``b"FRYRCN1\\n"``, then u64 chunk indexes (big-endian,
ascending), then the crc32 of those; each is replaced atomically. A pass that
finds an epoch's set missing (its record failed) copies every chunk written
since the migration began instead: more than needed, never less.

A pass is idempotent by its number: the same number again answers the same
result without copying; a restart in the middle of pass k copies pass k's
chunks again (with what was written since, in the pass after), and nothing
of the marks is lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import struct
import time
import zlib
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import structlog

from appliance.components.cache.disk import CacheDisk
from appliance.components.cache.image import CacheImage
from appliance.datapath.nbd.backend import NbdBackend
from appliance.datapath.nbd.channel import NbdAddress
from appliance.datapath.progress import TransferProgress
from appliance.datapath.throttle import TokenBucket
from appliance.datapath.transfer import Transfer, TransferOptions
from appliance.errors import DiskCorrupt, OrderConflict
from appliance.storage.backend import Backend
from appliance.storage.bitmap import write_atomically
from appliance.storage.extents import Extent, merge
from appliance.storage.file import FileBackend

log = structlog.get_logger(__name__)

DIRECTORY = "reconcile"
MAGIC = b"FRYRCN1\n"
DEFAULT_WORKERS = 4
_CRC = struct.Struct(">I")


@dataclass(frozen=True, slots=True)
class VolumeTarget:
    """Where passes write: a volume's NBD export (``address``, ``export``) or a raw file
    on this host (``path``), as the cloud site gives it."""

    address: NbdAddress | None = None
    export: str = ""
    path: Path | None = None

    def __post_init__(self) -> None:
        if (self.address is None) == (self.path is None):
            raise ValueError("a volume is an NBD address and export, or a path: one of them")

    async def connect(self) -> Backend:
        if self.address is not None:
            return await NbdBackend.connect(self.address, self.export, name=f"volume:{self}")
        assert self.path is not None
        return await asyncio.to_thread(FileBackend.open, self.path)

    def __str__(self) -> str:
        if self.address is not None:
            return f"{self.address}/{self.export}"
        return str(self.path)


@dataclass(frozen=True, slots=True)
class PassResult:
    """What one pass did, and what the next would do."""

    pass_no: int
    mark: int
    """The epoch cut that marks this pass: writes after it are the next pass's."""
    chunks: int
    bytes: int
    """Bytes of the chunks copied (whole chunks, the disk's last one clipped)."""
    bytes_written: int
    """Data bytes sent to the volume (all-zero chunks go as zero requests)."""
    fetched_bytes: int
    """Bytes read from on-prem: written chunks committed and evicted from the cache since."""
    remainder_chunks: int
    remainder_bytes: int
    """Written since ``mark`` when the pass ended: what the next pass would copy."""
    redone: bool
    """The pass was started before (a restart or a failure) and copied again."""
    seconds: float

    def as_result(self) -> dict[str, int | float | bool]:
        fields = asdict(self)
        fields["pass"] = fields.pop("pass_no")
        return fields

    @classmethod
    def from_result(cls, raw: dict[str, object]) -> PassResult:
        values = dict(raw)
        values["pass_no"] = values.pop("pass")
        return cls(**values)  # type: ignore[arg-type]


@dataclass(frozen=True, slots=True)
class _State:
    pass_no: int
    mark: int
    since: int | None
    """The previous pass's mark; None: the pass copies everything written since the
    migration began."""
    done: bool
    result: PassResult | None = None

    def to_json(self) -> bytes:
        result = self.result.as_result() if self.result is not None else None
        body = {
            "pass": self.pass_no,
            "mark": self.mark,
            "since": self.since,
            "done": self.done,
            "result": result,
        }
        return json.dumps(body, sort_keys=True).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> _State:
        body = json.loads(raw)
        result = body["result"]
        return cls(
            int(body["pass"]),
            int(body["mark"]),
            None if body["since"] is None else int(body["since"]),
            bool(body["done"]),
            PassResult.from_result(result) if result is not None else None,
        )


def encode_chunks(chunks: Iterable[int]) -> bytes:
    ordered = sorted(chunks)
    body = struct.pack(f">{len(ordered)}Q", *ordered)
    return MAGIC + body + _CRC.pack(zlib.crc32(body))


def decode_chunks(path: Path, data: bytes) -> set[int]:
    body = data[len(MAGIC) : -_CRC.size]
    if not data.startswith(MAGIC) or len(data) < len(MAGIC) + _CRC.size or len(body) % 8:
        raise DiskCorrupt(path, "not a chunk list")
    if _CRC.unpack(data[-_CRC.size :])[0] != zlib.crc32(body):
        raise DiskCorrupt(path, "chunk list fails its checksum")
    return set(struct.unpack(f">{len(body) // 8}Q", body))


class _Files:
    """The reconcile directory of one disk (blocking calls: run them in a thread)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def epoch(self, epoch: int) -> Path:
        return self.directory / f"epoch-{epoch}.chunks"

    @property
    def pass_chunks(self) -> Path:
        return self.directory / "pass.chunks"

    @property
    def state(self) -> Path:
        return self.directory / "state.json"

    def load_state(self) -> _State | None:
        try:
            raw = self.state.read_bytes()
        except FileNotFoundError:
            return None
        try:
            return _State.from_json(raw)
        except (ValueError, KeyError, TypeError) as error:
            raise DiskCorrupt(self.state, f"unreadable reconcile state: {error}") from None

    def save_state(self, state: _State) -> None:
        write_atomically(self.state, state.to_json())

    def save_chunks(self, path: Path, chunks: Iterable[int]) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        write_atomically(path, encode_chunks(chunks))

    def load_chunks(self, path: Path) -> set[int] | None:
        try:
            return decode_chunks(path, path.read_bytes())
        except FileNotFoundError:
            return None

    def load_epochs(self, epochs: Iterable[int]) -> dict[int, set[int] | None]:
        return {epoch: self.load_chunks(self.epoch(epoch)) for epoch in epochs}

    def prune(self, through: int) -> None:
        """Drop the sets of epochs up to ``through`` (a mark past them is durable)."""
        for path in self.directory.glob("epoch-*.chunks"):
            with contextlib.suppress(ValueError, FileNotFoundError):
                if int(path.name.removeprefix("epoch-").removesuffix(".chunks")) <= through:
                    path.unlink()


class Reconciler:
    """Reconcile passes of one cached disk; one pass at a time."""

    def __init__(self, disk: CacheDisk, files: _Files, state: _State | None) -> None:
        self._disk = disk
        self._files = files
        self._state = state
        self._record_after: int | None = state.mark if state is not None else None
        """Committed epochs after this one have their chunk sets recorded (None: none)."""
        self._lock = asyncio.Lock()
        self.progress: TransferProgress | None = None
        """The pass under way: its latest progress (every second); None between passes."""

    @classmethod
    async def open(cls, disk: CacheDisk) -> Reconciler:
        """Load the disk's reconcile state and start recording commits (before shipping)."""
        files = _Files(disk.store.directory / DIRECTORY)
        state = await asyncio.to_thread(files.load_state)
        reconciler = cls(disk, files, state)
        disk.before_commit = reconciler.epoch_committing
        return reconciler

    @property
    def last_pass(self) -> int:
        return self._state.pass_no if self._state is not None else 0

    async def epoch_committing(self, epoch: int) -> None:
        """Keep the chunk set of ``epoch`` before its commit forgets it (the store's hook).

        A failure is logged, not raised: the epoch then lacks its set, and the pass
        that needs it copies every chunk written since the migration began.
        """
        if self._record_after is None or epoch <= self._record_after:
            return
        chunks = set(self._disk.store.held.get(epoch, {}))
        try:
            await asyncio.to_thread(self._files.save_chunks, self._files.epoch(epoch), chunks)
        except Exception as error:  # never stop the shipper: a pass copies more instead
            log.error("epoch's chunks not kept for reconcile", epoch=epoch, error=repr(error))

    async def run_pass(
        self, pass_no: int, target: VolumeTarget, *, workers: int = DEFAULT_WORKERS
    ) -> PassResult:
        """Copy what pass ``pass_no`` covers to ``target``; the same number again is one pass."""
        async with self._lock:
            state = self._state
            if state is not None and pass_no < state.pass_no:
                reason = f"reconcile pass {pass_no} is behind pass {state.pass_no}"
                raise OrderConflict(self._disk.name, reason)
            if state is not None and pass_no == state.pass_no and state.done:
                assert state.result is not None
                return state.result  # that pass was made
            if state is not None and pass_no == state.pass_no:
                chunks = await asyncio.to_thread(self._files.load_chunks, self._files.pass_chunks)
                if chunks is None:
                    raise DiskCorrupt(self._files.pass_chunks, f"pass {pass_no}'s chunks missing")
                return await self._copy(state, chunks, target, workers, redone=True)
            state, chunks = await self._begin(pass_no)
            return await self._copy(state, chunks, target, workers, redone=False)

    async def _begin(self, pass_no: int) -> tuple[_State, set[int]]:
        """Cut the pass's mark and make the pass durable: its mark and its chunks."""
        previous = self._state
        store = self._disk.store
        if self._record_after is None:
            self._record_after = store.open_epoch - 1  # every epoch from the mark's on
        mark = await self._disk.cut_epoch()
        if previous is None:
            chunks = set(store.written_chunks())
        else:
            chunks = await self._written_after(previous.mark, through=mark)
            if not previous.done:  # an unfinished pass: its chunks are this one's too
                left = await asyncio.to_thread(self._files.load_chunks, self._files.pass_chunks)
                chunks |= left if left is not None else set(store.written_chunks())
        since = previous.mark if previous is not None else None
        state = _State(pass_no, mark, since, done=False)
        await asyncio.to_thread(self._files.save_chunks, self._files.pass_chunks, chunks)
        await asyncio.to_thread(self._files.save_state, state)
        self._state = state
        self._record_after = mark
        await asyncio.to_thread(self._files.prune, mark)
        log.info("reconcile pass begins", disk=self._disk.name, pass_no=pass_no, mark=mark)
        return state, chunks

    async def _written_after(self, mark: int, *, through: int | None = None) -> set[int]:
        """Chunks written in the epochs after ``mark`` (through ``through``, else through the
        open epoch, its dirty chunks included); every chunk written when a set is missing."""
        store = self._disk.store
        last = through if through is not None else store.open_epoch - 1
        chunks: set[int] = set()
        recorded: list[int] = []
        for epoch in range(mark + 1, last + 1):  # no await: held and live stay as they are
            held = store.held.get(epoch)
            if held is not None:
                chunks.update(held)
            else:
                recorded.append(epoch)
        if through is None:
            opened = store.open_epoch
            chunks.update(c for c, entry in store.live.items() if entry.epoch == opened)
        # Epochs not held then were committed before: their sets were written first.
        loaded = await asyncio.to_thread(self._files.load_epochs, recorded)
        for epoch, found in sorted(loaded.items()):
            if found is None:
                log.warning("an epoch's chunks are unknown: all written chunks", epoch=epoch)
                return set(store.written_chunks())
            chunks |= found
        return chunks

    async def _copy(
        self, state: _State, chunks: set[int], target: VolumeTarget, workers: int, *, redone: bool
    ) -> PassResult:
        started = time.monotonic()
        extents = self._extents(chunks)
        image = CacheImage(self._disk)
        volume = await target.connect()
        try:
            if volume.size != self._disk.size:
                reason = f"volume {target} is {volume.size} bytes, the disk {self._disk.size}"
                raise OrderConflict(self._disk.name, reason)
            transfer = Transfer(
                f"{self._disk.name}/reconcile-{state.pass_no}",
                image,
                volume,
                extents=extents,
                options=TransferOptions(
                    chunk_size=self._disk.store.geometry.chunk_size,
                    workers=workers,
                    whole_image_check=False,
                ),
                bandwidth=TokenBucket(),  # cloud-local: not the WAN link's cap
                progress=self._progressed,
            )
            copied = await transfer.run()
        finally:
            self.progress = None
            await volume.close()
        remainder = await self._written_after(state.mark)
        result = PassResult(
            pass_no=state.pass_no,
            mark=state.mark,
            chunks=len(chunks),
            bytes=sum(extent.length for extent in extents),
            bytes_written=copied.stats.bytes_written,
            fetched_bytes=image.fetched_bytes,
            remainder_chunks=len(remainder),
            remainder_bytes=sum(extent.length for extent in self._extents(remainder)),
            redone=redone,
            seconds=round(time.monotonic() - started, 6),
        )
        done = _State(state.pass_no, state.mark, state.since, done=True, result=result)
        await asyncio.to_thread(self._files.save_state, done)
        self._state = done
        log.info("reconcile pass done", disk=self._disk.name, **result.as_result())
        return result

    def _progressed(self, progress: TransferProgress) -> None:
        self.progress = progress

    def _extents(self, chunks: Iterable[int]) -> list[Extent]:
        size, chunk_size = self._disk.size, self._disk.store.geometry.chunk_size
        return merge(
            Extent(c * chunk_size, min(chunk_size, size - c * chunk_size)) for c in sorted(chunks)
        )
