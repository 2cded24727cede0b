"""One scale for every time of the fault suite: production figures times ``SCALE``.

``FERRY_FAULT_SCALE`` (default 1/24) shrinks each production figure below (the
component timeout of 120 s becomes 5 s, HDM's WAN threshold of 5 min 12.5 s, a
Redis outage of 60 s 2.5 s): the ratios between faults and timeouts stay those of
production, the suite stays short. Waits that are not fault thresholds (how long a
test gives a migration to reach the cloud, an order to be answered) are generous
bounds, not scaled: under load they must not fire before the condition they wait for.
"""

from __future__ import annotations

import os

SCALE = float(os.environ.get("FERRY_FAULT_SCALE", str(1 / 24)))

PRODUCTION_COMPONENT_TIMEOUT_S = 120.0
PRODUCTION_HEARTBEAT_INTERVAL_S = 5.0
PRODUCTION_RESTART_BACKOFF_S = 1.0
PRODUCTION_WAN_THRESHOLD_S = 300.0
PRODUCTION_REPAIR_TIMEOUT_S = 300.0


def scaled(production_s: float) -> float:
    return production_s * SCALE


COMPONENT_TIMEOUT_S = scaled(PRODUCTION_COMPONENT_TIMEOUT_S)
HEARTBEAT_INTERVAL_S = scaled(PRODUCTION_HEARTBEAT_INTERVAL_S)
RESTART_BACKOFF_S = scaled(PRODUCTION_RESTART_BACKOFF_S)
WAN_THRESHOLD_S = scaled(PRODUCTION_WAN_THRESHOLD_S)
REPAIR_TIMEOUT_S = scaled(PRODUCTION_REPAIR_TIMEOUT_S)
"""Repair gives up this long after a failure, and recovery sends the VMs home."""
WAIT_S = 120.0
"""The bound of any wait for a condition: generous, a failure only when something hangs."""


def describe() -> str:
    return (
        f"scale {SCALE:.4g}: component timeout {COMPONENT_TIMEOUT_S:g} s "
        f"(120 s in production), heartbeat {HEARTBEAT_INTERVAL_S:g} s, "
        f"WAN threshold {WAN_THRESHOLD_S:g} s (300 s), repair deadline {REPAIR_TIMEOUT_S:g} s "
        "(300 s)"
    )
