"""The on-prem I/O manager: serves each disk in migration and commits its flush epochs.

    async with OnpremIoManager(data_dir, address=TcpAddress("127.0.0.1", 0)) as manager:
        await manager.open_disk(OnpremDiskOrder(migration_id, disk_id, token, disk_dir, snap))
        address, export = await manager.stage_export(disk_id, epoch, token)
        ...  # the sender writes the epoch there (hashed writes), then flushes
        await manager.commit_epoch(disk_id, epoch, token, manifest)

Per open disk, read-only NBD exports with block status: ``snap/<disk_id>``
(the migrate-time snapshot) and ``cur/<disk_id>`` (the current image: the
snapshot plus every committed epoch, i.e. the disk's active layer, which
nothing else writes while the VM runs in the cloud). Each epoch being sent
has a writable ``stage/<disk_id>/<epoch>`` export (see ``staging``), and is
committed by the steps in ``commit``, recorded in the disk's ``journal``.

Fencing: every order carries the owner's token. The highest token accepted
per disk is persisted (atomically, fsynced) before the order acts; an order
with a lower one raises ``StaleToken`` and changes nothing. Orders are
idempotent: the same ``open_disk`` twice, a ``stage_export`` of an epoch
already staged, a ``commit_epoch`` of an epoch already applied with the same
manifest digest, a ``close_disk`` of a closed disk are all no-ops.

Data directory::

    <data_dir>/disks/<disk_id>/token        {"token": n}: the highest accepted
    <data_dir>/disks/<disk_id>/order.json   the order the disk was last opened with
    <data_dir>/disks/<disk_id>/journal      the epoch journal (append-only)
    <data_dir>/disks/<disk_id>/stage-<N>/   epoch N's staging area (landing records)
    <disk_dir>/staged-<hex>.raw             epoch N's data, in the disk's own directory,
                                            until the commit makes it a layer of the disk

Opening a disk recovers it: an epoch committed but not applied is linked
again from its staged file, staging areas of uncommitted epochs are
discarded with their files. Orders for one disk run one at a time (a lock
per disk). After each commit (and each open) layers of the disk that no
snapshot freezes are folded together in the background.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import TracebackType
from typing import Self

import structlog

from appliance.components.onprem import durable, staging
from appliance.components.onprem.commit import CommitHook, CommitStep, apply_epoch
from appliance.components.onprem.journal import EpochJournal, JournalState
from appliance.components.onprem.manifest import EpochManifest
from appliance.components.onprem.staging import StagingBackend
from appliance.datapath.nbd import NbdAddress, NbdServer, TcpAddress
from appliance.errors import (
    DiskNotOpen,
    EpochOutOfOrder,
    EpochRejected,
    OrderConflict,
    StaleToken,
    UnsafeName,
)
from appliance.storage.layered import LayeredDisk

log = structlog.get_logger(__name__)

_SAFE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
COMPONENT = "onprem-io-manager"


def snapshot_export(disk_id: str) -> str:
    return f"snap/{disk_id}"


def current_export(disk_id: str) -> str:
    return f"cur/{disk_id}"


def staging_export(disk_id: str, epoch: int) -> str:
    return f"stage/{disk_id}/{epoch}"


@dataclass(frozen=True, slots=True)
class OnpremDiskOrder:
    """Serve ``disk_dir``'s disk for a migration; ``snapshot_id`` is its migrate-time snapshot."""

    migration_id: str
    disk_id: str
    token: int
    disk_dir: Path
    snapshot_id: str


@dataclass(frozen=True, slots=True)
class OnpremDiskStatus:
    disk_id: str
    migration_id: str
    token: int
    committed_epoch: int
    """The last epoch applied to the current image (0: none yet)."""
    staged_epochs: tuple[int, ...]
    exports: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class OnpremStatus:
    address: NbdAddress
    exports: tuple[str, ...]
    disks: tuple[OnpremDiskStatus, ...]

    @property
    def committed_epochs(self) -> dict[str, int]:
        return {disk.disk_id: disk.committed_epoch for disk in self.disks}

    @property
    def epochs_staged(self) -> dict[str, tuple[int, ...]]:
        return {disk.disk_id: disk.staged_epochs for disk in self.disks}


@dataclass(eq=False)
class _OpenDisk:
    order: OnpremDiskOrder
    root: Path
    disk: LayeredDisk
    journal: EpochJournal
    staged: dict[int, StagingBackend] = field(default_factory=dict)

    def exports(self) -> list[str]:
        names = [snapshot_export(self.order.disk_id), current_export(self.order.disk_id)]
        names += [staging_export(self.order.disk_id, epoch) for epoch in sorted(self.staged)]
        return names


class OnpremIoManager:
    def __init__(
        self,
        data_dir: Path,
        *,
        address: NbdAddress | None = None,
        commit_hook: CommitHook | None = None,
    ) -> None:
        self._data_dir = Path(data_dir)
        self._server = NbdServer(address=address or TcpAddress("127.0.0.1", 0))
        self._hook = commit_hook
        self._disks: dict[str, _OpenDisk] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._tokens: dict[str, int] = {}
        self._work: set[asyncio.Future[None]] = set()
        self._compactions: set[asyncio.Future[None]] = set()
        self.staged = staging.ByteTally()
        """Data bytes written to staging areas since the process began (all disks)."""
        self.epochs_applied = 0
        """Epochs applied to a current image since the process began (all disks)."""
        self.bytes_applied = 0
        """Their data bytes (the manifests' ``data_bytes``)."""

    @property
    def address(self) -> NbdAddress:
        return self._server.address

    @property
    def data_dir(self) -> Path:
        return self._data_dir

    def disk_root(self, disk_id: str) -> Path:
        return self._data_dir / "disks" / _checked_id(disk_id)

    def journal_path(self, disk_id: str) -> Path:
        """Where ``disk_id``'s journal lives (``journal.read_journal`` reads it offline)."""
        return self.disk_root(disk_id) / "journal"

    async def __aenter__(self) -> Self:
        await asyncio.to_thread(durable.make_dirs, self._data_dir / "disks")
        await self._server.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            await self._server.stop()
            if self._work:  # commits whose callers stopped waiting
                await asyncio.gather(*self._work, return_exceptions=True)
        finally:
            for disk_id in list(self._disks):
                await self._close(self._disks.pop(disk_id))  # stops their compactions
            if self._compactions:
                await asyncio.gather(*self._compactions, return_exceptions=True)

    # -- orders ------------------------------------------------------------------------------

    async def open_disk(self, order: OnpremDiskOrder) -> None:
        """Serve the disk's snapshot and current image, recovering its journal first."""
        async with self._ordered(order.disk_id, order.token):
            opened = self._disks.get(order.disk_id)
            if opened is not None:
                if replace(opened.order, token=order.token) != order:
                    raise OrderConflict(
                        order.disk_id, "already open for another migration, disk or snapshot"
                    )
                return
            root = self.disk_root(order.disk_id)
            record = {
                "migration_id": order.migration_id,
                "disk_id": order.disk_id,
                "disk_dir": str(order.disk_dir),
                "snapshot_id": order.snapshot_id,
            }
            await asyncio.to_thread(durable.save_json, root / "order.json", record)
            self._disks[order.disk_id] = opened = await self._open(order, root)
            snapshot = opened.disk.at(order.snapshot_id)
            self._server.add_export(snapshot_export(order.disk_id), snapshot, readonly=True)
            current = opened.disk.active()
            self._server.add_export(current_export(order.disk_id), current, readonly=True)
            log.info(
                "disk open",
                disk_id=order.disk_id,
                migration_id=order.migration_id,
                committed_epoch=opened.journal.state.applied_epoch,
            )

    async def stage_export(self, disk_id: str, epoch: int, token: int) -> tuple[NbdAddress, str]:
        """A writable export where the sender lands ``epoch``; the same one if asked again."""
        async with self._ordered(disk_id, token):
            opened = self._open_disk(disk_id)
            committed = opened.journal.state.committed_epoch
            if epoch <= committed:
                raise EpochOutOfOrder(disk_id, epoch, committed + 1)
            name = staging_export(disk_id, epoch)
            if epoch not in opened.staged:
                backend = await StagingBackend.create(
                    opened.root, epoch, opened.disk.size, opened.disk.staged_path()
                )
                backend.tally = self.staged
                opened.staged[epoch] = backend
                self._server.add_export(name, backend)
            return self._server.address, name

    async def commit_epoch(
        self, disk_id: str, epoch: int, token: int, manifest: EpochManifest
    ) -> None:
        """Check, record and apply ``epoch`` (see ``commit``); a replay is a no-op.

        The commit runs in a task of its own: a cancelled caller stops waiting,
        the commit goes on to its end (the manager waits for it when it closes).
        """
        task = asyncio.ensure_future(self._commit(disk_id, epoch, token, manifest))
        self._track(task)
        await asyncio.shield(task)

    async def _commit(self, disk_id: str, epoch: int, token: int, manifest: EpochManifest) -> None:
        async with self._ordered(disk_id, token):
            opened = self._open_disk(disk_id)
            state = opened.journal.state
            if epoch <= state.committed_epoch and state.digest(epoch) != manifest.digest:
                raise EpochRejected(disk_id, epoch, "committed before with another manifest")
            if epoch <= state.applied_epoch:
                return
            if epoch == state.committed_epoch:  # committed, not yet applied: finish it
                await self._apply(opened, epoch, token, state.pending or manifest)
                return
            if epoch != state.applied_epoch + 1:
                raise EpochOutOfOrder(disk_id, epoch, state.applied_epoch + 1)
            problem = manifest.problem(opened.disk.size)
            if problem is not None:
                raise EpochRejected(disk_id, epoch, problem)
            started = time.monotonic()
            try:
                await self._verify(opened, epoch, manifest)
                verified = time.monotonic()
                backend = opened.staged.get(epoch)
                if backend is not None:
                    await backend.durable()
                await self._step(disk_id, epoch, CommitStep.STAGING_DURABLE)
                await asyncio.to_thread(opened.journal.append_commit, epoch, token, manifest)
            except BaseException:
                if opened.journal.state.committed_epoch < epoch:
                    self._reopen_staging(opened, epoch)  # not committed: the sender may retry
                raise
            recorded = time.monotonic()
            await self._step(disk_id, epoch, CommitStep.COMMIT_RECORDED)
            await self._apply(opened, epoch, token, manifest)
            log.info(
                "epoch commit timed",
                disk_id=disk_id,
                epoch=epoch,
                verify_s=round(verified - started, 3),
                durable_and_record_s=round(recorded - verified, 3),
                link_and_applied_s=round(time.monotonic() - recorded, 3),
            )

    async def compacted(self) -> None:
        """Wait for the background compactions begun so far (tests and benches)."""
        if self._compactions:
            await asyncio.gather(*list(self._compactions), return_exceptions=True)

    def committed_epoch(self, disk_id: str) -> int:
        """The last epoch applied to ``disk_id``'s current image (0: none)."""
        return self._open_disk(disk_id).journal.state.applied_epoch

    def journal_state(self, disk_id: str) -> JournalState:
        """What the journal says: last applied epoch, any epoch pending, committed prefix."""
        return self._open_disk(disk_id).journal.state

    async def close_disk(self, disk_id: str, token: int) -> int | None:
        """Stop serving the disk: exports removed, journal kept; closing twice is a no-op.
        The epoch the disk's image was left at (every epoch up to it applied), when it was
        open: once closed, no epoch lands in it."""
        known = await asyncio.to_thread((self.disk_root(disk_id) / "token").exists)
        if not known and disk_id not in self._disks:
            return None
        async with self._ordered(disk_id, token):
            opened = self._disks.pop(disk_id, None)
            if opened is None:
                return None
            await self._close(opened)
            applied = opened.journal.state.applied_epoch
            log.info("disk closed", disk_id=disk_id, epoch=applied)
            return applied

    def status(self) -> OnpremStatus:
        disks = tuple(
            OnpremDiskStatus(
                disk_id=disk_id,
                migration_id=opened.order.migration_id,
                token=self._tokens.get(disk_id, opened.order.token),
                committed_epoch=opened.journal.state.applied_epoch,
                staged_epochs=tuple(sorted(opened.staged)),
                exports=tuple(opened.exports()),
            )
            for disk_id, opened in sorted(self._disks.items())
        )
        return OnpremStatus(self._server.address, tuple(self._server.exports), disks)

    # -- internals ---------------------------------------------------------------------------

    @asynccontextmanager
    async def _ordered(self, disk_id: str, token: int) -> AsyncIterator[None]:
        """One order at a time per disk, and only with a token not below the highest seen."""
        root = self.disk_root(disk_id)
        lock = self._locks.setdefault(disk_id, asyncio.Lock())
        async with lock:
            highest = self._tokens.get(disk_id)
            if highest is None:
                highest = await asyncio.to_thread(durable.load_token, root / "token")
                self._tokens[disk_id] = highest
            if token < highest:
                raise StaleToken(disk_id, token, highest)
            if token > highest:
                await asyncio.to_thread(durable.save_json, root / "token", {"token": token})
                self._tokens[disk_id] = token
            yield

    def _track(self, task: asyncio.Future[None]) -> None:
        """Work that goes on whoever waits for it; the manager waits for it when it closes."""
        self._work.add(task)
        task.add_done_callback(self._work_done)

    def _compact(self, opened: _OpenDisk) -> None:
        """Fold the disk's unfrozen layers in the background (the disk's close stops it)."""

        disk_id = opened.order.disk_id

        async def compact() -> None:
            removed = await opened.disk.compact()
            if removed:
                log.info("layers compacted", disk_id=disk_id, removed=removed)

        def done(task: asyncio.Future[None]) -> None:
            self._compactions.discard(task)
            failed = None if task.cancelled() else task.exception()
            if failed is not None:  # harmless: the next commit or open compacts again
                log.warning("layers not compacted", disk_id=disk_id, error=repr(failed))

        task = asyncio.ensure_future(compact())
        self._compactions.add(task)
        task.add_done_callback(done)

    def _work_done(self, task: asyncio.Future[None]) -> None:
        self._work.discard(task)
        if not task.cancelled():
            task.exception()  # retrieved here in case the caller stopped waiting

    def _open_disk(self, disk_id: str) -> _OpenDisk:
        opened = self._disks.get(_checked_id(disk_id))
        if opened is None:
            raise DiskNotOpen(disk_id)
        return opened

    async def _open(self, order: OnpremDiskOrder, root: Path) -> _OpenDisk:
        disk = await LayeredDisk.open(order.disk_dir)
        journal: EpochJournal | None = None
        try:
            disk.at(order.snapshot_id)  # UnknownSnapshot if it is not there
            journal = await asyncio.to_thread(EpochJournal.open, root / "journal")
            opened = _OpenDisk(order, root, disk, journal)
            await self._recover(opened)
            self._compact(opened)
            return opened
        except BaseException:
            if journal is not None:
                journal.close()
            await disk.close()
            raise

    async def _recover(self, opened: _OpenDisk) -> None:
        """Link a committed, unapplied epoch again; discard every other staging area."""
        state = opened.journal.state
        if state.pending is not None:
            epoch = state.committed_epoch
            disk_id = opened.order.disk_id
            log.warning("linking a committed epoch again", disk_id=disk_id, epoch=epoch)
            await self._apply(opened, epoch, opened.order.token, state.pending)
        for epoch in await asyncio.to_thread(staging.staged_epochs, opened.root):
            await asyncio.to_thread(staging.discard, opened.root, epoch)
        await opened.disk.discard_staged()  # any a crash left unnamed

    async def _verify(self, opened: _OpenDisk, epoch: int, manifest: EpochManifest) -> None:
        """Step 1, with the staging export withdrawn and sealed; reopened if it fails."""
        disk_id = opened.order.disk_id
        backend = opened.staged.get(epoch)
        if backend is None:
            if manifest.entries:
                raise EpochRejected(disk_id, epoch, "nothing was staged for it")
            await self._step(disk_id, epoch, CommitStep.VERIFIED)
            return
        name = staging_export(disk_id, epoch)
        self._server.remove_export(name)
        await backend.seal()
        problem = backend.problem(manifest)
        if problem is None:
            wrong = await backend.mismatch(manifest)
            if wrong is not None:
                problem = f"staged bytes at {wrong.offset}+{wrong.length} do not match their hash"
        if problem is not None:
            raise EpochRejected(disk_id, epoch, problem)
        await self._step(disk_id, epoch, CommitStep.VERIFIED)

    def _reopen_staging(self, opened: _OpenDisk, epoch: int) -> None:
        backend = opened.staged.get(epoch)
        if backend is not None and backend.sealed:
            backend.unseal()
            self._server.add_export(staging_export(opened.order.disk_id, epoch), backend)

    async def _apply(
        self, opened: _OpenDisk, epoch: int, token: int, manifest: EpochManifest
    ) -> None:
        """Steps 4 to 6 for an epoch whose commit record is durable."""
        disk_id = opened.order.disk_id
        staged = await self._staged_file(opened, epoch) if manifest.entries else None

        async def checkpoint(step: CommitStep) -> None:
            await self._step(disk_id, epoch, step)

        try:
            await apply_epoch(
                opened.disk, staged, manifest, checkpoint if self._hook is not None else None
            )
        except FileNotFoundError as missing:
            raise EpochRejected(disk_id, epoch, "committed, but its staged file is gone") from (
                missing
            )
        await asyncio.to_thread(opened.journal.append_applied, epoch, token)
        await self._step(disk_id, epoch, CommitStep.APPLIED_RECORDED)
        dropped = opened.staged.pop(epoch, None)
        if dropped is not None:
            await dropped.close()
        # The landing records only: the data file is a layer of the disk now.
        await asyncio.to_thread(staging.discard, opened.root, epoch, data=False)
        self._compact(opened)
        self.epochs_applied += 1
        self.bytes_applied += manifest.data_bytes
        log.info("epoch committed", disk_id=disk_id, epoch=epoch, bytes=manifest.data_bytes)
        await self._step(disk_id, epoch, CommitStep.STAGING_DROPPED)

    async def _staged_file(self, opened: _OpenDisk, epoch: int) -> Path:
        """Where the committed ``epoch``'s data file is (or was, if it is linked already)."""
        backend = opened.staged.get(epoch)
        if backend is not None:
            return backend.data_path
        directory = opened.root / staging.staging_name(epoch)
        if not await asyncio.to_thread(directory.is_dir):
            raise EpochRejected(
                opened.order.disk_id, epoch, "committed, but its staging area is gone"
            )
        # By name in the disk's directory as opened now (the path recorded may be spelt
        # otherwise: a disk_dir given through another path to the same directory).
        recorded = await asyncio.to_thread(staging.data_path, directory)
        return opened.disk.directory / recorded.name

    async def _step(self, disk_id: str, epoch: int, step: CommitStep) -> None:
        if self._hook is not None:
            await self._hook(disk_id, epoch, step)

    async def _close(self, opened: _OpenDisk) -> None:
        for name in opened.exports():
            self._server.remove_export(name)
        try:
            for backend in opened.staged.values():
                await backend.close()
        finally:
            opened.journal.close()
            await opened.disk.close()


def _checked_id(disk_id: str) -> str:
    """A disk id that is safe as one path component (names are data, DESIGN.md §9)."""
    if not _SAFE_ID.fullmatch(disk_id) or ".." in disk_id:
        raise UnsafeName(COMPONENT, disk_id)
    return disk_id
