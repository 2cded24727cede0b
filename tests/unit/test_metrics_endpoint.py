"""The /metrics endpoint: one registry per endpoint (two in one process do not mix), a
refresh awaited before each scrape, 404 and 405 for anything but GET /metrics."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from appliance.metrics import MetricsEndpoint
from appliance.settings import Settings
from tests.support.scrape import scrape


class _Figure(Collector):
    def __init__(self, value: float) -> None:
        self.value = value
        self.refreshed = 0

    async def refresh(self) -> None:
        self.refreshed += 1
        self.value += 1

    def collect(self) -> Iterator[Metric]:
        yield GaugeMetricFamily("ferry_test_figure", "a figure", value=self.value)


def _registry(collector: Collector) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    return registry


async def _raw(address: str, request: bytes) -> bytes:
    host, _, port = address.rpartition(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(request)
    await writer.drain()
    response = await reader.read()
    writer.close()
    await writer.wait_closed()
    return response


async def test_two_endpoints_in_one_process_each_serve_their_own_live_figures() -> None:
    one, two = _Figure(10), _Figure(20)
    async with (
        MetricsEndpoint(_registry(one), "127.0.0.1:0", one.refresh) as first,
        MetricsEndpoint(_registry(two), "127.0.0.1:0") as second,
    ):
        assert (await scrape(first.address))[("ferry_test_figure", ())] == 11
        assert (await scrape(first.address))[("ferry_test_figure", ())] == 12
        assert (await scrape(second.address))[("ferry_test_figure", ())] == 20
        two.value = 7
        assert (await scrape(second.address))[("ferry_test_figure", ())] == 7
        assert (one.refreshed, first.scrapes, second.scrapes) == (2, 2, 2)


async def test_anything_but_get_metrics_is_refused() -> None:
    async with MetricsEndpoint(_registry(_Figure(1)), "127.0.0.1:0") as endpoint:
        missing = await _raw(endpoint.address, b"GET /other HTTP/1.1\r\n\r\n")
        assert missing.startswith(b"HTTP/1.1 404")
        posted = await _raw(endpoint.address, b"POST /metrics HTTP/1.1\r\n\r\n")
        assert posted.startswith(b"HTTP/1.1 405")
        assert endpoint.scrapes == 0


def test_the_endpoints_are_off_unless_bound() -> None:
    settings = Settings()
    assert settings.metrics_bind == "" and settings.component_metrics_bind == ""
