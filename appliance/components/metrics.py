"""A component process's Prometheus metrics, read from its heartbeat figures at scrape time.

The collector keeps no counters of its own: each scrape calls the same figures
function the heartbeat writes (the runtime's ``status()`` and the order desk's
counts), so the endpoint and the heartbeat never disagree. Per-disk figures are
labelled ``disk``; a kind that does not report a figure simply has no sample.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from appliance.components.heartbeat import Figures
from appliance.components.orders import ComponentId

# figure key -> (metric name, help, counter?); each figure is {disk_id: number}.
PER_DISK: dict[str, tuple[str, str, bool]] = {
    "read_hits": ("ferry_cache_read_hits", "Read chunk pieces served by the cache", True),
    "read_misses": ("ferry_cache_read_misses", "Read chunk pieces fetched from on-prem", True),
    "bytes_shipped": ("ferry_cache_shipped_bytes", "Bytes shipped to on-prem staging", True),
    "ship_failures": ("ferry_cache_ship_failures", "Failed attempts to ship an epoch", True),
    "chunks_resent": (
        "ferry_cache_chunks_resent",
        "Chunks found damaged on the way to on-prem and sent again (repairs)",
        True,
    ),
    "reconcile_pass": ("ferry_cache_reconcile_pass", "The last reconcile pass begun", False),
    "dirty_bytes_per_disk": ("ferry_cache_dirty_bytes", "Bytes written not yet committed", False),
    "cache_bytes_per_disk": ("ferry_cache_bytes", "Bytes the cache holds for the disk", False),
    "open_epoch": ("ferry_cache_open_epoch", "The epoch writes go into", False),
    "committed_epoch": ("ferry_committed_epoch", "The last epoch committed on-prem", False),
}
LISTS: dict[str, tuple[str, str]] = {
    "epochs_in_flight": ("ferry_cache_epochs_in_flight", "Epochs cut, not yet committed"),
    "epochs_staged": ("ferry_onprem_epochs_staged", "Epochs staged, not yet applied"),
}

ONPREM_TOTALS = (
    ("epoch_requests_answered", "ferry_onprem_epoch_requests_answered", "Epoch requests answered"),
    ("epochs_applied", "ferry_onprem_epochs_applied", "Epochs applied to current images"),
    ("bytes_applied", "ferry_onprem_applied_bytes", "Data bytes of the epochs applied"),
    ("bytes_staged", "ferry_onprem_staged_bytes", "Data bytes written to staging areas"),
)


def _numbers(value: object) -> Iterator[tuple[str, float]]:
    if isinstance(value, Mapping):
        for key, number in value.items():
            if isinstance(number, int | float) and not isinstance(number, bool):
                yield str(key), float(number)


class ComponentCollector(Collector):
    def __init__(self, instance: ComponentId, figures: Figures) -> None:
        self.instance = instance
        self._figures = figures

    def collect(self) -> Iterator[Metric]:
        figures = self._figures()
        labels = [self.instance.kind, self.instance.name]
        up = GaugeMetricFamily(
            "ferry_component_up", "1 while the component serves", labels=["kind", "name"]
        )
        up.add_metric(labels, 1.0)
        yield up
        yield from self._per_disk(figures)
        yield from self._lists(figures)
        yield from self._totals(figures)

    def _per_disk(self, figures: Mapping[str, object]) -> Iterator[Metric]:
        for key, (name, text, counter) in PER_DISK.items():
            if key not in figures:
                continue
            samples = list(_numbers(figures[key]))
            if counter:
                counted = CounterMetricFamily(name, text, labels=["disk"])
                for disk, number in samples:
                    counted.add_metric([disk], number)
                yield counted
            else:
                gauge = GaugeMetricFamily(name, text, labels=["disk"])
                for disk, number in samples:
                    gauge.add_metric([disk], number)
                yield gauge

    def _lists(self, figures: Mapping[str, object]) -> Iterator[Metric]:
        for key, (name, text) in LISTS.items():
            value = figures.get(key)
            if not isinstance(value, Mapping):
                continue
            family = GaugeMetricFamily(name, text, labels=["disk"])
            for disk, epochs in value.items():
                family.add_metric([str(disk)], float(len(epochs)))
            yield family

    def _totals(self, figures: Mapping[str, object]) -> Iterator[Metric]:
        orders = CounterMetricFamily(
            "ferry_component_orders", "Orders answered, by outcome", labels=["outcome"]
        )
        for outcome, count in _numbers(figures.get("orders")):
            orders.add_metric([outcome], count)
        yield orders
        capacity = figures.get("capacity_bytes")
        if isinstance(capacity, int):
            yield GaugeMetricFamily(
                "ferry_cache_capacity_bytes", "The cache's capacity, all disks", value=capacity
            )
        for key, name, text in ONPREM_TOTALS:
            number = figures.get(key)
            if isinstance(number, int):
                yield CounterMetricFamily(name, text, value=number)


def component_registry(instance: ComponentId, figures: Figures) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ComponentCollector(instance, figures))
    return registry
