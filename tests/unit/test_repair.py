"""Repair on the health board (a fake clock, ways of repair that the test controls): attempts
at once and then with a doubling backoff, repaired when the component is ok again, given
up at the deadline (the board says unrepairable, and since when it failed); and the
production repair command run for real: no shell, its exit code, its output without
secrets, a deadline of its own, a child it leaves behind not waited for."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from appliance.clock import FakeClock
from appliance.components.heartbeat import ComponentHealth as HeartbeatReader
from appliance.components.heartbeat import ComponentReport, Liveness
from appliance.components.orders import ComponentId
from appliance.errors import NotConfigured
from appliance.health import HealthBoard
from appliance.logs import MASK, secrets_in_flight
from appliance.service.components import ComponentWatch, Supervisor, component_command
from appliance.service.health import HealthEvent
from appliance.service.repair import Attempt, CommandRestart, Repairer, RepairPolicy
from appliance.state.keys import Keys
from appliance.state.store import StateStore, connect

CACHE = ComponentId("cache", "cache-1")
NAME = str(CACHE)


class SleepWatchingClock(FakeClock):
    """A fake clock that tells the test each time someone starts to sleep on it."""

    def __init__(self) -> None:
        super().__init__()
        self.sleeps: list[float] = []
        self._slept = asyncio.Condition()

    async def sleep(self, seconds: float) -> None:
        async with self._slept:
            self.sleeps.append(seconds)
            self._slept.notify_all()
        await super().sleep(seconds)

    async def until_sleeps(self, count: int) -> None:
        async with asyncio.timeout(10), self._slept:
            await self._slept.wait_for(lambda: len(self.sleeps) >= count)


class Notes:
    def __init__(self) -> None:
        self.events: list[tuple[HealthEvent, str, dict[str, object]]] = []
        self._noted = asyncio.Event()

    def note(self, kind: HealthEvent, component: str, **fields: object) -> None:
        self.events.append((kind, component, fields))
        self._noted.set()

    async def until(self, kind: HealthEvent) -> None:
        async with asyncio.timeout(10):
            while kind not in self.kinds():
                self._noted.clear()
                await self._noted.wait()

    def kinds(self) -> list[HealthEvent]:
        return [kind for kind, _, _ in self.events]


class ScriptedWay:
    """Attempts that do nothing until ``fixes_on``, whose attempt brings the component back
    (as its new process would, by beating); ``deferring`` first answers 'starting'."""

    def __init__(
        self, board: HealthBoard, clock: FakeClock, fixes_on: int = 0, deferring: int = 0
    ) -> None:
        self._board = board
        self._clock = clock
        self._fixes_on = fixes_on
        self._deferring = deferring
        self.begun = 0
        self.at: list[float] = []
        self._tried = asyncio.Event()

    async def until_attempts(self, count: int) -> None:
        async with asyncio.timeout(10):
            while len(self.at) < count:
                self._tried.clear()
                await self._tried.wait()

    def begin(self, name: str) -> None:
        self.begun += 1

    async def attempt(self, name: str) -> Attempt | None:
        if self._deferring:
            self._deferring -= 1
            return None
        self.at.append(self._clock.monotonic())
        self._tried.set()
        if len(self.at) == self._fixes_on:
            self._board.ok(name, "pid 2")
        return Attempt(f"restart {len(self.at)}")


def make_board(clock: FakeClock) -> HealthBoard:
    board = HealthBoard(clock)
    board.register(NAME, timeout_s=5)
    board.ok(NAME, "pid 1")
    return board


@pytest.fixture
async def clock() -> SleepWatchingClock:
    return SleepWatchingClock()


@pytest.fixture
async def stop() -> AsyncIterator[asyncio.Event]:
    stopping = asyncio.Event()
    yield stopping
    stopping.set()


POLICY = RepairPolicy(backoff_s=1.0, backoff_max_s=2.0, timeout_s=5.0)


async def start(
    board: HealthBoard, clock: FakeClock, way: ScriptedWay | None, stop: asyncio.Event
) -> tuple[Repairer, Notes, asyncio.Task[None]]:
    notes = Notes()
    repairer = Repairer(board, notes, clock, POLICY)
    repairer.watch(CACHE, way)
    return repairer, notes, asyncio.create_task(repairer.run(stop))


async def test_a_failed_component_is_restarted_at_once_then_with_doubling_backoff(
    clock: SleepWatchingClock, stop: asyncio.Event
) -> None:
    board = make_board(clock)
    way = ScriptedWay(board, clock, fixes_on=3)
    repairer, notes, task = await start(board, clock, way, stop)
    clock.advance(0.5)
    board.failed(NAME, "no heartbeat for 5s")
    assert board.failed_since(NAME) == clock.now()
    await clock.until_sleeps(1)
    clock.advance(1.0)
    await clock.until_sleeps(2)
    clock.advance(2.0)
    await notes.until(HealthEvent.COMPONENT_REPAIRED)
    stop.set()
    await task
    assert way.begun == 1
    assert way.at == [0.5, 1.5, 3.5]  # at once, after 1 s, after 2 s more
    assert clock.sleeps[:2] == [1.0, 2.0]
    started = [f for k, _, f in notes.events if k is HealthEvent.COMPONENT_REPAIR_STARTED]
    assert [(f["attempt"], f["action"]) for f in started] == [
        (1, "restart 1"),
        (2, "restart 2"),
        (3, "restart 3"),
    ]
    kind, component, fields = notes.events[-1]
    assert (kind, component) == (HealthEvent.COMPONENT_REPAIRED, NAME)
    assert fields == {"attempts": 3, "seconds": 3.0}
    assert board.failed_since(NAME) is None and not board.unrepairable(NAME)
    counts = repairer.counts
    assert (counts.failures[NAME], counts.attempts[NAME], counts.repaired[NAME]) == (1, 3, 1)
    assert counts.gave_up[NAME] == 0


async def test_past_the_deadline_the_repair_gives_up_and_the_board_says_unrepairable(
    clock: SleepWatchingClock, stop: asyncio.Event
) -> None:
    board = make_board(clock)
    way = ScriptedWay(board, clock)  # never fixes it
    repairer, notes, task = await start(board, clock, way, stop)
    board.failed(NAME, "no heartbeat for 5s")
    failed_at = board.failed_since(NAME)
    gave_up = asyncio.create_task(board.wait_unrepairable(NAME))
    for step, seconds in enumerate([1.0, 2.0, 2.0], start=1):
        await clock.until_sleeps(step)
        assert clock.sleeps[-1] == seconds  # the backoff, capped at its max
        clock.advance(seconds)
    async with asyncio.timeout(10):
        await gave_up
    assert way.at == [0.0, 1.0, 3.0]  # at 5.0 the deadline has passed: no fourth attempt
    assert board.unrepairable(NAME) and board.is_failed(NAME)
    assert board.failed_since(NAME) == failed_at  # still failed since the first time
    reason = board.unrepairable_reason(NAME)
    assert "not back 5.0s after it failed" in reason and "3 repair attempts" in reason
    assert "unrepairable" in board.summary()[1]  # the heartbeat's line for it says so
    kind, _, fields = notes.events[-1]
    assert kind is HealthEvent.COMPONENT_REPAIR_GAVE_UP
    assert fields["attempts"] == 3 and fields["seconds"] == 5.0 and fields["reason"] == reason
    assert repairer.counts.gave_up[NAME] == 1 and repairer.counts.repaired[NAME] == 0

    # Back by itself later: ok, no longer unrepairable; a new failure is a new repair.
    board.ok(NAME, "pid 3")
    assert not board.unrepairable(NAME) and board.failed_since(NAME) is None
    clock.advance(10)
    board.failed(NAME, "pid 3 exited with code -9")
    await way.until_attempts(4)
    assert way.begun == 2 and way.at[3] == 15.0
    stop.set()
    await task


async def test_a_starting_component_is_not_restarted_and_no_way_means_only_the_deadline(
    clock: SleepWatchingClock, stop: asyncio.Event
) -> None:
    board = make_board(clock)
    way = ScriptedWay(board, clock, fixes_on=1, deferring=2)
    _, notes, task = await start(board, clock, way, stop)
    board.failed(NAME, "no heartbeat for 5s")
    for step in (1, 2):  # 'still starting' twice: looked at again after the first backoff
        await clock.until_sleeps(step)
        assert clock.sleeps[-1] == 1.0 and way.at == []
        clock.advance(1.0)
    await notes.until(HealthEvent.COMPONENT_REPAIRED)
    assert way.at == [2.0]
    assert notes.events[-1][2] == {"attempts": 1, "seconds": 2.0}
    stop.set()
    await task

    # Nothing to attempt (a remote component, no command): no attempt, no 'repaired' when
    # it comes back by itself, a give-up at the deadline otherwise.
    other = make_board(clock)
    stop_other = asyncio.Event()
    _, quiet, task = await start(other, clock, None, stop_other)
    other.failed(NAME, "no heartbeat for 5s")
    await clock.until_sleeps(len(clock.sleeps) + 1)
    other.ok(NAME, "pid 9")
    await asyncio.wait_for(other.wait_ok(NAME), 10)
    other.failed(NAME, "no heartbeat for 5s")
    for _ in range(5):  # a look each second until the deadline
        await clock.until_sleeps(len(clock.sleeps) + 1)
        clock.advance(1.0)
    await quiet.until(HealthEvent.COMPONENT_REPAIR_GAVE_UP)
    stop_other.set()
    await task
    assert quiet.kinds() == [HealthEvent.COMPONENT_REPAIR_GAVE_UP]
    assert quiet.events[0][2]["attempts"] == 0


# -- the repair command, run for real ------------------------------------------------------------


def python_command(code: str, *args: str) -> str:
    return " ".join([sys.executable, "-c", repr(code), *args])


async def test_the_repair_command_is_filled_in_run_without_a_shell_and_its_output_kept() -> None:
    code = (
        "import os, sys; print('args', sys.argv[1:]); "
        "print('token', os.environ.get('FERRY_BUS_TOKEN', 'absent')); "
        "print('secret', os.environ['SOME_SECRET']); sys.exit(3)"
    )
    template = python_command(code, "{kind}", "{name}", "'{instance}; echo no shell'")
    env = {"FERRY_BUS_TOKEN": "bus-token-value", "SOME_SECRET": "hunter2-value", "PATH": ""}
    command = CommandRestart(template, timeout_s=60, env=env)
    assert command.argv(CACHE)[-3:] == ("cache", "cache-1", "cache/cache-1; echo no shell")
    with secrets_in_flight("hunter2-value"):
        done = await command.attempt(NAME)
    assert done.exit_code == 3
    assert "args ['cache', 'cache-1', 'cache/cache-1; echo no shell']" in done.output
    assert "token absent" in done.output  # the bus token is not passed on
    assert f"secret {MASK}" in done.output and "hunter2" not in done.output
    assert done.action.startswith("ran ") and "cache/cache-1; echo no shell" in done.action


async def test_the_repair_command_has_a_deadline_and_a_child_it_leaves_is_not_waited_for(
    tmp_path: Path,
) -> None:
    hung = CommandRestart(python_command("import time; time.sleep(60)"), timeout_s=0.5, env={})
    done = await hung.attempt(NAME)
    assert done.exit_code is None and "killed: still running after 0.5s" in done.output

    pid_file = tmp_path / "pid"
    leaves = CommandRestart(
        f"sh -c 'sleep 60 & echo $! > {pid_file}; echo started'", timeout_s=60, env={}
    )
    done = await leaves.attempt(NAME)
    pid = int(pid_file.read_text())
    try:
        assert done.exit_code == 0 and "started" in done.output
        Path(f"/proc/{pid}").stat()  # the child it left still runs (and holds its output)
    finally:
        os.kill(pid, signal.SIGKILL)


@pytest.mark.parametrize("template", ["", "restart {host}", "restart '{name}", "x {0}"])
def test_a_bad_repair_command_is_refused_at_startup(template: str) -> None:
    with pytest.raises(NotConfigured) as refused:
        CommandRestart(template, timeout_s=1, env={})
    assert refused.value.setting == "FERRY_COMPONENT_REPAIR_COMMAND"


# -- the supervisor's side: exits, addresses ------------------------------------------------------


def beat(pid: int, address: str = "127.0.0.1:40001") -> ComponentReport:
    return ComponentReport(
        CACHE, Liveness.OK, "", 0.1, pid=pid, host=socket.gethostname(), sequence=pid,
        figures={"address": address, "zstd_address": "127.0.0.1:40002"},
    )  # fmt: skip


async def test_the_exit_of_the_beating_child_is_a_failure_and_its_address_is_kept(
    tmp_path: Path,
) -> None:
    clock = FakeClock()
    board = HealthBoard(clock)
    command = component_command(
        CACHE, data_dir=tmp_path / "c", nbd_bind="127.0.0.1:0", env={}, log_file=tmp_path / "l"
    )
    supervisor = Supervisor([command], backoff_s=1, backoff_max_s=2)
    store = StateStore(connect("redis://127.0.0.1:1/0"), Keys("unused"))  # never called
    watch = ComponentWatch(HeartbeatReader(store, 5), board, [CACHE], supervisor)
    watch.seen_ok(CACHE, beat(10))
    assert board.is_ok(NAME) and watch.beating_pid(CACHE) == 10
    assert supervisor.command(CACHE).nbd_bind == "127.0.0.1:40001"  # restarted there
    assert supervisor.command(CACHE).env["FERRY_LINK_ZSTD_BIND"] == "127.0.0.1:40002"

    watch.exited(CACHE, 11, 1)  # a child that found its data directory busy: not a failure
    assert board.is_ok(NAME)
    watch.exited(CACHE, 10, -9)
    assert board.is_failed(NAME) and board.statuses()[0].detail == "pid 10 exited with code -9"
    watch.seen_ok(CACHE, beat(10))  # a beat it wrote before it died: no recovery
    assert board.is_failed(NAME)
    watch.seen_ok(CACHE, beat(12, "127.0.0.1:40001"))
    assert board.is_ok(NAME) and watch.beating_pid(CACHE) == 12
    await store.close()

    fixed = component_command(
        CACHE, data_dir=tmp_path / "c", nbd_bind="127.0.0.1:10809", env={}, log_file=tmp_path
    )
    other_host = component_command(
        CACHE, data_dir=tmp_path / "c", nbd_bind="10.0.0.1:0", env={}, log_file=tmp_path
    )
    for given in (fixed, other_host):
        kept = Supervisor([given], backoff_s=1, backoff_max_s=2)
        kept.keep_address(CACHE, "127.0.0.1:40001")
        assert kept.command(CACHE).nbd_bind == given.nbd_bind  # only a port-0 bind moves
