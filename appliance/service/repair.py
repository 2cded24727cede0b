"""Repair: a component the health board marks failed is restarted, with backoff, until it
beats again or its repair deadline passes; then it is *unrepairable*.

Who repairs what (:func:`repair_ways`):

* an embedded component (a child of the appliance): :class:`ChildRestart`. The supervisor
  already restarts a child that exits; an attempt kills a child that is alive but failed
  (hung, SIGSTOPped: silent past the timeout) and starts a new one without waiting for the
  supervisor's backoff, and starts one that exited at once. A child started since the
  failure and younger than the component timeout is left to start (no attempt yet).
* a component on its own host (``remote_components``): :class:`CommandRestart` runs
  ``component_repair_command``, an argv template (split like a shell would, run without
  one) with ``{kind}``, ``{name}`` and ``{instance}``; its exit code and the tail of its
  output (known secrets cut out) go to the log and the event. No command configured:
  nothing is attempted (the host's service manager restarts it), the deadline still holds.
* the embedded state store (``state_store``: the appliance's own redis-server):
  :class:`RedisRestart` starts it again on its port and data directory.

One repair, by :class:`Repairer`: the board marks X failed → attempt 1 at once → wait up
to ``component_repair_backoff_s`` for X to be ok → attempt 2 → ... the wait doubling up
to ``component_repair_backoff_max_s``. X ok again: *repaired* (attempts, seconds since it
failed). ``component_repair_timeout_s`` after it failed and not ok: *gave up*; the board
marks it unrepairable (``HealthBoard.unrepairable``, ``failed_since``,
``wait_unrepairable``: what the recovery reads) and no more attempts are made; a later
recovery by itself clears it.

Events (kinds in :class:`~appliance.service.health.HealthEvent`, in the global stream,
in order with ``component_failed`` and ``component_recovered``):
``component_repair_started`` (component, attempt, action, exit_code, output: written
once the attempt has run, so after ``component_recovered`` if it was back meanwhile),
``component_repaired`` (component, attempts, seconds), ``component_repair_gave_up``
(component, attempts, seconds, reason). :class:`RepairCounts` feeds the metrics.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shlex
import signal
import tempfile
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import IO, Protocol

from appliance.clock import Clock
from appliance.components.orders import ComponentId
from appliance.embedded import RedisServer
from appliance.errors import NotConfigured
from appliance.health import ComponentHealth, HealthBoard
from appliance.logs import SECRETS, get_logger
from appliance.service.components import ComponentWatch, EmbeddedComponents, Supervisor
from appliance.service.health import HealthEvent, watched_elsewhere
from appliance.settings import Settings
from appliance.waiting import first_of
from messages.events import ComponentState

log = get_logger(__name__)
OUTPUT_TAIL = 2000
"""Characters of a repair command's output kept (the end: where errors are)."""


@dataclass(frozen=True, slots=True)
class Attempt:
    """What one repair attempt did."""

    action: str
    exit_code: int | None = None  # a command's; None: no command, or it did not finish
    output: str = ""  # the tail of a command's output, secrets cut out


class RepairWay(Protocol):
    """How one part of the board (named as there: ``cache/cache-1``, ``state_store``) is
    repaired."""

    def begin(self, name: str) -> None:
        """A new failure: the next attempt is the first of its repair."""

    async def attempt(self, name: str) -> Attempt | None:
        """Try to bring it back; None when there is nothing to do yet (it is starting)."""


class EventNotes(Protocol):
    def note(self, kind: HealthEvent, component: str, **fields: object) -> None: ...


@dataclass(frozen=True, slots=True)
class RepairPolicy:
    backoff_s: float
    backoff_max_s: float
    timeout_s: float

    @classmethod
    def from_settings(cls, settings: Settings) -> RepairPolicy:
        return cls(
            settings.component_repair_backoff_s,
            max(settings.component_repair_backoff_s, settings.component_repair_backoff_max_s),
            settings.component_repair_timeout_s,
        )


@dataclass(slots=True)
class RepairCounts:
    """Since the appliance started, by board name."""

    failures: Counter[str] = field(default_factory=Counter)
    attempts: Counter[str] = field(default_factory=Counter)
    repaired: Counter[str] = field(default_factory=Counter)
    gave_up: Counter[str] = field(default_factory=Counter)


@dataclass(slots=True)
class _Episode:
    """One failure of a component and its repair so far."""

    failed_at: datetime
    attempts: int = 0
    backoff_s: float = 0.0
    last: str = "none"
    begun: bool = False
    attempting: bool = False
    done: bool = False  # ok again, or given up
    repaired_s: float | None = None  # ok again this long after it failed


class Repairer:
    """Repairs the components it is given when the board marks them failed."""

    def __init__(
        self, board: HealthBoard, notes: EventNotes, clock: Clock, policy: RepairPolicy
    ) -> None:
        self._board = board
        self._notes = notes
        self._clock = clock
        self._policy = policy
        self._ways: dict[str, RepairWay | None] = {}
        self._episodes: dict[str, _Episode] = {}
        self._kicks: dict[str, asyncio.Event] = {}
        self._failed: asyncio.Queue[str] = asyncio.Queue()
        self._active: set[str] = set()
        self.counts = RepairCounts()
        board.subscribe(self._changed)

    def watch(self, part: ComponentId | str, way: RepairWay | None) -> None:
        """Repair ``part`` by ``way`` (None: nothing to attempt, only the deadline)."""
        name = str(part)
        self._ways[name] = way
        self._kicks[name] = asyncio.Event()
        if self._board.is_failed(name):
            self._begin(name)

    def _begin(self, name: str) -> None:
        failed_at = self._board.failed_since(name) or self._clock.now()
        self._episodes[name] = _Episode(failed_at, backoff_s=self._policy.backoff_s)
        self._failed.put_nowait(name)

    def _changed(self, before: ComponentHealth, after: ComponentHealth) -> None:
        """Called by the board, after the events' listener: a failure's event, then its
        repair's; the recovery's, then the repaired one."""
        name = after.name
        if after.state is ComponentState.FAILED:
            self.counts.failures[name] += 1
        if name not in self._ways:
            return
        self._kicks[name].set()
        episode = self._episodes.get(name)
        if after.state is ComponentState.FAILED and (episode is None or episode.done):
            self._begin(name)
        elif after.state is ComponentState.OK and episode is not None and not episode.done:
            episode.done = True
            episode.repaired_s = (self._clock.now() - episode.failed_at).total_seconds()
            if episode.attempts and not episode.attempting:
                self._repaired(name, episode.attempts, episode.repaired_s)

    async def run(self, stop: asyncio.Event) -> None:
        async with asyncio.TaskGroup() as tasks:
            while not stop.is_set():
                name = await first_of(self._failed.get(), stop=stop)
                if name is None:
                    return
                if name not in self._active:
                    self._active.add(name)
                    tasks.create_task(self._repair_one(name, stop))

    async def _repair_one(self, name: str, stop: asyncio.Event) -> None:
        try:
            await self._repair(name, stop)
        finally:
            self._active.discard(name)
            if not stop.is_set() and not self._episodes[name].done:
                self._failed.put_nowait(name)  # failed again as this run ended

    async def _repair(self, name: str, stop: asyncio.Event) -> None:
        way = self._ways[name]
        kick = self._kicks[name]
        while not stop.is_set():
            kick.clear()
            episode = self._episodes[name]
            if episode.done:
                return
            elapsed = (self._clock.now() - episode.failed_at).total_seconds()
            remaining = self._policy.timeout_s - elapsed
            if remaining <= 0:
                self._give_up(name, episode, elapsed)
                return
            if way is not None and not episode.begun:
                way.begin(name)
            episode.begun = True
            wait = min(self._policy.backoff_s, remaining)
            done = await self._attempt(name, way, episode)
            if done is not None:
                wait = min(episode.backoff_s, remaining)
                episode.backoff_s = min(episode.backoff_s * 2, self._policy.backoff_max_s)
            await first_of(kick.wait(), self._clock.sleep(wait), stop=stop)

    async def _attempt(self, name: str, way: RepairWay | None, episode: _Episode) -> Attempt | None:
        if way is None:
            return None
        episode.attempting = True
        try:
            done = await way.attempt(name)
        finally:
            episode.attempting = False
        if done is not None:
            episode.attempts += 1
            episode.last = done.action
            self._attempted(name, episode.attempts, done)
        if episode.repaired_s is not None and episode.attempts:
            self._repaired(name, episode.attempts, episode.repaired_s)  # back meanwhile
        return done

    def _attempted(self, name: str, attempt: int, done: Attempt) -> None:
        self.counts.attempts[name] += 1
        log.warning(
            "component repair attempt",
            component=name,
            attempt=attempt,
            action=done.action,
            exit_code=done.exit_code,
            output=done.output,
        )
        self._notes.note(
            HealthEvent.COMPONENT_REPAIR_STARTED,
            name,
            attempt=attempt,
            action=done.action,
            exit_code=done.exit_code,
            output=done.output,
        )

    def _repaired(self, name: str, attempts: int, seconds: float) -> None:
        self.counts.repaired[name] += 1
        log.info("component repaired", component=name, attempts=attempts, seconds=seconds)
        self._notes.note(
            HealthEvent.COMPONENT_REPAIRED, name, attempts=attempts, seconds=round(seconds, 3)
        )

    def _give_up(self, name: str, episode: _Episode, seconds: float) -> None:
        episode.done = True
        reason = (
            f"not back {seconds:.1f}s after it failed (repair timeout "
            f"{self._policy.timeout_s:g}s) after {episode.attempts} repair attempts "
            f"(last: {episode.last})"
        )
        self.counts.gave_up[name] += 1
        log.error("component repair gave up", component=name, reason=reason)
        self._board.mark_unrepairable(name, reason)
        self._notes.note(
            HealthEvent.COMPONENT_REPAIR_GAVE_UP,
            name,
            attempts=episode.attempts,
            seconds=round(seconds, 3),
            reason=reason,
        )


class ChildRestart:
    """The embedded default: the supervisor kills and restarts the child."""

    def __init__(self, supervisor: Supervisor, watch: ComponentWatch, grace_s: float) -> None:
        self._supervisor = supervisor
        self._watch = watch
        self._grace_s = grace_s  # a new child this young is still starting
        self._since: dict[ComponentId, float] = {}

    def begin(self, name: str) -> None:
        self._since[ComponentId.parse(name)] = asyncio.get_running_loop().time()

    async def attempt(self, name: str) -> Attempt | None:
        instance = ComponentId.parse(name)
        since = self._since.get(instance, asyncio.get_running_loop().time())
        action = self._supervisor.restart(
            instance,
            started_before=since,
            grace_s=self._grace_s,
            beating=self._watch.beating_pid(instance),
        )
        return Attempt(action) if action is not None else None


class CommandRestart:
    """Production: a configured command restarts the component (``systemctl restart``
    over ssh, a cloud API call...). Run without a shell, in its own session, with the
    appliance's environment less the bus token, for at most ``timeout_s``."""

    def __init__(self, template: str, *, timeout_s: float, env: Mapping[str, str]) -> None:
        try:
            self._template = tuple(shlex.split(template))
        except ValueError as error:
            raise NotConfigured("FERRY_COMPONENT_REPAIR_COMMAND", str(error)) from None
        if not self._template:
            raise NotConfigured("FERRY_COMPONENT_REPAIR_COMMAND", "empty")
        try:
            self.argv(ComponentId("cache", "check"))
        except (KeyError, IndexError, ValueError) as error:
            reason = f"only {{kind}}, {{name}} and {{instance}} may be filled in: {error!r}"
            raise NotConfigured("FERRY_COMPONENT_REPAIR_COMMAND", reason) from None
        self._timeout_s = timeout_s
        self._env = {k: v for k, v in env.items() if k != "FERRY_BUS_TOKEN"}

    def argv(self, instance: ComponentId) -> tuple[str, ...]:
        fill = {"kind": instance.kind, "name": instance.name, "instance": str(instance)}
        return tuple(part.format(**fill) for part in self._template)

    def begin(self, name: str) -> None:
        pass  # every attempt runs the command

    async def attempt(self, name: str) -> Attempt:
        argv = self.argv(ComponentId.parse(name))
        action = SECRETS.scrub(f"ran {shlex.join(argv)}")
        # Its output goes to a file, not a pipe: a process it leaves running (the
        # component it started) may keep its output open; the command's exit is the end.
        with tempfile.TemporaryFile() as output:
            try:
                process = await asyncio.create_subprocess_exec(
                    *argv,
                    stdin=asyncio.subprocess.DEVNULL,
                    stdout=output,
                    stderr=output,
                    env=self._env,
                    start_new_session=True,
                )
            except OSError as error:
                return Attempt(action, None, SECRETS.scrub(f"{type(error).__name__}: {error}"))
            try:
                code: int | None = await asyncio.wait_for(process.wait(), self._timeout_s)
            except TimeoutError:
                code = None
                _kill_group(process.pid)
                await process.wait()
            text = await asyncio.to_thread(_tail, output)
        if code is None:
            text += f"\n(killed: still running after {self._timeout_s:g}s)"
        return Attempt(action, code, SECRETS.scrub(text))


def _tail(output: IO[bytes]) -> str:
    output.seek(0, os.SEEK_END)
    size = output.tell()
    output.seek(max(0, size - 4 * OUTPUT_TAIL))
    return output.read().decode("utf-8", "replace")[-OUTPUT_TAIL:]


def _kill_group(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


class RedisRestart:
    """The embedded state store (``state_store``): the appliance's redis-server child,
    started again on its port and data directory (its append-only file brings the data
    back: a SIGKILL loses nothing written). One that runs but does not answer is killed
    only once failed for ``grace_s`` (the component timeout): a blip is not a failure."""

    STATE_STORE = "state_store"

    def __init__(
        self, redis: RedisServer, board: HealthBoard, clock: Clock, grace_s: float
    ) -> None:
        self._redis = redis
        self._board = board
        self._clock = clock
        self._grace_s = grace_s

    def begin(self, name: str) -> None:
        pass

    async def attempt(self, name: str) -> Attempt | None:
        redis, pid = self._redis, self._redis.pid
        code = redis.exit_code
        if pid is not None and code is None:
            since = self._board.failed_since(name)
            if since is None or (self._clock.now() - since).total_seconds() < self._grace_s:
                return None
            redis.kill()
            action = f"killed redis-server pid {pid} (running, not answering) and restarted it"
        else:
            action = f"restarted redis-server (it had exited with code {code})"
        try:
            await redis.start()
        except (OSError, RuntimeError) as error:
            return Attempt(action, None, SECRETS.scrub(f"{type(error).__name__}: {error}"))
        log.warning("state store restarted", pid=redis.pid, port=redis.port)
        return Attempt(action)


def repair_ways(
    settings: Settings,
    embedded: EmbeddedComponents | None,
    redis: RedisServer | None = None,
    board: HealthBoard | None = None,
    clock: Clock | None = None,
) -> list[tuple[str, RepairWay | None]]:
    """Each part and how it is repaired: the embedded components by their supervisor,
    the remote ones by the repair command (none configured: no attempt), the embedded
    state store (``redis``, with the ``board`` and ``clock``) by starting it again."""
    ways: list[tuple[str, RepairWay | None]] = []
    if redis is not None and board is not None and clock is not None:
        grace = settings.component_timeout_s
        ways.append((RedisRestart.STATE_STORE, RedisRestart(redis, board, clock, grace)))
    if embedded is not None:
        child: RepairWay | None = ChildRestart(
            embedded.supervisor, embedded.watch, settings.component_timeout_s
        )
        ways += [
            (str(instance), child if settings.component_repair else None)
            for instance in embedded.watch.instances
        ]
    remote: Sequence[ComponentId] = watched_elsewhere(settings)
    command = (
        CommandRestart(
            settings.component_repair_command,
            timeout_s=settings.component_repair_command_timeout_s,
            env=os.environ,
        )
        if settings.component_repair and settings.component_repair_command and remote
        else None
    )
    ways += [(str(instance), command) for instance in remote]
    return ways
