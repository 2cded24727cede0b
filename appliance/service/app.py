"""The appliance process: start what is needed, serve the command queue, stop cleanly.

Startup builds every resource in one AsyncExitStack (embedded moto and
redis-server when no endpoint is configured, the state store, the bus, the
sites, the cloud side's NBD server); the work runs in one TaskGroup (bus
intake, heartbeat, state-store watchdog, migration scheduler). ``stop`` ends
intake, drains in-flight commands within the drain timeout, stops local
migration runs (they resume from their checkpoints), publishes a last
heartbeat, and unwinds the stack in reverse.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from contextlib import AsyncExitStack
from datetime import timedelta
from functools import partial

from appliance import logs
from appliance.bus import SqsBus
from appliance.clock import Clock, SystemClock
from appliance.datapath.nbd.server import NbdServer
from appliance.dispatch.dispatcher import CommandHandler, Dispatcher
from appliance.embedded import MotoServer, RedisServer
from appliance.errors import NotConfigured, StateLost, StateStoreUnavailable
from appliance.health import HealthBoard
from appliance.keys import load_or_create
from appliance.logs import get_logger
from appliance.metrics import MetricsEndpoint
from appliance.orchestrator.cloud_control import any_on_components
from appliance.orchestrator.context import Deps
from appliance.orchestrator.scheduler import Scheduler
from appliance.service.components import ComponentWatch, EmbeddedComponents
from appliance.service.health import (
    HealthEvents,
    SiteProbe,
    heartbeat_reader,
    wan_probe,
    watched_elsewhere,
)
from appliance.service.heartbeat import HeartbeatPublisher
from appliance.service.metrics import appliance_registry, build_collector
from appliance.service.recovery import recovery_trigger
from appliance.service.repair import Repairer, RepairPolicy, repair_ways
from appliance.service.runtime import RuntimeInfo, clear_runtime, write_runtime
from appliance.service.wiring import (
    CloudDataPlane,
    WanLink,
    build_deps,
    build_handlers,
    open_sites,
)
from appliance.settings import Settings
from appliance.state.commands import CommandRecords
from appliance.state.events import EventLog
from appliance.state.keys import Keys
from appliance.state.store import StateStore, connect
from messages.codec import Decoder

log = get_logger(__name__)
GENERATION_FILE = "state-generation"


def bus_token(settings: Settings) -> str:
    """The bus token, or NotConfigured: commands are never accepted unverified."""
    token = settings.bus_token.get_secret_value() if settings.bus_token is not None else ""
    if not token:
        raise NotConfigured(
            "FERRY_BUS_TOKEN", "not set; the appliance verifies every command with it"
        )
    return token


class Appliance:
    def __init__(
        self, settings: Settings, clock: Clock | None = None, wan: WanLink | None = None
    ) -> None:
        self.settings = settings
        self.wan = wan
        self.clock = clock or SystemClock()
        self.health = HealthBoard(self.clock)
        self.health.register("state_store")
        self.health.register("state_generation")
        self.health.register("bus")
        self.health.register("sites")
        self.health_events = HealthEvents(self.health, self.clock)
        # After the events: a failure's event is queued before its repair's.
        self.repairer = Repairer(
            self.health, self.health_events, self.clock, RepairPolicy.from_settings(settings)
        )
        self.started = asyncio.Event()
        self._redis_url = ""
        self.embedded_redis: RedisServer | None = None

    async def run(self, stop: asyncio.Event) -> None:
        settings = self.settings
        token = bus_token(settings)
        logs.register_secret(token)
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        keys = await asyncio.to_thread(load_or_create, settings.data_dir)
        async with AsyncExitStack() as stack:
            sqs_endpoint, store = await self._outside_systems(stack)
            bus = await stack.enter_async_context(
                SqsBus(settings, sqs_endpoint, self.health, keys=keys)
            )
            sites = await open_sites(settings.data_dir)
            for site in sites.values():
                stack.push_async_callback(site.close)
            self.health.ok("sites", ", ".join(sorted(sites)))
            site_probes = [
                SiteProbe(
                    site,
                    self.health,
                    interval_s=max(1.0, settings.component_heartbeat_interval_s),
                    timeout_s=settings.component_timeout_s,
                    clock=self.clock,
                )
                for site in sites.values()
            ]
            for probe in site_probes:
                await probe.probe()
            nbd = await stack.enter_async_context(NbdServer())
            cloud = CloudDataPlane(nbd, sites["cloud"], self.wan)
            deps = build_deps(
                settings, store, bus.publisher, sites, cloud, self.clock, keys, self.health
            )
            scheduler = Scheduler(deps)
            handlers = build_handlers(settings, deps, scheduler, self.health, sites["onprem"])
            dispatcher = self._dispatcher(store, bus, handlers)
            heartbeat = HeartbeatPublisher(
                appliance_id=settings.appliance_id,
                health=self.health,
                sink=bus.publisher,
                clock=self.clock,
                counts=deps.migrations.counts,
                in_flight=lambda: dispatcher.in_flight,
                appliance_key=keys.public.text,
            )
            components = (
                EmbeddedComponents(
                    settings,
                    self._redis_url,
                    store,
                    self.health,
                    keep_serving=partial(any_on_components, deps),
                )
                if settings.embedded_components
                else None
            )
            metrics = await self._metrics(stack, deps, store, components)
            others = watched_elsewhere(settings)
            watch = (
                ComponentWatch(heartbeat_reader(settings, store), self.health, others)
                if others
                else None
            )
            ways = repair_ways(settings, components, self.embedded_redis, self.health, self.clock)
            for name, way in ways:
                self.repairer.watch(name, way)
            wan = wan_probe(settings, store, self.health, self.clock, cloud.dialled)
            recovery = recovery_trigger(
                settings, store, heartbeat_reader(settings, store), self.clock, self.health
            )
            self._write_runtime(sqs_endpoint, bus, keys.public.text, metrics)
            stack.callback(clear_runtime, settings.data_dir, os.getpid())
            log.info("appliance started", appliance_id=settings.appliance_id, key=keys.public.text)
            self.started.set()
            async with asyncio.TaskGroup() as tasks:
                tasks.create_task(heartbeat.run(settings.heartbeat_interval_s, stop))
                tasks.create_task(self._watch_state_store(store, stop))
                tasks.create_task(scheduler.run(stop))
                tasks.create_task(bus.consume(dispatcher.handle, stop, self._intake_gate))
                tasks.create_task(self.health_events.run(EventLog(store), stop))
                tasks.create_task(self.repairer.run(stop))
                if components is not None:
                    tasks.create_task(components.run(stop))
                if watch is not None:
                    tasks.create_task(watch.run(stop))
                if wan is not None:
                    tasks.create_task(wan.run(stop))
                if recovery is not None:
                    tasks.create_task(recovery.run(stop))
                for probe in site_probes:
                    tasks.create_task(probe.run(stop))
            log.info("appliance stopped")

    async def _outside_systems(self, stack: AsyncExitStack) -> tuple[str, StateStore]:
        """The SQS endpoint and the state store: configured ones, or embedded servers."""
        settings = self.settings
        sqs_endpoint = settings.sqs_endpoint
        if sqs_endpoint is None:
            moto = await stack.enter_async_context(MotoServer())
            sqs_endpoint = moto.url
            log.info("embedded moto server", endpoint=sqs_endpoint)
        redis_url = settings.redis_url.get_secret_value() if settings.redis_url else None
        if redis_url is None:
            redis = await stack.enter_async_context(RedisServer(settings.data_dir / "redis"))
            self.embedded_redis = redis
            redis_url = redis.url
            log.info("embedded redis-server", port=redis.port, pid=redis.pid)
        self._redis_url = redis_url
        store = StateStore(connect(redis_url), Keys(settings.redis_prefix), health=self.health)
        stack.push_async_callback(store.close)
        await self._check_state(store)
        return sqs_endpoint, store

    async def _intake_gate(self) -> None:
        """Commands are only taken from the queue while the state store is reachable."""
        await self.health.wait_ok("state_store")

    async def _check_state(self, store: StateStore) -> None:
        marker = self.settings.data_dir / GENERATION_FILE
        try:
            generation = await store.check_generation(marker)
        except StateStoreUnavailable as error:
            log.debug("state store not reachable", error=str(error))
            return
        except StateLost as error:
            if not self.health.is_failed("state_generation"):
                log.error("state lost", error=str(error))
            self.health.failed("state_generation", str(error) + "; send ResetRequest")
            return
        self.health.ok("state_generation", generation)

    async def _watch_state_store(self, store: StateStore, stop: asyncio.Event) -> None:
        """Probe Redis: often while it is down (to resume quickly), every few seconds while
        it is up; each probe reads the generation marker, so a Redis that restarted empty
        between two probes is noticed too."""
        while not stop.is_set():
            down = not self.health.is_ok("state_store")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=0.5 if down else 2.0)
            with contextlib.suppress(StateStoreUnavailable):
                await self._check_state(store)

    def _dispatcher(
        self, store: StateStore, bus: SqsBus, handlers: dict[str, CommandHandler]
    ) -> Dispatcher:
        settings = self.settings
        return Dispatcher(
            appliance_id=settings.appliance_id,
            decoder=Decoder(settings.token_bytes, max_bytes=settings.max_message_bytes),
            # The handling lease is as short as a receive's visibility: the command of a
            # handler that died is taken over when its message is back.
            records=CommandRecords(
                store, settings.command_record_ttl_s, lease_s=settings.receive_visibility_s
            ),
            events=EventLog(store),
            sink=bus.publisher,
            handlers=handlers,
            clock=self.clock,
            max_skew=timedelta(seconds=settings.max_clock_skew_s),
        )

    async def _metrics(
        self,
        stack: AsyncExitStack,
        deps: Deps,
        store: StateStore,
        components: EmbeddedComponents | None,
    ) -> str | None:
        """The /metrics endpoint's address when ``FERRY_METRICS_BIND`` is set, else None."""
        settings = self.settings
        if not settings.metrics_bind:
            return None
        collector = build_collector(
            settings, deps, store, self.clock, components, self.repairer.counts
        )
        registry = appliance_registry(collector)
        endpoint = MetricsEndpoint(registry, settings.metrics_bind, collector.refresh)
        return (await stack.enter_async_context(endpoint)).address

    def _write_runtime(
        self, sqs_endpoint: str, bus: SqsBus, appliance_key: str, metrics: str | None
    ) -> None:
        write_runtime(
            self.settings.data_dir,
            RuntimeInfo(
                appliance_id=self.settings.appliance_id,
                pid=os.getpid(),
                started_at=self.clock.now().isoformat(),
                sqs_endpoint=sqs_endpoint,
                region=self.settings.region,
                command_queue_url=bus.urls.commands,
                response_queue_url=bus.urls.responses,
                dead_letter_queue_url=bus.urls.dead_letters,
                redis_embedded=self.settings.redis_url is None,
                appliance_key=appliance_key,
                metrics_address=metrics,
            ),
        )
