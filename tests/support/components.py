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
from appliance.components.epochs import parse_address
from appliance.components.heartbeat import ComponentHealth, ComponentReport, Liveness
from appliance.components.orders import (
    ComponentId,
    Order,
    OrderAction,
    OrderOutcome,
    OutcomeKind,
    ParamValue,
)
from appliance.datapath.nbd import NbdBackend
from appliance.datapath.nbd.channel import NbdAddress, TcpAddress, nbd_url
from appliance.embedded import RedisServer
from appliance.service.components import Supervisor, component_command
from appliance.state.keys import Keys
from appliance.state.leases import Lease, Leases
from appliance.state.store import StateStore, connect

ROOT = Path(__file__).resolve().parents[2]
ONPREM = ComponentId("onprem", "onprem-1")
CACHE = ComponentId("cache", "cache-1")
TIMEOUT_S = 30.0  # heartbeat timeout (liveness is not what these tests are about)
WAIT_S = 90.0  # bound on every wait (a loaded 2-core machine starts Python slowly)
COPY_CHUNK = 1024 * 1024


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
    nbd_binds: Mapping[ComponentId, str] | None = None,
) -> AsyncIterator[ComponentPair]:
    """``nbd_binds``: a fixed HOST:PORT per instance (a restarted one keeps its address)."""
    env = component_env(redis_server, keys, directory, extra_env or {})
    binds = nbd_binds or {}
    commands = [
        component_command(
            instance,
            data_dir=directory / instance.name,
            nbd_bind=binds.get(instance, "127.0.0.1:0"),
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


# -- a disk in migration: on-prem serving it, the cache in front of it ------------------------

RESOURCE = "group:g-1"


async def take_lease(store: StateStore, owner: str, resource: str = RESOURCE) -> Lease:
    lease = await Leases(store, owner, ttl_s=300).acquire(resource)
    assert lease is not None, f"{resource} is held by someone else"
    return lease


async def applied(orders: ComponentOrders, order: Order) -> OrderOutcome:
    outcome = await orders.give_and_wait(order, WAIT_S)
    assert outcome.kind is OutcomeKind.APPLIED, outcome
    return outcome


async def copy_export(address: NbdAddress, export: str, image: Path) -> Path:
    """An NBD export as a sparse raw file: its data extents written, its holes left holes."""
    async with await NbdBackend.connect(address, export) as source:
        with image.open("wb") as target:
            target.truncate(source.size)
            for extent in await source.extents():
                if not extent.data:
                    continue
                for offset in range(extent.start, extent.end, COPY_CHUNK):
                    target.seek(offset)
                    size = min(COPY_CHUNK, extent.end - offset)
                    target.write(await source.read(offset, size))
    return image


@dataclass
class CachedDisk:
    """One disk opened on both components by the holder of ``lease``."""

    pair: ComponentPair
    lease: Lease
    disk_id: str
    onprem_address: TcpAddress
    cache_address: TcpAddress
    export: str
    cuts: int = 0

    @property
    def url(self) -> str:
        return nbd_url(self.cache_address, self.export)

    async def cut_and_commit(self) -> int:
        """Cut the next epoch; return once on-prem committed it (every write before it)."""
        self.cuts += 1
        order = Order(
            self.disk_id,
            OrderAction.CUT_EPOCH,
            "m-1",
            self.lease.token,
            self.lease.resource,
            self.cuts,
        )
        epoch = (await applied(self.pair.orders(CACHE), order)).result["epoch"]
        assert isinstance(epoch, int)

        def done(report: ComponentReport) -> bool:
            committed = report.figures.get("committed_epoch", {})
            return isinstance(committed, dict) and committed.get(self.disk_id, 0) >= epoch

        await self.pair.wait(ONPREM, done)
        return epoch

    async def current_image(self, image: Path) -> Path:
        """On-prem's current image (``cur/``) as a sparse raw file."""
        return await copy_export(self.onprem_address, f"cur/{self.disk_id}", image)


@asynccontextmanager
async def cached_disk(
    redis_server: RedisServer,
    keys: Keys,
    directory: Path,
    *,
    disk_dir: Path,
    snapshot_id: str,
    size: int,
    disk_id: str = "disk-1",
    extra_env: Mapping[str, str] | None = None,
    nbd_binds: Mapping[ComponentId, str] | None = None,
) -> AsyncIterator[CachedDisk]:
    """Both components started, the disk opened on both; the cache reads on-prem directly."""
    async with component_pair(redis_server, keys, directory, extra_env, nbd_binds) as pair:
        onprem = parse_address(str((await pair.figures(ONPREM))["address"]))
        await pair.figures(CACHE)
        lease = await take_lease(pair.store, "ferry-a")
        on = {"disk_dir": str(disk_dir), "snapshot_id": snapshot_id}
        await applied(
            pair.orders(ONPREM),
            Order(disk_id, OrderAction.OPEN, "m-1", lease.token, lease.resource, params=on),
        )
        params: dict[str, ParamValue] = {
            "size": size,
            "upstream": str(onprem),
            "onprem": ONPREM.name,
        }
        outcome = await applied(
            pair.orders(CACHE),
            Order(disk_id, OrderAction.OPEN, "m-1", lease.token, lease.resource, params=params),
        )
        cache = parse_address(str(outcome.result["address"]))
        yield CachedDisk(pair, lease, disk_id, onprem, cache, str(outcome.result["export"]))
