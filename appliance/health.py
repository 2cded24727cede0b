"""What is up and what is down: the board the heartbeat is read from.

Each component (the state store, the bus, later the on-prem I/O manager and
the cloud cache) reports ``ok`` or ``failed`` as it notices; components that
report periodically are marked failed when they have been silent for longer
than their timeout. The appliance is Ready when every required component is ok, or
*degraded* within what it tolerates (``degraded``: the WAN link down for less than its
threshold is listed so, and is neither down nor failed).
Waiters (the bus pausing intake while Redis is down) wait on an event, never poll.

For recovery (appliance/service/repair.py marks, the recovery reads):
``failed_since(name)`` is when a component turned failed (None while it is not),
``unrepairable(name)`` whether its repair gave up before it came back (the reason in
``unrepairable_reason``), and ``wait_unrepairable(name)`` wakes when it does. Both are
cleared when the component is ok again.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import datetime

from appliance.clock import Clock
from messages.events import ComponentState, ComponentStatus


@dataclass(frozen=True, slots=True)
class ComponentHealth:
    name: str
    state: ComponentState
    detail: str
    required: bool
    last_ok_at: datetime | None
    timeout_s: float | None  # silent longer than this: failed
    registered_at: datetime | None = None
    failed_at: datetime | None = None  # when it last turned failed (None while not failed)
    unrepairable: str = ""  # why its repair gave up (empty: not given up), until it is ok
    tolerated: bool = False
    """Degraded but within its threshold (the WAN link down for less than it): shown in
    the component list, not counted against Ready, not a failure."""

    @property
    def counts_down(self) -> bool:
        """Required and not ok (a tolerated degradation is not down)."""
        return self.required and self.state is not ComponentState.OK and not self.tolerated

    def as_status(self) -> ComponentStatus:
        return ComponentStatus(
            name=self.name,
            state=self.state,
            detail=self.detail,
            last_ok_at=self.last_ok_at,
            required=self.required,
        )


NOT_READY_PREFIX = "Services not ready or down "
"""HDM's wording, followed by the comma-separated names of the components down."""


def not_ready_line(down: Sequence[str]) -> str:
    return NOT_READY_PREFIX + ", ".join(down)


Changed = Callable[[ComponentHealth, ComponentHealth], None]


class HealthBoard:
    def __init__(self, clock: Clock) -> None:
        self._clock = clock
        self._components: dict[str, ComponentHealth] = {}
        self._ok_events: dict[str, asyncio.Event] = {}
        self._gave_up: dict[str, asyncio.Event] = {}
        self._listeners: list[Changed] = []

    def subscribe(self, listener: Changed) -> None:
        """Call ``listener(before, after)`` on every change of a component's state."""
        self._listeners.append(listener)

    def _set(self, after: ComponentHealth) -> None:
        before = self._components[after.name]
        self._components[after.name] = after
        if before.state is not after.state:
            for listener in self._listeners:
                listener(before, after)

    def unsubscribe(self, listener: Changed) -> None:
        with contextlib.suppress(ValueError):
            self._listeners.remove(listener)

    def names(self) -> tuple[str, ...]:
        return tuple(self._components)

    def register(self, name: str, *, required: bool = True, timeout_s: float | None = None) -> None:
        self._components[name] = ComponentHealth(
            name, ComponentState.DEGRADED, "starting", required, None, timeout_s, self._clock.now()
        )
        self._ok_events[name] = asyncio.Event()
        self._gave_up[name] = asyncio.Event()

    def ok(self, name: str, detail: str = "") -> None:
        component = self._components[name]
        now = self._clock.now()
        self._set(
            replace(
                component,
                state=ComponentState.OK,
                detail=detail,
                last_ok_at=now,
                failed_at=None,
                unrepairable="",
                tolerated=False,
            )
        )
        self._ok_events[name].set()
        self._gave_up[name].clear()

    def degraded(self, name: str, detail: str) -> None:
        """Not working, but within the time it is allowed to be down: shown as degraded,
        while the appliance stays Ready (what needs it waits or retries)."""
        component = self._components[name]
        self._set(replace(component, state=ComponentState.DEGRADED, detail=detail, tolerated=True))
        self._ok_events[name].clear()

    def failed(self, name: str, detail: str) -> None:
        component = self._components[name]
        # Not seen yet since we started, and its timeout not up: starting, not failed.
        state = ComponentState.FAILED if self.settled(name) else ComponentState.DEGRADED
        failed_at = component.failed_at
        if state is ComponentState.FAILED and failed_at is None:
            failed_at = self._clock.now()
        self._set(
            replace(component, state=state, detail=detail, failed_at=failed_at, tolerated=False)
        )
        self._ok_events[name].clear()

    def failed_since(self, name: str) -> datetime | None:
        """When the component turned failed; None while it is not failed."""
        component = self._components[name]
        return component.failed_at if component.state is ComponentState.FAILED else None

    def mark_unrepairable(self, name: str, reason: str) -> None:
        """Its repair gave up (the deadline passed): recovery may take its VMs home. The
        heartbeat's line for it says so; cleared when it is ok again."""
        component = self._components[name]
        self._set(replace(component, unrepairable=reason, detail=f"unrepairable: {reason}"))
        self._gave_up[name].set()

    def unrepairable(self, name: str) -> bool:
        return bool(self._components[name].unrepairable)

    def unrepairable_reason(self, name: str) -> str:
        return self._components[name].unrepairable

    async def wait_unrepairable(self, name: str) -> None:
        await self._gave_up[name].wait()

    def is_ok(self, name: str) -> bool:
        return self._components[name].state is ComponentState.OK

    def is_failed(self, name: str) -> bool:
        return self._components[name].state is ComponentState.FAILED

    def settled(self, name: str) -> bool:
        """Seen ok once, or registered longer ago than its timeout: a failure is a failure."""
        c = self._components[name]
        if c.last_ok_at is not None or c.timeout_s is None or c.registered_at is None:
            return True
        return (self._clock.now() - c.registered_at).total_seconds() > c.timeout_s

    async def wait_ok(self, name: str) -> None:
        await self._ok_events[name].wait()

    def expire_silent(self) -> list[str]:
        """Mark components silent past their timeout as failed; return their names."""
        now = self._clock.now()
        expired = []
        for component in self._components.values():
            if component.timeout_s is None or component.state is ComponentState.FAILED:
                continue
            silent_since = component.last_ok_at or component.registered_at
            if (
                silent_since is not None
                and (now - silent_since).total_seconds() > component.timeout_s
            ):
                self.failed(component.name, f"no heartbeat for {component.timeout_s:.0f}s")
                expired.append(component.name)
        return expired

    @property
    def ready(self) -> bool:
        return not any(c.counts_down for c in self._components.values())

    def down(self) -> tuple[str, ...]:
        """The required components that are not ok, in registration order."""
        return tuple(c.name for c in self._components.values() if c.counts_down)

    def details(self) -> tuple[str, ...]:
        """One line per required component that is not ok, naming it."""
        return tuple(
            f"{c.name}: {c.detail or c.state.value}"
            for c in self._components.values()
            if c.counts_down
        )

    def summary(self) -> tuple[str, ...]:
        """Why not Ready: HDM's line naming every component down, then one line each."""
        down = self.down()
        return (not_ready_line(down), *self.details()) if down else ()

    def statuses(self) -> tuple[ComponentStatus, ...]:
        return tuple(c.as_status() for c in self._components.values())
