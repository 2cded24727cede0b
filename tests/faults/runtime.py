"""The component runtime of the fault suite: the real cache and I/O manager, two seams added.

The appliance starts its embedded components with ``component_runtime =
"tests.faults.runtime:fault_runtime"`` (honoured in test mode only). The cache runs
the real :class:`CacheRuntime` unchanged. The I/O manager runs the real
:class:`OnpremRuntime` with:

* a commit hook that holds one commit at a step when the test arms it: the test
  sets ``{prefix}:faults:hold-commit`` to a :class:`CommitStep` value; the first
  commit reaching that step takes the arm (once), says so on the stream
  ``{prefix}:faults:held`` (disk, epoch, step, pid) and blocks there until the
  test kills the process, or, armed as ``<step>+release``, until the test pushes
  to ``{prefix}:faults:release`` (a blocking pop: no polling);
* with a WAN link in the plan (``fault-plan.json`` in the appliance's data
  directory, written by the test before the appliance starts), the link's address
  reported as its own NBD address, in its ``open`` results and its heartbeat (a
  NAT in front of it, in effect): the cache dials it for misses and epochs, the
  appliance's link probe too. The real address is in the figures as ``nbd_address``.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Mapping
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, replace
from pathlib import Path
from types import TracebackType
from typing import Self

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from appliance.components.cache_runtime import CacheRuntime
from appliance.components.onprem import CommitStep
from appliance.components.onprem_runtime import OnpremRuntime
from appliance.components.orders import ComponentRuntime, Order, OrderOutcome
from appliance.components.runtimes import ComponentConfig

PLAN_FILE = "fault-plan.json"
RUNTIME = "tests.faults.runtime:fault_runtime"


@dataclass(frozen=True, slots=True)
class FaultPlan:
    wan: str = ""
    """HOST:PORT of the WAN link in front of the I/O manager ("": none)."""

    def save(self, data_dir: Path) -> None:
        data_dir.mkdir(parents=True, exist_ok=True)
        (data_dir / PLAN_FILE).write_text(json.dumps({"wan": self.wan}))

    @classmethod
    def load(cls, data_dir: Path) -> FaultPlan:
        try:
            document = json.loads((data_dir / PLAN_FILE).read_text())
        except FileNotFoundError:
            return cls()
        return cls(wan=str(document.get("wan", "")))


def hold_key(prefix: str) -> str:
    return f"{prefix}:faults:hold-commit"


def held_stream(prefix: str) -> str:
    return f"{prefix}:faults:held"


def release_key(prefix: str) -> str:
    return f"{prefix}:faults:release"


RELEASE = "+release"


def fault_runtime(config: ComponentConfig) -> AbstractAsyncContextManager[ComponentRuntime]:
    if config.instance.kind == "cache":
        return CacheRuntime(config)
    return HookedOnprem(config, FaultPlan.load(config.settings.data_dir))


class HookedOnprem:
    def __init__(self, config: ComponentConfig, plan: FaultPlan) -> None:
        self._config = config
        self._plan = plan
        self._redis: aioredis.Redis = aioredis.from_url(config.redis_url)
        self._inner = OnpremRuntime(config, commit_hook=self._hook)

    async def _hook(self, disk_id: str, epoch: int, step: CommitStep) -> None:
        prefix = self._config.redis_prefix
        try:
            armed = await self._redis.get(hold_key(prefix))
            released = armed == (step.value + RELEASE).encode()
            if armed != step.value.encode() and not released:
                return
            if not await self._redis.delete(hold_key(prefix)):
                return
            fields = {"disk": disk_id, "epoch": epoch, "step": step.value, "pid": os.getpid()}
            await self._redis.xadd(held_stream(prefix), fields)  # type: ignore[arg-type]
            if released:
                await self._redis.blpop([release_key(prefix)])
                return
        except (RedisError, OSError):
            return  # Redis down (another fault): no hold, the commit goes on
        await asyncio.Event().wait()  # held: the test kills this process here

    async def apply(self, order: Order) -> OrderOutcome:
        outcome = await self._inner.apply(order)
        if self._plan.wan and "address" in outcome.result:
            outcome = replace(outcome, result={**outcome.result, "address": self._plan.wan})
        return outcome

    def status(self) -> Mapping[str, object]:
        figures = dict(self._inner.status())
        if self._plan.wan and "address" in figures:
            figures["nbd_address"] = figures["address"]
            figures["address"] = self._plan.wan
        return figures

    async def __aenter__(self) -> Self:
        await self._inner.__aenter__()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            await self._inner.__aexit__(exc_type, exc, tb)
        finally:
            await self._redis.aclose()
