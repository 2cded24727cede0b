"""The embedded default's supervisor: component processes as children, restarted when they exit.

In production each component (cloud cache, on-prem I/O manager) runs as a
service on its own host (a systemd unit; see appliance/components/README.md).
In the embedded default the appliance runs them itself: :class:`Supervisor`
starts each as an asyncio subprocess in its own session (so a terminal's Ctrl-C
reaches the appliance only, which then stops them in order), restarts one that
exits after a backoff that doubles while it keeps failing quickly (counted and
logged), and at shutdown stops each by its PID: SIGTERM, then SIGKILL after a
grace period.

For repair (appliance/service/repair.py): :meth:`Supervisor.restart` kills a child that
is alive but failed (hung, stopped) and starts a new one without waiting for the
backoff; a child whose NBD server was bound to port 0 is restarted on the address it had
(:meth:`Supervisor.keep_address`), so the cloud VMs' disks (``nbd://HOST:PORT/...``) and
the cache's upstream still point at it. :class:`ComponentWatch` marks a component failed
at once when the child that was beating exits (the supervisor tells it), rather than
after the heartbeat timeout, and takes no later beat of that dead process for a recovery.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import sys
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from appliance.components.heartbeat import ComponentHealth, ComponentReport, Liveness
from appliance.components.orders import ComponentId
from appliance.errors import StateStoreUnavailable
from appliance.health import HealthBoard
from appliance.logs import get_logger
from appliance.settings import Settings
from appliance.state.store import StateStore
from appliance.waiting import first_of

log = get_logger(__name__)


NBD_BIND_FLAG = "--nbd-bind"
ZSTD_BIND_ENV = "FERRY_LINK_ZSTD_BIND"
DEFAULT_ZSTD_BIND = "127.0.0.1:0"  # Settings.link_zstd_bind's default
DATA_DIR_FLAG = "--data-dir"


@dataclass(frozen=True, slots=True)
class ComponentCommand:
    """How to start one component process."""

    instance: ComponentId
    argv: tuple[str, ...]
    env: Mapping[str, str]
    log_file: Path
    cwd: Path | None = None

    @property
    def nbd_bind(self) -> str | None:
        argv = self.argv
        at = argv.index(NBD_BIND_FLAG) if NBD_BIND_FLAG in argv else -1
        return argv[at + 1] if 0 <= at < len(argv) - 1 else None

    def runs_as(self, pid: int) -> bool:
        """Is ``pid`` a process of this component on this host (a child of an appliance
        before us, left serving): ``component`` with this data directory in its argv?"""
        at = self.argv.index(DATA_DIR_FLAG) if DATA_DIR_FLAG in self.argv else -1
        if at < 0 or at + 1 >= len(self.argv):
            return False
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            return False
        wanted = (b"component", os.fsencode(self.argv[at + 1]))
        return all(part in argv for part in wanted)

    def bound_to(self, address: str) -> ComponentCommand:
        """The same command with its NBD server on ``address`` (HOST:PORT)."""
        argv = list(self.argv)
        argv[argv.index(NBD_BIND_FLAG) + 1] = address
        return replace(self, argv=tuple(argv))


def component_command(
    instance: ComponentId,
    *,
    data_dir: Path,
    nbd_bind: str,
    env: Mapping[str, str],
    log_file: Path,
    extra: Sequence[str] = (),
    cwd: Path | None = None,
) -> ComponentCommand:
    """``python -m appliance.cli component KIND --name NAME ...`` with this interpreter."""
    argv = (
        sys.executable, "-m", "appliance.cli", "component", instance.kind,
        "--name", instance.name,
        DATA_DIR_FLAG, str(data_dir),
        NBD_BIND_FLAG, nbd_bind,
        *extra,
    )  # fmt: skip
    return ComponentCommand(instance, argv, dict(env), log_file, cwd)


def _same_any_port(bind: str, address: str) -> bool:
    """Did ``bind`` (HOST:0) ask for any free port, on the host ``address`` is on?"""
    host, _, port = address.rpartition(":")
    if not bind.endswith(":0") or not host or not port.isdigit():
        return False
    return bind.rpartition(":")[0] in ("", host)


Exited = Callable[[ComponentId, int, int], None]
"""Told ``(instance, pid, exit code)`` each time a child exits, before it is restarted."""


@dataclass(slots=True)
class _Child:
    command: ComponentCommand
    process: asyncio.subprocess.Process | None = None
    starts: int = 0
    restarts: int = 0
    exit_codes: list[int] = field(default_factory=list)
    backoffs: list[float] = field(default_factory=list)
    started_at: float = 0.0  # loop time of the last start
    now: asyncio.Event = field(default_factory=asyncio.Event)  # restart without the backoff


class Supervisor:
    def __init__(
        self,
        commands: Sequence[ComponentCommand],
        *,
        backoff_s: float,
        backoff_max_s: float,
        stop_grace_s: float = 10.0,
        stable_after_s: float = 30.0,
        keep_serving: Callable[[], Awaitable[bool]] | None = None,
        on_exit: Exited | None = None,
    ) -> None:
        self._children = {str(c.instance): _Child(c) for c in commands}
        self._keep_serving = keep_serving
        self._on_exit = on_exit
        self._backoff_s = backoff_s
        self._backoff_max_s = max(backoff_s, backoff_max_s)
        self._grace_s = stop_grace_s
        self._stable_after_s = stable_after_s
        self._changed = asyncio.Condition()

    def pid(self, instance: ComponentId) -> int | None:
        process = self._children[str(instance)].process
        return process.pid if process is not None and process.returncode is None else None

    def restarts(self, instance: ComponentId) -> int:
        return self._children[str(instance)].restarts

    def exit_codes(self, instance: ComponentId) -> list[int]:
        return list(self._children[str(instance)].exit_codes)

    def backoffs(self, instance: ComponentId) -> list[float]:
        """The backoff waited before each restart so far."""
        return list(self._children[str(instance)].backoffs)

    def command(self, instance: ComponentId) -> ComponentCommand:
        """How the component is started next."""
        return self._children[str(instance)].command

    def keep_address(self, instance: ComponentId, address: str, zstd: str | None = None) -> None:
        """Restart it on ``address`` (its NBD server's HOST:PORT) when its bind asked for any
        free port: the VMs' disks and the cache's upstream point at that address. ``zstd``:
        an I/O manager's compressed listener (``zstd_address``), kept the same way."""
        child = self._children[str(instance)]
        bind = child.command.nbd_bind
        if bind is not None and _same_any_port(bind, address):
            child.command = child.command.bound_to(address)
            log.info("component keeps its address", component=str(instance), address=address)
        zstd_bind = child.command.env.get(ZSTD_BIND_ENV, DEFAULT_ZSTD_BIND)
        if zstd is not None and _same_any_port(zstd_bind, zstd):
            env = {**child.command.env, ZSTD_BIND_ENV: zstd}
            child.command = replace(child.command, env=env)
            log.info("component keeps its zstd address", component=str(instance), address=zstd)

    def restart(
        self,
        instance: ComponentId,
        *,
        started_before: float,
        grace_s: float,
        beating: int | None = None,
    ) -> str | None:
        """A repair: kill the child if it is alive (hung, stopped) and start a new one now,
        or start it now if it exited and waits for its backoff. A child started since
        ``started_before`` (loop time) and younger than ``grace_s`` is left to start: None.
        ``beating``: the pid whose heartbeat went silent, when on this host; not our child
        but a process of this component (left serving by an appliance before us, holding
        its data directory): killed too. Otherwise what was done."""
        child = self._children[str(instance)]
        process = child.process
        ours = process.pid if process is not None else None
        if beating is not None and beating != ours and child.command.runs_as(beating):
            with contextlib.suppress(ProcessLookupError):
                os.kill(beating, signal.SIGKILL)
            child.now.set()
            log.warning("component killed for repair", component=str(instance), pid=beating)
            return f"killed pid {beating} (left by an earlier appliance, not beating)"
        age = asyncio.get_running_loop().time() - child.started_at
        if process is not None and process.returncode is None:
            if child.started_at >= started_before and age < grace_s:
                return None
            with contextlib.suppress(ProcessLookupError):
                os.kill(process.pid, signal.SIGKILL)
            child.now.set()
            log.warning("component killed for repair", component=str(instance), pid=process.pid)
            return f"killed pid {process.pid} (alive, not beating) and restarted it"
        child.now.set()
        code = child.exit_codes[-1] if child.exit_codes else None
        return f"restarted it (it had exited with code {code})"

    async def wait_exits(self, instance: ComponentId, count: int, *, timeout_s: float) -> None:
        """Until the component has exited ``count`` times."""
        child = self._children[str(instance)]
        async with asyncio.timeout(timeout_s), self._changed:
            await self._changed.wait_for(lambda: len(child.exit_codes) >= count)

    async def wait_running(
        self, instance: ComponentId, *, not_pid: int | None = None, timeout_s: float
    ) -> int:
        """The PID of the running process (one other than ``not_pid``), once there is one."""

        def running() -> bool:
            pid = self.pid(instance)
            return pid is not None and pid != not_pid

        async with asyncio.timeout(timeout_s), self._changed:
            await self._changed.wait_for(running)
        pid = self.pid(instance)
        assert pid is not None
        return pid

    async def run(self, stop: asyncio.Event) -> None:
        """Keep every component running until ``stop``; then stop them all by PID."""
        async with asyncio.TaskGroup() as tasks:
            for child in self._children.values():
                tasks.create_task(self._keep(child, stop))

    async def _keep(self, child: _Child, stop: asyncio.Event) -> None:
        loop = asyncio.get_running_loop()
        backoff = self._backoff_s
        bound = log.bind(component=str(child.command.instance))
        while not stop.is_set():
            process = await self._start(child)
            started_at = child.started_at
            try:
                stopped = await first_of(process.wait(), stop=stop) is None
            except BaseException:
                await self._stop(process, grace_s=0.0)
                raise
            if stopped:
                if await self._must_keep_serving():
                    bound.warning("left running at stop: VMs run on it", pid=process.pid)
                    return
                await self._stop(process, grace_s=self._grace_s)
                await self._notify()
                return
            code = process.returncode
            if loop.time() - started_at >= self._stable_after_s:
                backoff = self._backoff_s
            child.exit_codes.append(code if code is not None else 0)
            child.restarts += 1
            child.backoffs.append(backoff)
            if self._on_exit is not None:
                self._on_exit(child.command.instance, process.pid, child.exit_codes[-1])
            await self._notify()
            bound.warning("component exited; restarting", code=code, restarts=child.restarts,
                          backoff_s=backoff)  # fmt: skip
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(first_of(stop.wait(), child.now.wait()), timeout=backoff)
            backoff = min(backoff * 2, self._backoff_max_s)

    async def _must_keep_serving(self) -> bool:
        """At a clean stop: do VMs still run on the components (their disks served)? Then
        they are left running (in their own sessions); the next appliance finds them busy
        with their data directories and retries until they exit. Unknown counts as yes."""
        if self._keep_serving is None:
            return False
        try:
            return await self._keep_serving()
        except StateStoreUnavailable:
            return True

    async def _start(self, child: _Child) -> asyncio.subprocess.Process:
        command = child.command
        command.log_file.parent.mkdir(parents=True, exist_ok=True)
        with command.log_file.open("ab") as output:
            process = await asyncio.create_subprocess_exec(
                *command.argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=output,
                stderr=output,
                env=dict(command.env),
                cwd=command.cwd,
                start_new_session=True,
            )
        child.process = process
        child.started_at = asyncio.get_running_loop().time()
        child.starts += 1
        child.now.clear()
        log.info("component started", component=str(command.instance), pid=process.pid)
        await self._notify()
        return process

    async def _stop(self, process: asyncio.subprocess.Process, *, grace_s: float) -> None:
        """SIGTERM (and SIGCONT, should it be stopped), SIGKILL after the grace; reaped."""
        if process.returncode is None and grace_s > 0:
            with contextlib.suppress(ProcessLookupError):
                os.kill(process.pid, signal.SIGTERM)
                os.kill(process.pid, signal.SIGCONT)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(process.wait()), timeout=grace_s)
        if process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(process.pid, signal.SIGKILL)
        await process.wait()
        log.info("component stopped", pid=process.pid, code=process.returncode)

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()


WATCH_STEP_S = 2.0
"""How often a component watch looks up from its blocking reads to see if it should stop."""


class ComponentWatch:
    """Feeds the appliance's health board from component heartbeats: each component is a
    required part of the appliance, ok while it beats, failed when silent for the timeout
    or (a child of ours) when the process that was beating exits."""

    def __init__(
        self,
        reader: ComponentHealth,
        board: HealthBoard,
        instances: Sequence[ComponentId],
        supervisor: Supervisor | None = None,
    ) -> None:
        self._reader = reader
        self._board = board
        self._supervisor = supervisor
        self.instances = tuple(instances)
        self._beating: dict[ComponentId, int] = {}  # the pid of its last ok heartbeat
        self._dead: dict[ComponentId, int] = {}  # the pid that beat, then exited
        self._hosts: dict[ComponentId, str] = {}
        for instance in self.instances:
            board.register(str(instance), timeout_s=reader.timeout_s)

    def beating_pid(self, instance: ComponentId) -> int | None:
        """The pid of its last ok heartbeat, when that process runs on this host."""
        pid = self._beating.get(instance)
        return pid if self._hosts.get(instance) == socket.gethostname() else None

    def exited(self, instance: ComponentId, pid: int, code: int) -> None:
        """A child exited: failed now, if it is the process that was beating (not one that
        found its data directory busy: another process of it still serves)."""
        if self._beating.get(instance) != pid:
            return
        self._dead[instance] = pid
        self._board.failed(str(instance), f"pid {pid} exited with code {code}")

    def seen_ok(self, instance: ComponentId, report: ComponentReport) -> None:
        """An ok heartbeat: the component is ok, unless the process that wrote it exited."""
        if report.pid is not None and report.pid == self._dead.get(instance):
            return  # a beat the dead process wrote before it died: not a recovery
        if report.pid is not None:
            self._beating[instance] = report.pid
            self._hosts[instance] = report.host
        address, zstd = report.figures.get("address"), report.figures.get("zstd_address")
        if self._supervisor is not None and isinstance(address, str):
            zstd = zstd if isinstance(zstd, str) else None
            self._supervisor.keep_address(instance, address, zstd)
        self._board.ok(str(instance), f"pid {report.pid} on {report.host}")

    async def run(self, stop: asyncio.Event) -> None:
        async with asyncio.TaskGroup() as tasks:
            for instance in self.instances:
                tasks.create_task(self._follow(instance, stop))

    async def _follow(self, instance: ComponentId, stop: asyncio.Event) -> None:
        last: tuple[object, ...] | None = None

        def changed(report: ComponentReport) -> bool:
            return (report.pid, report.sequence, report.liveness) != last

        while not stop.is_set():
            try:
                report = await self._reader.wait_until(instance, changed, WATCH_STEP_S)
            except TimeoutError:
                continue
            except StateStoreUnavailable:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), timeout=WATCH_STEP_S)
                continue
            last = (report.pid, report.sequence, report.liveness)
            if report.liveness is Liveness.OK:
                self.seen_ok(instance, report)
            else:
                self._board.failed(str(instance), report.detail)


def component_env(settings: Settings, redis_url: str) -> dict[str, str]:
    """A child's environment: ours without the bus token (components never need it), and
    the settings a component reads, from this appliance's settings."""
    env = {k: v for k, v in os.environ.items() if k != "FERRY_BUS_TOKEN"}
    return env | {
        "FERRY_REDIS_URL": redis_url,
        "FERRY_REDIS_PREFIX": settings.redis_prefix,
        "FERRY_DATA_DIR": str(settings.data_dir),
        "FERRY_COMPONENT_HEARTBEAT_INTERVAL_S": str(settings.component_heartbeat_interval_s),
        "FERRY_COMPONENT_TIMEOUT_S": str(settings.component_timeout_s),
        "FERRY_COMPONENT_RECONCILE_INTERVAL_S": str(settings.component_reconcile_interval_s),
        "FERRY_COMPONENT_RUNTIME": settings.component_runtime,
        "FERRY_COMPONENT_METRICS_BIND": settings.component_metrics_bind,
        "FERRY_TEST_MODE": "1" if settings.test_mode else "0",
        "FERRY_LOG_LEVEL": settings.log_level,
        "FERRY_LOG_FORMAT": settings.log_format,
        # The cache's misses wait for the WAN link as long as the appliance tolerates it.
        "FERRY_WAN_DOWN_THRESHOLD_S": str(settings.wan_down_threshold_s),
    }


class EmbeddedComponents:
    """The components named by ``FERRY_EMBEDDED_COMPONENTS``, supervised and watched."""

    def __init__(
        self,
        settings: Settings,
        redis_url: str,
        store: StateStore,
        board: HealthBoard,
        keep_serving: Callable[[], Awaitable[bool]] | None = None,
    ) -> None:
        names = [n for n in settings.embedded_components.split(",") if n]
        instances = [ComponentId.parse(name) for name in names]
        env = component_env(settings, redis_url)
        data_dir = settings.data_dir.resolve()
        commands = [
            component_command(
                instance,
                data_dir=data_dir / "components" / instance.kind / instance.name,
                nbd_bind=settings.component_nbd_bind,
                env=env,
                log_file=data_dir / "logs" / f"{instance.kind}-{instance.name}.log",
            )
            for instance in instances
        ]
        self.supervisor = Supervisor(
            commands,
            backoff_s=settings.component_restart_backoff_s,
            backoff_max_s=settings.component_restart_backoff_max_s,
            keep_serving=keep_serving,
            on_exit=self._exited,
        )
        self.watch = ComponentWatch(
            ComponentHealth(store, settings.component_timeout_s),
            board,
            instances,
            self.supervisor,
        )

    def _exited(self, instance: ComponentId, pid: int, code: int) -> None:
        self.watch.exited(instance, pid, code)

    async def run(self, stop: asyncio.Event) -> None:
        async with asyncio.TaskGroup() as tasks:
            tasks.create_task(self.supervisor.run(stop))
            tasks.create_task(self.watch.run(stop))
