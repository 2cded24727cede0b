"""Which :class:`ComponentRuntime` a component process runs, chosen by its kind.

A data-plane core plugs in through an adapter module, ``appliance.components.{kind}_runtime``
(``cache_runtime``, ``onprem_runtime``: they map orders onto the core and its figures
into heartbeats), or by giving its package (``appliance.components.cache``) a
``make_runtime(config)`` that returns an async context manager yielding a
ComponentRuntime; the adapter module is looked for first. Until a kind has one, the
process runs :class:`UnavailableRuntime`, which answers every order
``not_implemented`` with the reason: an order is never silently accepted.
Tests may name another runtime (``module:Class``) when ``FERRY_TEST_MODE`` is set.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Self, cast

from appliance.components.orders import ComponentId, ComponentRuntime, Order, OrderOutcome
from appliance.errors import NotConfigured
from appliance.settings import Settings


@dataclass(frozen=True, slots=True)
class ComponentConfig:
    """Everything one component process is started with (CLI arguments + FERRY_* settings)."""

    instance: ComponentId
    data_dir: Path
    nbd_host: str
    nbd_port: int
    redis_url: str
    redis_prefix: str
    heartbeat_interval_s: float
    heartbeat_ttl_s: float
    reconcile_interval_s: float
    settings: Settings


RuntimeFactory = Callable[[ComponentConfig], AbstractAsyncContextManager[ComponentRuntime]]


class UnavailableRuntime:
    """The runtime of a kind whose core is not built in: every order is not_implemented."""

    def __init__(self, kind: str, reason: str) -> None:
        self.kind = kind
        self.reason = reason

    async def apply(self, order: Order) -> OrderOutcome:
        return OrderOutcome.not_implemented(order, self.reason)

    def status(self) -> Mapping[str, object]:
        return {"runtime": "unavailable", "reason": self.reason}

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        return None


def runtime_for_kind(kind: str) -> RuntimeFactory:
    """The kind's adapter's (or core's) ``make_runtime``, else an UnavailableRuntime."""
    adapter = f"appliance.components.{kind}_runtime"
    try:
        module = importlib.import_module(adapter)
    except ModuleNotFoundError as error:
        if error.name != adapter:
            raise
    else:
        return cast(RuntimeFactory, module.make_runtime)
    package = f"appliance.components.{kind}"
    try:
        module = importlib.import_module(package)
    except ModuleNotFoundError as error:
        if error.name != package:
            raise
        return _unavailable(kind, f"no {package} package in this build")
    make = getattr(module, "make_runtime", None)
    if make is None:
        return _unavailable(kind, f"{package} has no make_runtime(config) yet")
    return cast(RuntimeFactory, make)


def _unavailable(kind: str, reason: str) -> RuntimeFactory:
    def make(config: ComponentConfig) -> AbstractAsyncContextManager[ComponentRuntime]:
        return UnavailableRuntime(kind, reason)

    return make


def runtime_by_name(spec: str, *, test_mode: bool) -> RuntimeFactory:
    """``module:Class`` (a class taking a ComponentConfig): honoured in test mode only."""
    if not test_mode:
        raise NotConfigured("--runtime", "only honoured when FERRY_TEST_MODE is set")
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise NotConfigured("--runtime", f"expected module:Class, got {spec!r}")
    factory = getattr(importlib.import_module(module_name), attribute)
    return cast(RuntimeFactory, factory)
