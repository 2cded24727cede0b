"""Every error the appliance raises on purpose, in one tree.

    FerryError
    ├── TransientError                  retry at the edge, or let SQS redeliver
    │   ├── StateStoreUnavailable       Redis is unreachable
    │   ├── BusUnavailable              SQS/S3 is unreachable
    │   ├── LeaseLost                   another process owns the job now
    │   │   └── FencedOut               a write carried a stale fencing token and was refused
    │   ├── ComponentSilent             a component did not answer an order in time
    │   ├── DiskInUse                   another process has the disk open (a previous owner)
    │   ├── PackageStoreUnavailable     a package's directory or S3 bucket cannot be reached now
    │   └── TransientDataPathError      a link dropped, a peer timed out
    │       ├── ConnectionDropped
    │       ├── LinkDown                the WAN link stayed down past its threshold (a miss gave up)
    │       └── ReconcileUnavailable    a reconcile pass failed for now (give the next one later)
    └── PermanentError                  reject, report, dead-letter; never retried
        ├── CommandRejected             a command that cannot be carried out (has an ErrorCode)
        │   ├── UnknownVm
        │   ├── AmbiguousVmName         a name that several VMs share: give the vm_id
        │   ├── UnknownMigration
        │   ├── Conflict
        │   ├── WrongStep               a command the migration's step does not allow (names both)
        │   ├── PrecheckFailed          prepare-to-migrate checks failed (names them)
        │   └── InvalidCredentials      sealed guest credentials do not open or are empty
        ├── MigrationCancelled          a cancel request stopped a migration (it rolls back)
        ├── IncorrectState              a state machine was asked for an illegal transition
        ├── OrderRefused                a component order the control channel will not carry out
        ├── StateLost                   Redis came back without our generation marker
        ├── NotConfigured               a setting the appliance cannot start without is missing
        ├── KeyFileError                the appliance's key file is unreadable or unsafe
        ├── StaleToken                  an order or epoch commit with a superseded fencing token
        ├── SiteError                   a site driver refused (bad name, missing VM, no capacity)
        │   ├── UnsafeName              a name that would escape the data directory
        │   └── UnreadableVm            a VM's configuration cannot be read (invalid_vm)
        └── DataPathError               moving blocks failed for good
            ├── ChunkMismatch           a chunk's hash differs at the target
            ├── CertificationFailed     the whole-image compare found a difference
            ├── NbdProtocolError        a peer broke the NBD protocol
            │   └── NbdExportRefused    the server has no such export (now: it may be restarting)
            ├── NbdCommandError         a peer answered an NBD request with an error
            ├── OutOfSpace              the target has no room
            ├── TransferFailed          retries exhausted; names the chunk and the cause
            ├── UnknownSnapshot         a layered disk has no snapshot with that id
            ├── DiskCorrupt             a disk's manifest or bitmap is unreadable or inconsistent
            ├── PackageError            an offline bulk package (manifest + chunk objects) unusable
            │   ├── PackageLocationInvalid  not a path or s3://bucket/prefix, or no such bucket
            │   └── PackageNeedsCorrection  the import at the cloud must be fixed: WAIT for a
            │       │                       corrected import (next BulkMigrationDoneRequest),
            │       │                       do not fail the VM
            │       ├── PackageManifestMismatch  manifest missing, unreadable, not the one exported
            │       ├── PackageChunkMissing      a chunk object the manifest lists is absent
            │       ├── PackageChunkCorrupt      a chunk object's hash differs from the manifest
            │       └── PackageDefects           every missing and corrupt chunk of one import
            └── ComponentError          a data-plane component (cache, I/O manager) refused
                ├── DiskNotOpen         an order for a disk the component does not serve
                ├── OrderConflict       an order that contradicts the one the disk was opened with
                ├── EpochOutOfOrder     an epoch staged or committed out of sequence
                ├── EpochRejected       an epoch's manifest disagrees with what was staged
                ├── JournalCorrupt      an epoch journal is unreadable before its tail
                └── ReconcileFailed     a cache's reconcile pass did not apply (code, reason)

Errors carry typed fields and build their message from them. Catch by type,
never by message text.
"""

from __future__ import annotations

from pathlib import Path

from messages.errors import ErrorCode


class FerryError(Exception):
    """Base of every error the appliance raises on purpose."""

    code: ErrorCode = ErrorCode.INTERNAL


class TransientError(FerryError):
    """Worth retrying: the same action may succeed later."""

    code = ErrorCode.UNAVAILABLE


class PermanentError(FerryError):
    """Not worth retrying: report it and move on."""


class StateStoreUnavailable(TransientError):
    def __init__(self, cause: BaseException) -> None:
        self.cause = cause
        super().__init__(f"state store unreachable: {type(cause).__name__}: {cause}")


class BusUnavailable(TransientError):
    def __init__(self, operation: str, cause: BaseException) -> None:
        self.operation = operation
        self.cause = cause
        super().__init__(f"message bus unreachable during {operation}: {type(cause).__name__}")


class LeaseLost(TransientError):
    def __init__(self, resource: str, token: int) -> None:
        self.resource = resource
        self.token = token
        super().__init__(self._describe())

    def _describe(self) -> str:
        return f"lease on {self.resource} (fencing token {self.token}) is no longer ours"


class FencedOut(LeaseLost):
    """A write made for ``resource`` with a token that is no longer current was refused."""

    def _describe(self) -> str:
        return f"write for {self.resource} refused: fencing token {self.token} is stale"


class ComponentSilent(TransientError):
    def __init__(self, instance: str, disk_id: str, order_id: str, timeout_s: float) -> None:
        self.instance = instance
        self.disk_id = disk_id
        self.order_id = order_id
        self.timeout_s = timeout_s
        super().__init__(
            f"component {instance} recorded no outcome for order {order_id} (disk {disk_id}) "
            f"within {timeout_s:g}s"
        )


class TransientDataPathError(TransientError):
    code = ErrorCode.DATA_PATH


class ConnectionDropped(TransientDataPathError):
    def __init__(self, peer: str, cause: BaseException | str) -> None:
        self.peer = peer
        self.cause = cause
        super().__init__(f"connection to {peer} dropped: {cause}")


class LinkDown(TransientDataPathError):
    """Not a ConnectionDropped: an NBD server takes that for its own client gone and does
    not answer, while this must reach the guest as an I/O error."""

    def __init__(self, peer: str, waited_s: float, cause: BaseException | str) -> None:
        self.peer = peer
        self.waited_s = waited_s
        self.cause = cause
        super().__init__(f"{peer} unreachable for {waited_s:.1f}s: {cause}")


class ReconcileUnavailable(TransientDataPathError):
    """A reconcile pass the cache could not make for now (the volume unreachable, ...)."""

    def __init__(self, disk_id: str, pass_no: int, reason: str) -> None:
        self.disk_id = disk_id
        self.pass_no = pass_no
        self.reason = reason
        super().__init__(f"disk {disk_id}: reconcile pass {pass_no} failed for now: {reason}")


class CommandRejected(PermanentError):
    """A well-formed command that cannot be carried out."""

    code = ErrorCode.INVALID_REQUEST

    def __init__(self, reason: str, code: ErrorCode | None = None) -> None:
        if code is not None:
            self.code = code
        self.reason = reason
        super().__init__(reason)


class UnknownVm(CommandRejected):
    def __init__(self, ref: str, site: str) -> None:
        self.ref = ref
        self.site = site
        super().__init__(f"no VM {ref!r} on site {site!r}", ErrorCode.UNKNOWN_VM)


class AmbiguousVmName(CommandRejected):
    def __init__(self, name: str, site: str, vm_ids: list[str]) -> None:
        self.name = name
        self.site = site
        self.vm_ids = vm_ids
        super().__init__(
            f"{len(vm_ids)} VMs on site {site!r} are named {name!r} ({', '.join(vm_ids)}); "
            "name the one you mean by its vm_id",
            ErrorCode.AMBIGUOUS_VM_NAME,
        )


class UnknownMigration(CommandRejected):
    def __init__(self, ref: str) -> None:
        self.ref = ref
        super().__init__(f"no migration matches {ref!r}", ErrorCode.UNKNOWN_MIGRATION)


class Conflict(CommandRejected):
    def __init__(self, reason: str) -> None:
        super().__init__(reason, ErrorCode.CONFLICT)


class WrongStep(CommandRejected):
    """A command about a migration that its current step does not allow."""

    def __init__(self, command: str, migration_id: str, step: str, code: ErrorCode) -> None:
        self.command = command
        self.migration_id = migration_id
        self.step = step
        super().__init__(f"{command} refused: migration {migration_id} is {step}", code)


class PrecheckFailed(CommandRejected):
    def __init__(self, vm: str, failed: list[tuple[str, str]]) -> None:
        self.vm = vm
        self.failed = failed
        listed = "; ".join(f"{name}: {reason}" for name, reason in failed)
        super().__init__(f"prepare-to-migrate failed for {vm}: {listed}", ErrorCode.PRECHECK_FAILED)


class InvalidCredentials(CommandRejected):
    """Guest credentials that cannot be used; the reason never holds a username or password."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason, ErrorCode.INVALID_CREDENTIALS)


class MigrationCancelled(PermanentError):
    code = ErrorCode.CONFLICT

    def __init__(self, migration_id: str) -> None:
        self.migration_id = migration_id
        super().__init__(f"migration {migration_id} was cancelled")


class IncorrectState(PermanentError):
    def __init__(self, machine: str, current: str, wanted: str) -> None:
        self.machine = machine
        self.current = current
        self.wanted = wanted
        super().__init__(f"{machine}: no transition from {current!r} to {wanted!r}")


class OrderRefused(PermanentError):
    """A component order refused before it was carried out (fenced out, unparseable, stale)."""

    def __init__(self, instance: str, disk_id: str, reason: str) -> None:
        self.instance = instance
        self.disk_id = disk_id
        self.reason = reason
        super().__init__(f"order for {instance} disk {disk_id} refused: {reason}")


class StateLost(PermanentError):
    def __init__(self, expected: str, found: str | None) -> None:
        self.expected = expected
        self.found = found
        super().__init__(
            f"state store generation is {found!r}, expected {expected!r}: Redis lost its data"
        )


class NotConfigured(PermanentError):
    def __init__(self, setting: str, reason: str) -> None:
        self.setting = setting
        self.reason = reason
        super().__init__(f"{setting}: {reason}")


class KeyFileError(PermanentError):
    def __init__(self, path: Path, reason: str) -> None:
        self.path = path
        self.reason = reason
        super().__init__(f"appliance key file {path}: {reason}")


class SiteError(PermanentError):
    def __init__(self, site: str, reason: str) -> None:
        self.site = site
        self.reason = reason
        super().__init__(f"site {site!r}: {reason}")


class UnsafeName(SiteError):
    def __init__(self, site: str, name: str) -> None:
        self.name = name
        super().__init__(site, f"name {name!r} is not a safe identifier")


class UnreadableVm(SiteError):
    code = ErrorCode.INVALID_VM

    def __init__(self, site: str, vm_id: str, reason: str) -> None:
        self.vm_id = vm_id
        super().__init__(site, f"the configuration of VM {vm_id} is unreadable: {reason}")


class DataPathError(PermanentError):
    code = ErrorCode.DATA_PATH


class ChunkMismatch(DataPathError):
    def __init__(self, offset: int, length: int, expected: str, found: str) -> None:
        self.offset = offset
        self.length = length
        self.expected = expected
        self.found = found
        super().__init__(
            f"chunk at offset {offset} ({length} bytes): target hash {found} != source {expected}"
        )


class CertificationFailed(DataPathError):
    def __init__(self, offset: int, length: int) -> None:
        self.offset = offset
        self.length = length
        super().__init__(f"certification: source and target differ at offset {offset} (+{length})")


class NbdProtocolError(DataPathError):
    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(f"NBD protocol error: {reason}")


class NbdExportRefused(NbdProtocolError):
    """The server refused the export by name (NBD_REP_ERR_UNKNOWN): a wrong name, or a server
    that restarted and serves it again in a moment (the cache's upstream retries it)."""

    def __init__(self, export: str, reply: str) -> None:
        self.export = export
        self.reply = reply
        super().__init__(f"server refused export {export!r}: {reply}")


class NbdCommandError(DataPathError):
    def __init__(self, command: str, offset: int, length: int, errno: int) -> None:
        self.command = command
        self.offset = offset
        self.length = length
        self.errno = errno
        super().__init__(f"NBD {command} at {offset} (+{length}) failed with errno {errno}")


class OutOfSpace(DataPathError):
    """ENOSPC (or a quota) at a target: what was written stays, for a resume once freed."""

    code = ErrorCode.OUT_OF_SPACE

    def __init__(self, target: str, needed: int, available: int | None = None) -> None:
        self.target = target
        self.needed = needed
        self.available = available
        room = f"{available} bytes available" if available is not None else "the target is full"
        super().__init__(f"no space left on {target}: writing {needed} bytes failed ({room})")


class TransferFailed(DataPathError):
    def __init__(self, offset: int, length: int, attempts: int, cause: BaseException) -> None:
        self.offset = offset
        self.length = length
        self.attempts = attempts
        self.cause = cause
        super().__init__(
            f"copying {length} bytes at offset {offset} failed after {attempts} attempts: "
            f"{type(cause).__name__}: {cause}"
        )


class UnknownSnapshot(DataPathError):
    def __init__(self, disk: str, snapshot_id: str) -> None:
        self.disk = disk
        self.snapshot_id = snapshot_id
        super().__init__(f"disk {disk}: no snapshot {snapshot_id!r}")


class VolumeNamesBusy(TransientError):
    """Another request is checking and taking cloud volume names now (for a moment): the
    command is delivered again and goes on then."""

    def __init__(self, holder: str | None) -> None:
        self.holder = holder
        super().__init__(f"cloud volume names are being taken by {holder or 'another request'}")


class DiskInUse(TransientError):
    """Worth waiting for: the holder is typically a migration's previous owner letting go."""

    def __init__(self, path: Path) -> None:
        self.path = path
        super().__init__(f"disk {path} is already open elsewhere")


class DiskCorrupt(DataPathError):
    def __init__(self, path: Path, reason: str) -> None:
        self.path = path
        self.reason = reason
        super().__init__(f"{path}: {reason}")


class ComponentError(DataPathError):
    """A data-plane component (the cloud cache, the on-prem I/O manager) refused an order."""


class DiskNotOpen(ComponentError):
    def __init__(self, disk_id: str) -> None:
        self.disk_id = disk_id
        super().__init__(f"disk {disk_id} is not open here")


class CacheDiscardRefused(ComponentError):
    """A close asked to remove a cache disk that still holds what on-prem has not committed."""

    def __init__(self, disk_id: str, dirty_bytes: int) -> None:
        self.disk_id = disk_id
        self.dirty_bytes = dirty_bytes
        super().__init__(
            f"disk {disk_id}: not removed, {dirty_bytes} bytes are not committed on-prem yet"
        )


class OrderConflict(ComponentError):
    code = ErrorCode.CONFLICT

    def __init__(self, disk_id: str, reason: str) -> None:
        self.disk_id = disk_id
        self.reason = reason
        super().__init__(f"disk {disk_id}: {reason}")


class EpochOutOfOrder(ComponentError):
    code = ErrorCode.CONFLICT

    def __init__(self, disk_id: str, epoch: int, expected: int) -> None:
        self.disk_id = disk_id
        self.epoch = epoch
        self.expected = expected
        super().__init__(f"disk {disk_id}: epoch {epoch} is out of order (expected {expected})")


class EpochRejected(ComponentError):
    def __init__(self, disk_id: str, epoch: int, reason: str) -> None:
        self.disk_id = disk_id
        self.epoch = epoch
        self.reason = reason
        super().__init__(f"disk {disk_id}: epoch {epoch} rejected: {reason}")


class JournalCorrupt(ComponentError):
    def __init__(self, path: Path, offset: int, reason: str) -> None:
        self.path = path
        self.offset = offset
        self.reason = reason
        super().__init__(f"epoch journal {path} at byte {offset}: {reason}")


class ReconcileFailed(ComponentError):
    """A reconcile pass the cache refused or could not carry out (its outcome's code)."""

    def __init__(self, disk_id: str, pass_no: int, outcome_code: str, reason: str) -> None:
        self.disk_id = disk_id
        self.pass_no = pass_no
        self.outcome_code = outcome_code
        self.reason = reason
        super().__init__(
            f"disk {disk_id}: reconcile pass {pass_no} not applied ({outcome_code}): {reason}"
        )


class TransferCancelled(DataPathError):
    def __init__(self, transfer_id: str, chunks_done: int, chunks_total: int) -> None:
        self.transfer_id = transfer_id
        self.chunks_done = chunks_done
        self.chunks_total = chunks_total
        super().__init__(
            f"transfer {transfer_id} cancelled with {chunks_done} of {chunks_total} chunks done; "
            "its checkpoint resumes it"
        )


class StaleToken(PermanentError):
    """An order or epoch commit carried a fencing token older than one already accepted."""

    code = ErrorCode.CONFLICT

    def __init__(self, disk_id: str, token: int, highest: int) -> None:
        self.disk_id = disk_id
        self.token = token
        self.highest = highest
        super().__init__(f"disk {disk_id}: token {token} is stale (highest accepted {highest})")


class PackageStoreUnavailable(TransientError):
    """A package location (directory, S3 bucket) could not be reached after the edge's retries."""

    def __init__(self, location: str, operation: str, cause: BaseException) -> None:
        self.location = location
        self.operation = operation
        self.cause = cause
        super().__init__(
            f"package location {location} unreachable during {operation}: "
            f"{type(cause).__name__}: {cause}"
        )


class PackageError(DataPathError):
    """An offline bulk package (appliance/datapath/package) cannot be used as it is."""


class PackageLocationInvalid(PackageError):
    code = ErrorCode.INVALID_REQUEST

    def __init__(self, location: str, reason: str) -> None:
        self.location = location
        self.reason = reason
        super().__init__(f"package location {location!r}: {reason}")


class PackageNeedsCorrection(PackageError):
    """The package imported at the cloud is not (yet) usable; a person must correct it.

    Not a failure of the VM: the migration waits for the next
    BulkMigrationDoneRequest and verifies again; only what was missing or bad
    is written then.
    """


class PackageManifestMismatch(PackageNeedsCorrection):
    def __init__(self, location: str, expected: str, found: str | None, reason: str) -> None:
        self.location = location
        self.expected = expected
        self.found = found
        self.reason = reason
        super().__init__(
            f"package {location}: manifest refused ({reason}); expected sha256 {expected}, "
            f"found {found or 'none'}"
        )


class PackageChunkMissing(PackageNeedsCorrection):
    def __init__(self, disk_id: str, offset: int, length: int, object_name: str) -> None:
        self.disk_id = disk_id
        self.offset = offset
        self.length = length
        self.object_name = object_name
        super().__init__(
            f"disk {disk_id}: chunk at offset {offset} (+{length}) is missing: object {object_name}"
        )


class PackageChunkCorrupt(PackageNeedsCorrection):
    def __init__(
        self, disk_id: str, offset: int, length: int, object_name: str, expected: str, found: str
    ) -> None:
        self.disk_id = disk_id
        self.offset = offset
        self.length = length
        self.object_name = object_name
        self.expected = expected
        self.found = found
        super().__init__(
            f"disk {disk_id}: chunk at offset {offset} (+{length}) is corrupt: object "
            f"{object_name} hashes to {found}, the manifest says {expected}"
        )


class PackageDefects(PackageNeedsCorrection):
    """Every missing and corrupt chunk one import found (it checks to the end, not the first)."""

    def __init__(
        self, location: str, defects: tuple[PackageChunkMissing | PackageChunkCorrupt, ...]
    ) -> None:
        self.location = location
        self.defects = defects
        missing = sum(isinstance(d, PackageChunkMissing) for d in defects)
        listed = "; ".join(str(d) for d in defects[:20])
        more = f"; and {len(defects) - 20} more" if len(defects) > 20 else ""
        super().__init__(
            f"package {location}: {missing} chunk(s) missing, {len(defects) - missing} "
            f"corrupt: {listed}{more}"
        )
