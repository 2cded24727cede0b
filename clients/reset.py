"""``ferry reset --confirm``: start the appliance over, and say what became of each VM.

The appliance stops its runs, brings every VM running in the cloud home to its last
committed epoch (powered off in ``_HDM_MIGRATEPOOL``, its migrate-time snapshot kept),
keeps a warm VM already cut over running on its volumes, undoes what other unfinished
migrations left on the sites, and forgets every record. ``ferry reset`` prints one row
per migration (its VM, outcome, epoch, what was done, any error) and exits 1 when any
of them has an error; without ``--confirm`` it sends nothing and exits 2.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from rich.markup import escape
from rich.table import Table

from clients.client import FerryClient
from clients.output import console
from messages.commands import ResetRequest, ResetRequestBody
from messages.events import CommandResponse, UndoneMigration

NOT_CONFIRMED = 2


def reset_table(items: Sequence[UndoneMigration]) -> Table:
    table = Table(title=f"Reset: {len(items)} unfinished migration(s)")
    for column in ("VM id", "Migration", "Outcome", "Epoch", "Error"):
        table.add_column(column, overflow="fold")
    for item in items:
        table.add_row(
            escape(item.vm_id),
            escape(item.migration_id),
            item.outcome.value,
            "-" if item.epoch is None else str(item.epoch),
            "[red]yes[/red]" if item.error else "-",
        )
    return table


def show_items(items: Sequence[UndoneMigration]) -> None:
    """The table, then what was done for each migration, one line each, and its error."""
    console.print(reset_table(items))
    for item in items:
        for action in item.actions:
            console.print(f"  {escape(item.migration_id)}: {escape(action)}")
        if item.error:
            console.print(f"  [red]{escape(item.migration_id)}: error: {escape(item.error)}[/red]")


async def cmd_reset(client: FerryClient, args: argparse.Namespace) -> int:
    if not args.confirm:
        console.print(
            "[red]ferry reset: every VM running in the cloud goes home to its last committed "
            "epoch (what its guest wrote since is lost) and every record is forgotten; "
            "pass --confirm to do it[/red]"
        )
        return NOT_CONFIRMED
    request = ResetRequest(body=ResetRequestBody(confirm=True))
    answer = await client.request(request, timeout_s=args.timeout)
    if not isinstance(answer, CommandResponse):
        raise ValueError(f"the appliance answered a reset with {answer.message_type}")
    body = answer.body
    if body.undone:
        show_items(body.undone)
    console.print(f"{body.command_type}: {escape(body.detail)}")
    failed = [item for item in body.undone if item.error]
    return 1 if failed or not body.accepted else 0


def add_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    reset = commands.add_parser(
        "reset", help="bring every VM home, forget every migration (needs --confirm)"
    )
    reset.add_argument("--confirm", action="store_true", help="yes, reset the appliance")
    reset.add_argument(
        "--timeout", type=float, default=900.0, help="seconds to wait for the answer"
    )
    reset.set_defaults(func=cmd_reset)
