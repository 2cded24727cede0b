"""``ferry migrate``, ``ferry migrations``, ``ferry cancel``: migrations from the command line.

``ferry migrate --type cold|tbc|warm [--bulk online|offline --package DIR|s3://...]``;
``ferry migrations`` shows each VM resting in the cloud's RPO lag (time since its last
committed epoch), the epoch and what is dirty.
"""

from __future__ import annotations

import argparse
import getpass
import os
from collections.abc import Sequence
from pathlib import Path

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from clients.client import FerryClient
from clients.output import console
from clients.units import format_duration, human_size
from messages.commands import (
    CancelRequest,
    CancelRequestBody,
    CloneOptions,
    CloneVm,
    GuestCredentials,
    MigrationSelector,
    NetworkMapping,
    SourceCloneRequest,
    SourceCloneRequestBody,
    StatusRequestBody,
    VmRef,
)
from messages.common import BulkTransferMode, MigrationState, MigrationType, Phase, VerifyMode
from messages.events import ErrorResponse, MigrationStatus, SourceCloneResponse
from messages.keys import AppliancePublicKey, CannotOpen

FINISHED = {
    MigrationState.COMPLETED,
    MigrationState.FAILED,
    MigrationState.CANCELLED,
    MigrationState.RECOVERED,
    MigrationState.RECOVERY_FAILED,
}


def settled(status: MigrationStatus) -> bool:
    """Finished, or resting in the cloud (where a tbc VM stays until migrated back or
    committed): what ``ferry migrate --wait`` waits for."""
    in_cloud = status.phase is Phase.IN_CLOUD and status.state is MigrationState.RUNNING
    return status.state in FINISHED or in_cloud


def _vm_refs(args: argparse.Namespace) -> tuple[CloneVm, ...]:
    """Names as names, ids (--id) as ids: a reference is never guessed from its look."""
    refs = [CloneVm(name=name) for name in args.vms] + [CloneVm(vm_id=i) for i in args.ids]
    if not refs:
        raise ValueError("name at least one VM (by name, or by id with --id)")
    return tuple(refs)


def _network_map(pairs: Sequence[str]) -> tuple[NetworkMapping, ...]:
    mappings = []
    for pair in pairs:
        source, sep, target = pair.partition("=")
        if not sep or not source or not target:
            raise ValueError(f"--network-map wants source=target, not {pair!r}")
        mappings.append(NetworkMapping(source=source, target=target))
    return tuple(mappings)


def _guest_password(args: argparse.Namespace) -> str:
    if args.guest_password_file is not None:
        lines = Path(args.guest_password_file).read_text().splitlines()
        return lines[0] if lines else ""
    return os.environ.get("FERRY_GUEST_PASSWORD") or getpass.getpass("guest password: ")


def _credentials(args: argparse.Namespace, key: AppliancePublicKey) -> GuestCredentials | None:
    """Sealed to the appliance's key here: nothing on the way can read them."""
    if args.guest_user is None:
        return None
    try:
        sealed = key.seal_login(args.guest_user, _guest_password(args))
    except CannotOpen:
        raise ValueError("--guest-user and the guest password must both be non-empty") from None
    return GuestCredentials(sealed=sealed)


def _bulk(args: argparse.Namespace) -> tuple[BulkTransferMode, str | None]:
    mode = BulkTransferMode(args.bulk)
    if args.package is not None and mode is not BulkTransferMode.OFFLINE:
        raise ValueError("--package is where an offline bulk copy goes: give --bulk offline")
    if mode is BulkTransferMode.OFFLINE and args.package is None:
        raise ValueError("--bulk offline needs --package DIR or s3://bucket/prefix")
    return mode, args.package


def clone_request(args: argparse.Namespace, key: AppliancePublicKey) -> SourceCloneRequest:
    vms = _vm_refs(args)
    bulk, package = _bulk(args)
    return SourceCloneRequest(
        body=SourceCloneRequestBody(
            request_id=args.request_id,
            vms=vms,
            migration_type=MigrationType(args.type),
            bulk_transfer_mode=bulk,
            package_location=package,
            guest_credentials=_credentials(args, key),
            network_map=_network_map(args.network_map),
            application_dependency=(
                (tuple(VmRef(vm_id=v.vm_id, name=v.name) for v in vms),) if args.together else ()
            ),
            options=CloneOptions(
                verify=VerifyMode(args.verify), bandwidth_cap_mbps=args.bandwidth_mbps
            ),
        )
    )


def rpo_text(status: MigrationStatus) -> str:
    """A VM in the cloud: how far on-prem is behind it; "" for one the cache does not serve.
    A warm VM cut over onto its volumes: how long its cutover took."""
    if status.cutover_s is not None:
        return f"cut over in {status.cutover_s:.2f} s"
    if status.rpo_lag_s is None:
        return ""
    parts = [format_duration(status.rpo_lag_s)]
    if status.committed_epoch is not None:
        parts.append(f"epoch {status.committed_epoch}")
    if status.dirty_bytes is not None:
        parts.append(f"{human_size(status.dirty_bytes)} dirty")
    return ", ".join(parts)


def progress_text(status: MigrationStatus) -> str:
    """Percent of the bytes; a warm VM reconciling: of the pass under way, named."""
    text = f"{status.progress_percent:.1f}% of {status.bytes_total / 2**20:.0f} MiB"
    if status.reconcile_pass is not None and status.phase is Phase.TRANSFER:
        text += f" (pass {status.reconcile_pass})"
    return text


def migrations_table(statuses: Sequence[MigrationStatus], title: str = "Migrations") -> Table:
    table = Table(title=title)
    columns = ("Migration", "VM", "Type", "State", "Phase", "Progress", "RPO lag", "Queue", "Error")
    for column in columns:
        table.add_column(column, overflow="fold")
    for s in statuses:
        colours = {
            "completed": "green",
            "failed": "red",
            "cancelled": "yellow",
            "paused": "yellow",
            "recovered": "yellow",  # back on-prem by itself: a component was lost
            "recovery_failed": "red",  # ...and its image needs a restore from the snapshot
        }
        colour = colours.get(s.state, "")
        table.add_row(
            s.migration_id,
            s.vm_name,
            s.migration_type.value,
            f"[{colour}]{s.state.value}[/{colour}]" if colour else s.state.value,
            s.phase.value,
            progress_text(s),
            rpo_text(s),
            str(s.queue_position or ""),
            f"{s.error.code}: {s.error.message}" if s.error else (s.pause_reason or ""),
        )
    return table


class ProgressBoard:
    """One rich progress bar per VM, fed by SourceCloneResponses."""

    def __init__(self, console: Console) -> None:
        self.progress = Progress(
            TextColumn("{task.fields[vm]:<20}"),
            TextColumn("{task.fields[state]:<10} {task.fields[phase]:<14}"),
            BarColumn(),
            DownloadColumn(),
            TimeRemainingColumn(),
            console=console,
        )
        self.latest: dict[str, MigrationStatus] = {}
        self._tasks: dict[str, TaskID] = {}

    def update(self, status: MigrationStatus) -> None:
        self.latest[status.migration_id] = status
        task = self._tasks.get(status.migration_id)
        total = max(status.bytes_total, 1)
        if task is None:
            task = self.progress.add_task("", total=total, vm="", state="", phase="")
            self._tasks[status.migration_id] = task
        self.progress.update(
            task,
            total=total,
            completed=status.bytes_done,
            vm=status.vm_name,
            state=status.state.value,
            phase=status.phase.value,
        )

    @property
    def finished(self) -> bool:
        """Every VM is done, or runs in the cloud (tbc, warm): nothing more to wait for."""
        return bool(self.latest) and all(settled(s) for s in self.latest.values())


async def follow(client: FerryClient, correlation_id: str, board: ProgressBoard) -> None:
    async for event in client.answers(correlation_id):
        if isinstance(event, ErrorResponse):
            raise RuntimeError(f"{event.body.code.value}: {event.body.message}")
        if isinstance(event, SourceCloneResponse):
            board.update(event.body)
            if board.finished:
                return


async def cmd_migrate(client: FerryClient, args: argparse.Namespace) -> int:
    request = clone_request(args, client.appliance_key)
    await client.send(request)
    board = ProgressBoard(console)
    if not args.wait:
        first = await client.next_answer(request.correlation_id, timeout_s=60)
        assert isinstance(first, SourceCloneResponse)
        board.update(first.body)
        while len(board.latest) < len(request.body.vms):
            more = await client.next_answer(request.correlation_id, timeout_s=60)
            if isinstance(more, SourceCloneResponse):
                board.update(more.body)
        console.print(migrations_table(list(board.latest.values()), "Requested"))
        return 0
    with board.progress:
        await follow(client, request.correlation_id, board)
    statuses = list(board.latest.values())
    console.print(migrations_table(statuses, "Result"))
    ok = all(s.state is MigrationState.COMPLETED or s.phase is Phase.IN_CLOUD for s in statuses)
    return 0 if ok else 1


async def cmd_migrations(client: FerryClient, args: argparse.Namespace) -> int:
    statuses: list[MigrationStatus] = []
    token: str | None = None
    while True:
        answer = await client.status(
            StatusRequestBody(include_finished=not args.active, page_size=200, page_token=token)
        )
        statuses.extend(answer.body.migrations)
        token = answer.body.next_page_token
        if token is None:
            break
    console.print(migrations_table(statuses))
    return 0


async def cmd_cancel(client: FerryClient, args: argparse.Namespace) -> int:
    vms = tuple(VmRef(name=name) for name in args.vm) + tuple(VmRef(vm_id=i) for i in args.vm_id)
    selector = MigrationSelector(
        migration_ids=tuple(args.migrations), request_id=args.request, vms=vms
    )
    request = CancelRequest(body=CancelRequestBody(select=selector))
    answer = await client.request(request)
    statuses = [answer.body] if isinstance(answer, SourceCloneResponse) else []
    console.print(migrations_table(statuses, "Cancelling"))
    return 0


def add_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    migrate = commands.add_parser("migrate", help="migrate VMs (by name, or by id with --id)")
    migrate.add_argument("vms", nargs="*", metavar="VM_NAME")
    migrate.add_argument("--id", dest="ids", action="append", default=[], metavar="VM_ID")
    migrate.add_argument("--type", choices=[t.value for t in MigrationType], default="cold")
    migrate.add_argument(
        "--bulk",
        choices=[m.value for m in BulkTransferMode],
        default="online",
        help="warm: copy the data over the link (online) or as a shipped package (offline)",
    )
    migrate.add_argument(
        "--package", metavar="DIR|s3://BUCKET/PREFIX", help="--bulk offline: where it goes"
    )
    migrate.add_argument("--network-map", action="append", default=[], metavar="SRC=DST")
    migrate.add_argument("--together", action="store_true", help="one dependency group")
    migrate.add_argument(
        "--guest-user",
        help="guest login for prepare; the password comes from --guest-password-file, "
        "FERRY_GUEST_PASSWORD or a prompt; both are sealed to the appliance key",
    )
    migrate.add_argument("--guest-password-file", help="a file whose first line is the password")
    migrate.add_argument("--verify", choices=[v.value for v in VerifyMode], default="chunk")
    migrate.add_argument("--bandwidth-mbps", type=float)
    migrate.add_argument("--request-id", help="idempotency key (resend safely)")
    migrate.add_argument(
        "--wait", action="store_true", help="follow progress to the end (tbc: into the cloud)"
    )
    migrate.set_defaults(func=cmd_migrate)
    listing = commands.add_parser("migrations", help="list migrations")
    listing.add_argument("--active", action="store_true", help="hide finished ones")
    listing.set_defaults(func=cmd_migrations)
    cancel = commands.add_parser("cancel", help="cancel migrations")
    cancel.add_argument("migrations", nargs="*", metavar="MIGRATION_ID")
    cancel.add_argument("--request")
    cancel.add_argument("--vm", action="append", default=[], metavar="VM_NAME")
    cancel.add_argument("--vm-id", action="append", default=[], metavar="VM_ID")
    cancel.set_defaults(func=cmd_cancel)
