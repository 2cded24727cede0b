"""The two data-plane components as real supervised processes, for tests.

    async with component_pair(redis_server, keys, tmp_path) as pair:
        pair.onprem_address       # HOST:PORT of the I/O manager's NBD server
        pair.orders(ONPREM), pair.health, pair.store

Each runs ``python -m appliance.cli component KIND --name NAME`` under a
:class:`Supervisor`, with a short heartbeat and a test-scale cache, and
talks to the test through the session's real Redis only.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

from appliance.components.control import ComponentOrders
from appliance.components.heartbeat import ComponentHealth, ComponentReport, Liveness
from appliance.components.orders import ComponentId
from appliance.embedded import RedisServer
from appliance.service.components import Supervisor, component_command
from appliance.state.keys import Keys
from appliance.state.store import StateStore, connect

ROOT = Path(__file__).resolve().parents[2]
ONPREM = ComponentId("onprem", "onprem-1")
CACHE = ComponentId("cache", "cache-1")
TIMEOUT_S = 30.0  # heartbeat timeout (liveness is not what these tests are about)
WAIT_S = 90.0  # bound on every wait (a loaded 2-core machine starts Python slowly)


def component_env(
    redis_server: RedisServer, keys: Keys, data_dir: Path, extra: Mapping[str, str]
) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FERRY_")}
    return (
        env
        | {
            "PYTHONPATH": str(ROOT),
            "FERRY_REDIS_URL": redis_server.url,
            "FERRY_REDIS_PREFIX": keys.prefix,
            "FERRY_DATA_DIR": str(data_dir),
            "FERRY_COMPONENT_HEARTBEAT_INTERVAL_S": "0.2",
            "FERRY_COMPONENT_TIMEOUT_S": str(TIMEOUT_S),
            "FERRY_COMPONENT_RECONCILE_INTERVAL_S": "30",
            "FERRY_CACHE_SCALE": str(1 / 1024),
            "FERRY_CACHE_RETRY_DELAY_S": "0.2",
            "FERRY_CACHE_UPSTREAM_TIMEOUT_S": "60",
            "FERRY_COMPONENT_EPOCH_TIMEOUT_S": "20",
            "FERRY_LOG_LEVEL": "info",
        }
        | dict(extra)
    )


@dataclass
class ComponentPair:
    supervisor: Supervisor
    store: StateStore
    health: ComponentHealth
    logs: dict[ComponentId, Path] = field(default_factory=dict)

    def orders(self, instance: ComponentId) -> ComponentOrders:
        return ComponentOrders(self.store, instance)

    async def wait(
        self, instance: ComponentId, predicate: Callable[[ComponentReport], bool]
    ) -> ComponentReport:
        return await self.health.wait_until(
            instance, lambda r: r.liveness is Liveness.OK and predicate(r), WAIT_S
        )

    async def figures(self, instance: ComponentId) -> Mapping[str, object]:
        return (await self.wait(instance, lambda r: "exports" in r.figures)).figures


@asynccontextmanager
async def component_pair(
    redis_server: RedisServer,
    keys: Keys,
    directory: Path,
    extra_env: Mapping[str, str] | None = None,
) -> AsyncIterator[ComponentPair]:
    env = component_env(redis_server, keys, directory, extra_env or {})
    commands = [
        component_command(
            instance,
            data_dir=directory / instance.name,
            nbd_bind="127.0.0.1:0",
            env=env,
            log_file=directory / f"{instance.name}.log",
            cwd=ROOT,
        )
        for instance in (ONPREM, CACHE)
    ]
    supervisor = Supervisor(commands, backoff_s=0.1, backoff_max_s=1.0, stop_grace_s=15.0)
    store = StateStore(connect(redis_server.url), keys)
    stop = asyncio.Event()
    task = asyncio.create_task(supervisor.run(stop))
    pair = ComponentPair(
        supervisor,
        store,
        ComponentHealth(store, timeout_s=TIMEOUT_S),
        {c.instance: c.log_file for c in commands},
    )
    try:
        yield pair
    finally:
        stop.set()
        await task
        await store.close()
        for instance, log_file in pair.logs.items():
            if log_file.exists():  # shown when the test failed
                print(f"--- {instance} ---\n{log_file.read_text()[-6000:]}")
