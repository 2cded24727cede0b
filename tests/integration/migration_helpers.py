"""Driving cold migrations from tests: send requests, follow answers, inspect the sites."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from clients.client import FerryClient
from messages.commands import (
    CloneOptions,
    CloneVm,
    NetworkMapping,
    SourceCloneRequest,
    SourceCloneRequestBody,
    VmRef,
)
from messages.common import MigrationState, MigrationType, Phase
from messages.events import ErrorResponse, MigrationStatus, SourceCloneResponse
from tests.integration.conftest import Harness
from tests.support.lab import NETWORK_MAP

FINAL = {MigrationState.COMPLETED, MigrationState.FAILED, MigrationState.CANCELLED}


def clone_request(
    client: FerryClient,
    vm_ids: Sequence[str],
    *,
    groups: Sequence[Sequence[str]] = (),
    bandwidth_mbps: float | None = None,
    request_id: str | None = None,
) -> SourceCloneRequest:
    return SourceCloneRequest(
        body=SourceCloneRequestBody(
            request_id=request_id,
            vms=tuple(CloneVm(vm_id=vm_id) for vm_id in vm_ids),
            migration_type=MigrationType.COLD,
            guest_credentials=client.seal_credentials("tester", "pw-123"),
            network_map=tuple(NetworkMapping(source=s, target=t) for s, t in NETWORK_MAP.items()),
            application_dependency=tuple(tuple(VmRef(vm_id=i) for i in g) for g in groups),
            options=CloneOptions(bandwidth_cap_mbps=bandwidth_mbps),
        )
    )


@dataclass
class Follower:
    """Every SourceCloneResponse for one request, as it arrives."""

    client: FerryClient
    correlation_id: str
    history: list[MigrationStatus] = field(default_factory=list)
    latest: dict[str, MigrationStatus] = field(default_factory=dict)

    async def until(
        self, predicate: Callable[[dict[str, MigrationStatus]], bool], within_s: float = 90
    ) -> dict[str, MigrationStatus]:
        async with asyncio.timeout(within_s):
            while not (self.latest and predicate(self.latest)):
                event = await self.client.next_answer(self.correlation_id, timeout_s=within_s)
                if isinstance(event, SourceCloneResponse):
                    self.history.append(event.body)
                    previous = self.latest.get(event.body.migration_id)
                    if previous is None or previous.updated_at <= event.body.updated_at:
                        self.latest[event.body.migration_id] = event.body
        return self.latest

    async def finished(self, count: int, within_s: float = 120) -> dict[str, MigrationStatus]:
        return await self.until(
            lambda latest: len(latest) >= count and all(s.state in FINAL for s in latest.values()),
            within_s,
        )

    async def phase(self, phase: Phase, within_s: float = 60) -> MigrationStatus:
        await self.until(lambda latest: any(s.phase is phase for s in latest.values()), within_s)
        return next(s for s in self.latest.values() if s.phase is phase)


async def start_migration(client: FerryClient, request: SourceCloneRequest) -> Follower:
    await client.send(request)
    follower = Follower(client, request.correlation_id)
    first = await client.next_answer(request.correlation_id, timeout_s=60)
    if isinstance(first, ErrorResponse):  # pragma: no cover - next_answer raises instead
        raise AssertionError(first.body.message)
    assert isinstance(first, SourceCloneResponse)
    follower.history.append(first.body)
    follower.latest[first.body.migration_id] = first.body
    return follower


class ApplianceProcess:
    """``ferry-appliance run`` as a child process, for crash tests (SIGKILL) and scale-out."""

    def __init__(self, harness: Harness, log: Path, **overrides: object) -> None:
        self._harness = harness
        self._log = log
        self._overrides = overrides
        self.process: subprocess.Popen[bytes] | None = None

    async def start(self) -> ApplianceProcess:
        env = {**os.environ, **self._harness.env(**self._overrides)}
        with self._log.open("ab") as out:
            self.process = await asyncio.to_thread(
                subprocess.Popen,
                [sys.executable, "-m", "appliance.cli", "run"],
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        await self.wait_started()
        return self

    async def wait_started(self, within_s: float = 60) -> None:
        """The appliance writes runtime.json with its pid once it serves."""
        assert self.process is not None
        runtime = self._harness.data_dir / "runtime.json"
        deadline = time.monotonic() + within_s
        while True:
            if self.process.poll() is not None:
                raise AssertionError(f"appliance exited: {self._log.read_text()[-3000:]}")
            if runtime.exists():
                try:
                    if json.loads(runtime.read_text()).get("pid") == self.process.pid:
                        return
                except ValueError:
                    pass
            if time.monotonic() > deadline:
                raise AssertionError("appliance did not start")
            await asyncio.sleep(0.1)

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait()

    def pause(self) -> None:
        """SIGSTOP: the process keeps everything it holds and does nothing until resumed."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGCONT)

    async def stop(self) -> int:
        if self.process is None or self.process.poll() is not None:
            return self.process.returncode if self.process else 0
        self.resume()  # a paused process would not hear the SIGTERM
        self.process.send_signal(signal.SIGTERM)
        return await asyncio.to_thread(self.process.wait, 60)
