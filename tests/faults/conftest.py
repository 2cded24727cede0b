"""The fault suite's fixtures: the integration ones (LocalStack, a real Redis, an appliance)."""

from __future__ import annotations

import pytest

from tests.integration.conftest import harness, localstack, start_appliance

__all__ = ["harness", "localstack", "start_appliance"]


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "needs_recovery: a fault case that needs automatic recovery (migrate back to "
        "_HDM_RECOVERYSUCCESS); deselected by the Makefile until recovery lands",
    )


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/faults" in str(item.path):
            item.add_marker(pytest.mark.integration)
