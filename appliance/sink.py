"""How progress and answers travel up without an upward import.

The bus's publisher implements :class:`EventSink`; it is handed down at
startup to the dispatcher and the orchestrator, which only know this protocol.
"""

from __future__ import annotations

from typing import Protocol

from messages.events import Event


class EventSink(Protocol):
    async def publish(self, event: Event) -> None:
        """Sign and send ``event`` on the response queue (retried at the edge)."""
        ...


class MemorySink:
    """Collects events in memory: for unit tests and for tools that run in-process."""

    def __init__(self) -> None:
        self.events: list[Event] = []

    async def publish(self, event: Event) -> None:
        self.events.append(event)
