"""One component process: its runtime, its order desk and its heartbeat, until told to stop.

``ferry-appliance component {cache|onprem} ...`` ends here. The data directory is
locked (``flock``) for the life of the process, so two processes never share one;
the runtime is entered first (it may open its NBD server and recover its disks),
then the desk reconciles the desired orders and the heartbeat starts, both in one
TaskGroup; ``stop`` ends both, a last heartbeat says ``stopping``, and the
runtime is closed.

A component told to bind port 0 (the embedded default) keeps the port it got across
restarts (``nbd-port`` in its data directory): the cloud VM's disk names the cache's
address and the cache's upstream the I/O manager's, so a component restarted by its
supervisor must come back where its clients reconnect. Only a port taken meanwhile
by another process gives a fresh one (logged).
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import os
from collections.abc import Iterator, Mapping
from contextlib import AsyncExitStack, contextmanager
from dataclasses import replace

from appliance.components.control import OrderDesk
from appliance.components.heartbeat import Figures, HeartbeatWriter
from appliance.components.ledger import Ledger
from appliance.components.metrics import component_registry
from appliance.components.orders import ComponentRuntime
from appliance.components.runtimes import ComponentConfig, RuntimeFactory
from appliance.errors import DiskInUse
from appliance.logs import get_logger
from appliance.metrics import MetricsEndpoint
from appliance.state.keys import Keys
from appliance.state.store import StateStore, connect

log = get_logger(__name__)
LOCK_FILE = "component.lock"
PORT_FILE = "nbd-port"


@contextmanager
def locked_data_dir(config: ComponentConfig) -> Iterator[None]:
    config.data_dir.mkdir(parents=True, exist_ok=True)
    path = config.data_dir / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise DiskInUse(config.data_dir) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield
    finally:
        os.close(fd)


def _remembered(config: ComponentConfig) -> ComponentConfig | None:
    """The config with the port a port-0 component had last time, if it had one."""
    if config.nbd_port != 0:
        return None
    try:
        port = int((config.data_dir / PORT_FILE).read_text().strip())
    except (OSError, ValueError):
        return None
    return replace(config, nbd_port=port) if 0 < port < 65536 else None


def _remember(config: ComponentConfig, runtime: ComponentRuntime) -> None:
    """Note the port the runtime's NBD server got (atomically), for the next start."""
    if config.nbd_port != 0:
        return
    port = str(runtime.status().get("address", "")).rpartition(":")[2]
    if not port.isdigit():
        return
    temporary = config.data_dir / f"{PORT_FILE}.tmp"
    temporary.write_text(f"{port}\n")
    temporary.replace(config.data_dir / PORT_FILE)


async def _enter_runtime(
    stack: AsyncExitStack, config: ComponentConfig, factory: RuntimeFactory
) -> ComponentRuntime:
    remembered = _remembered(config)
    if remembered is not None:
        try:
            return await stack.enter_async_context(factory(remembered))
        except OSError as error:
            if error.errno != errno.EADDRINUSE:
                raise
            log.warning("the port of the last run is taken: a new one", port=remembered.nbd_port)
    runtime = await stack.enter_async_context(factory(config))
    _remember(config, runtime)
    return runtime


def figures(runtime: ComponentRuntime, desk: OrderDesk) -> Mapping[str, object]:
    return {**runtime.status(), "orders": dict(desk.counts)}


async def _metrics(
    stack: AsyncExitStack, config: ComponentConfig, read: Figures
) -> Mapping[str, object]:
    """The process's metrics endpoint if one is bound; its address, for the heartbeat."""
    bind = config.settings.component_metrics_bind
    if not bind:
        return {}
    registry = component_registry(config.instance, read)
    endpoint = await stack.enter_async_context(MetricsEndpoint(registry, bind))
    return {"metrics_address": endpoint.address}


async def run_component(
    config: ComponentConfig, factory: RuntimeFactory, stop: asyncio.Event
) -> None:
    bound = log.bind(component=str(config.instance))
    with locked_data_dir(config):
        async with AsyncExitStack() as stack:
            store = StateStore(connect(config.redis_url), Keys(config.redis_prefix))
            stack.push_async_callback(store.close)
            ledger = Ledger(config.data_dir)
            await ledger.load()
            runtime = await _enter_runtime(stack, config, factory)
            desk = OrderDesk(
                store,
                config.instance,
                runtime,
                ledger,
                reconcile_interval_s=config.reconcile_interval_s,
            )
            metrics = await _metrics(stack, config, lambda: figures(runtime, desk))
            heartbeat = HeartbeatWriter(
                store,
                config.instance,
                lambda: {**figures(runtime, desk), **metrics},
                interval_s=config.heartbeat_interval_s,
                ttl_s=config.heartbeat_ttl_s,
            )
            bound.info("component started", pid=os.getpid(), data_dir=str(config.data_dir))
            async with asyncio.TaskGroup() as tasks:
                tasks.create_task(desk.run(stop))
                tasks.create_task(heartbeat.run(stop))
            bound.info("component stopped")
