"""``ferry health`` (the components and their states) and ``ferry events`` (the event log)."""

from __future__ import annotations

import argparse
import json

from rich.markup import escape
from rich.table import Table

from clients.client import FerryClient
from clients.output import console
from messages.commands import EventsRequestBody, StatusRequestBody
from messages.events import ComponentState, EventsResponse, ReadyStatus, StatusResponse

NOT_READY_EXIT = 4
_COLOUR = {ComponentState.OK: "green", ComponentState.DEGRADED: "yellow"}


def health_table(answer: StatusResponse) -> Table:
    body = answer.body
    table = Table(title=f"Appliance {answer.appliance_id}: {body.status.value}")
    for column in ("Component", "State", "Detail", "Last ok"):
        table.add_column(column)
    for component in body.components:
        colour = _COLOUR.get(component.state, "red")
        last_ok = f"{component.last_ok_at:%Y-%m-%d %H:%M:%S}" if component.last_ok_at else "-"
        table.add_row(
            escape(component.name),
            f"[{colour}]{component.state.value}[/{colour}]",
            escape(component.detail),
            last_ok,
        )
    return table


async def cmd_health(client: FerryClient, _args: argparse.Namespace) -> int:
    """Exit 0 when Ready, 4 when Not Ready (the first detail names what is down)."""
    answer = await client.status(StatusRequestBody(include_finished=False, page_size=1))
    console.print(health_table(answer))
    if answer.body.status is ReadyStatus.READY:
        return 0
    if answer.body.status_details:
        console.print(f"[red]{escape(answer.body.status_details[0])}[/red]")
    return NOT_READY_EXIT


def events_table(answer: EventsResponse) -> Table:
    table = Table(title="Events" + (" (older ones left out)" if answer.body.truncated else ""))
    for column in ("At", "Kind", "Migration", "Fields"):
        table.add_column(column)
    for event in answer.body.events:
        fields = json.dumps(event.fields, sort_keys=True, default=str)
        table.add_row(event.at, event.kind, event.migration_id or "-", escape(fields))
    return table


async def cmd_events(client: FerryClient, args: argparse.Namespace) -> int:
    body = EventsRequestBody(migration_id=args.migration, kinds=tuple(args.kind), count=args.count)
    console.print(events_table(await client.events(body)))
    return 0


def add_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    health = commands.add_parser(
        "health", help="the components and their states (exit 4 when Not Ready)"
    )
    health.set_defaults(func=cmd_health)
    events = commands.add_parser("events", help="the appliance's event log, newest last")
    events.add_argument("--migration", help="one migration's events")
    events.add_argument("--kind", action="append", default=[], help="only this kind (repeat)")
    events.add_argument("--count", type=int, default=100, help="the newest this many (max 1000)")
    events.set_defaults(func=cmd_events)
