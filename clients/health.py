"""``ferry health`` (the components and their states) and ``ferry events`` (the event log)."""

from __future__ import annotations

import argparse
import asyncio
import json
from dataclasses import dataclass
from datetime import UTC, datetime

from rich.markup import escape
from rich.table import Table

from clients.client import FerryClient
from clients.output import console
from messages.commands import EventsRequestBody, StatusRequestBody
from messages.events import (
    ComponentState,
    ComponentStatus,
    EventsResponse,
    Heartbeat,
    ReadyStatus,
    StatusResponse,
)

NOT_READY_EXIT = 4
_COLOUR = {ComponentState.OK: "green", ComponentState.DEGRADED: "yellow"}


@dataclass(frozen=True, slots=True)
class Health:
    """What a StatusResponse or a Heartbeat says about the appliance's health."""

    appliance_id: str
    status: ReadyStatus
    details: tuple[str, ...]
    components: tuple[ComponentStatus, ...]

    @classmethod
    def of(cls, answer: StatusResponse | Heartbeat) -> Health:
        body = answer.body
        details = body.status_details
        return cls(answer.appliance_id or "-", body.status, details, body.components)


def health_table(health: Health) -> Table:
    table = Table(title=f"Appliance {health.appliance_id}: {health.status.value}")
    for column in ("Component", "State", "Detail", "Last ok"):
        table.add_column(column)
    for component in health.components:
        colour = _COLOUR.get(component.state, "red")
        last_ok = f"{component.last_ok_at:%Y-%m-%d %H:%M:%S}" if component.last_ok_at else "-"
        table.add_row(
            escape(component.name),
            f"[{colour}]{component.state.value}[/{colour}]",
            escape(component.detail),
            last_ok,
        )
    return table


async def _next_heartbeat(client: FerryClient, after: datetime) -> Heartbeat:
    """The first heartbeat sent after ``after`` (older ones may wait on the shared queue)."""
    async for beat in client.heartbeats():
        if beat.sent_at > after:
            return beat
    raise RuntimeError("heartbeats ended")  # pragma: no cover


async def current_health(client: FerryClient, timeout_s: float) -> Health:
    """The answer to a StatusRequest, or the next heartbeat if it comes first (a StatusRequest
    waits on the queue while the appliance's state store is down; heartbeats do not)."""
    status = asyncio.ensure_future(
        client.status(StatusRequestBody(include_finished=False, page_size=1))
    )
    beat = asyncio.ensure_future(_next_heartbeat(client, datetime.now(UTC)))
    try:
        done, _ = await asyncio.wait(
            (status, beat), timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED
        )
        if not done:
            raise TimeoutError(f"no status answer nor heartbeat within {timeout_s:.0f}s")
        return Health.of(status.result() if status in done else beat.result())
    finally:
        for task in (status, beat):
            task.cancel()
        await asyncio.gather(status, beat, return_exceptions=True)


async def cmd_health(client: FerryClient, args: argparse.Namespace) -> int:
    """Exit 0 when Ready, 4 when Not Ready (the first detail names what is down)."""
    health = await current_health(client, args.timeout)
    console.print(health_table(health))
    if health.status is ReadyStatus.READY:
        return 0
    if health.details:
        console.print(f"[red]{escape(health.details[0])}[/red]")
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
    health.add_argument(
        "--timeout", type=float, default=60.0, help="how long to wait for an answer (s)"
    )
    health.set_defaults(func=cmd_health)
    events = commands.add_parser("events", help="the appliance's event log, newest last")
    events.add_argument("--migration", help="one migration's events")
    events.add_argument("--kind", action="append", default=[], help="only this kind (repeat)")
    events.add_argument("--count", type=int, default=100, help="the newest this many (max 1000)")
    events.set_defaults(func=cmd_events)
