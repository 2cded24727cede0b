"""Interop tests use qemu's tools as independent peers; they never skip silently."""

from __future__ import annotations

import shutil

import pytest

REQUIRED = ("qemu-img", "qemu-io", "qemu-nbd", "nbdcopy")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/interop" in str(item.path):
            item.add_marker(pytest.mark.interop)


@pytest.fixture(scope="session", autouse=True)
def qemu_tools() -> None:
    missing = [tool for tool in REQUIRED if shutil.which(tool) is None]
    if missing:
        pytest.fail(
            f"missing {', '.join(missing)}: run 'sudo apt-get install -y qemu-utils libnbd-bin' "
            "(make test installs it when run as root)",
            pytrace=False,
        )
