"""How progress and answers travel up without an upward import.

The bus's publisher implements :class:`EventSink`; it is handed down at
startup to the dispatcher and the orchestrator, which only know this protocol.
An answer names where it goes by the ``reply_to`` of the command it answers
(None: the shared response queue); the publisher checks that destination.
"""

from __future__ import annotations

from typing import Protocol

from messages.events import Event


class EventSink(Protocol):
    async def publish(self, event: Event, reply_to: str | None = None) -> None:
        """Sign and send ``event`` to ``reply_to``'s queue if usable, else the shared
        response queue (retried at the edge)."""
        ...


class MemorySink:
    """Collects events in memory: for unit tests and for tools that run in-process."""

    def __init__(self) -> None:
        self.events: list[Event] = []
        self.reply_to: list[str | None] = []  # per event, where it was addressed

    async def publish(self, event: Event, reply_to: str | None = None) -> None:
        self.events.append(event)
        self.reply_to.append(reply_to)
