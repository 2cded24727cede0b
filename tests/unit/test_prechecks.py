"""Prepare-to-migrate checks: each one passing, and failing with the reason a client reads."""

from __future__ import annotations

from dataclasses import replace

import pytest

from appliance.orchestrator.prechecks import (
    PrecheckFacts,
    needs_credentials,
    run_checks,
    target_network,
)
from appliance.orchestrator.record import CheckResult
from appliance.sites.lab.sample import cloud_site_config
from appliance.sites.model import DiskConfig, NicConfig, VmConfig
from messages.common import Firmware, GuestOsFamily, PowerState, ToolsStatus
from tests.support.lab import MIB, NETWORK_MAP, lab_vm

CHECKS = (
    "not_already_migrating", "os_supported", "tools_running", "os_on_first_disk",
    "firmware", "target_networks", "target_capacity", "credentials",
)  # fmt: skip
MIGRATION = "m-0001"


def facts(vm: VmConfig | None = None, **changes: object) -> PrecheckFacts:
    base = PrecheckFacts(
        vm=vm or lab_vm(1, disks=2, disk_size=64 * MIB),
        lock_holder=MIGRATION,
        migration_id=MIGRATION,
        target=cloud_site_config(),
        target_free_bytes=1024 * MIB,
        network_map=dict(NETWORK_MAP),
        has_credentials=True,
    )
    return replace(base, **changes)  # type: ignore[arg-type]


def check(result: tuple[CheckResult, ...], name: str) -> CheckResult:
    return next(c for c in result if c.name == name)


def only_failures(result: tuple[CheckResult, ...]) -> dict[str, str]:
    return {c.name: c.reason for c in result if not c.passed}


def test_a_ready_vm_passes_every_check_in_a_fixed_order() -> None:
    result = run_checks(facts())
    assert tuple(c.name for c in result) == CHECKS
    assert only_failures(result) == {}


# --- not already migrating -----------------------------------------------------------


@pytest.mark.parametrize("holder", [None, MIGRATION])
def test_a_free_vm_or_one_locked_by_this_migration_passes(holder: str | None) -> None:
    assert check(run_checks(facts(lock_holder=holder)), "not_already_migrating").passed


def test_a_vm_held_by_another_migration_fails_naming_it() -> None:
    result = run_checks(facts(lock_holder="m-other"))
    assert only_failures(result) == {"not_already_migrating": "held by migration m-other"}


# --- guest OS and tools --------------------------------------------------------------


@pytest.mark.parametrize(
    ("family", "os_name"),
    [
        (GuestOsFamily.LINUX, "Debian GNU/Linux 12 (64-bit)"),
        (GuestOsFamily.WINDOWS, "Microsoft Windows Server 2022 (64-bit)"),
    ],
)
def test_linux_and_windows_guests_are_supported(family: GuestOsFamily, os_name: str) -> None:
    vm = lab_vm(1, 1, 8 * MIB, guest_os=os_name, guest_os_family=family)
    assert check(run_checks(facts(vm)), "os_supported") == CheckResult(
        "os_supported", True, os_name
    )


def test_an_unsupported_guest_os_fails_naming_it() -> None:
    vm = lab_vm(1, 1, 8 * MIB, guest_os="FreeBSD 13 (64-bit)", guest_os_family=GuestOsFamily.OTHER)
    assert only_failures(run_checks(facts(vm))) == {
        "os_supported": "FreeBSD 13 (64-bit) is not a supported guest OS"
    }


def test_tools_not_installed_fail_whatever_the_power_state() -> None:
    for power in PowerState:
        vm = lab_vm(1, 1, 8 * MIB, power_state=power, tools_status=ToolsStatus.NOT_INSTALLED)
        result = check(run_checks(facts(vm)), "tools_running")
        assert result == CheckResult("tools_running", False, "guest tools are not installed")


def test_tools_not_running_in_a_running_vm_fail() -> None:
    vm = lab_vm(1, 1, 8 * MIB, tools_status=ToolsStatus.NOT_RUNNING)
    assert only_failures(run_checks(facts(vm))) == {"tools_running": "guest tools are not running"}


def test_tools_not_running_in_a_powered_off_vm_pass_prepared_offline() -> None:
    vm = lab_vm(1, 1, 8 * MIB, power_state=PowerState.OFF, tools_status=ToolsStatus.NOT_RUNNING)
    result = run_checks(facts(vm, has_credentials=False))
    assert only_failures(result) == {}
    assert "prepared offline" in check(result, "tools_running").reason


# --- disks and firmware --------------------------------------------------------------


def test_the_boot_disk_must_come_first() -> None:
    data = DiskConfig("disk-0", "Hard disk 1", 8 * MIB)
    boot = DiskConfig("disk-1", "Hard disk 2", 8 * MIB, boot=True)
    vm = replace(lab_vm(1, 1, 8 * MIB), disks=(data, boot))
    assert only_failures(run_checks(facts(vm))) == {
        "os_on_first_disk": "the boot disk is not the first disk"
    }


def test_a_vm_without_disks_has_no_os_on_its_first_disk() -> None:
    vm = replace(lab_vm(1, 1, 8 * MIB), disks=())
    assert not check(run_checks(facts(vm)), "os_on_first_disk").passed


@pytest.mark.parametrize("firmware", list(Firmware))
def test_bios_and_uefi_guests_are_both_supported(firmware: Firmware) -> None:
    vm = lab_vm(1, 1, 8 * MIB, firmware=firmware)
    result = check(run_checks(facts(vm)), "firmware")
    assert result == CheckResult("firmware", True, f"{firmware.value} supported")


# --- networks --------------------------------------------------------------------------


def test_every_nic_needs_a_target_network() -> None:
    nics = (
        NicConfig("nic-0", "00:50:56:00:00:01", "prod-app"),
        NicConfig("nic-1", "00:50:56:00:00:02", "dmz"),
        NicConfig("nic-2", "00:50:56:00:00:03", "backup"),
        NicConfig("nic-3", "00:50:56:00:00:04", "dmz"),
    )
    vm = lab_vm(1, 1, 8 * MIB, nics=nics)
    assert only_failures(run_checks(facts(vm, network_map={"prod-app": "cloud-app"}))) == {
        "target_networks": "no target network for backup, dmz"  # sorted, each named once
    }
    mapped = {"prod-app": "cloud-app", "dmz": "cloud-dmz", "backup": "cloud-backup"}
    assert only_failures(run_checks(facts(vm, network_map=mapped))) == {}


def test_a_mapping_to_a_network_the_target_lacks_fails() -> None:
    result = run_checks(facts(network_map={"prod-app": "no-such-net"}))
    assert only_failures(result) == {"target_networks": "no target network for prod-app"}


def test_an_unmapped_nic_keeps_its_name_when_the_target_has_that_network() -> None:
    target = cloud_site_config()
    assert target_network("cloud-app", {}, target) == "cloud-app"
    assert target_network("prod-app", {}, target) is None
    assert target_network("prod-app", {"prod-app": "cloud-db"}, target) == "cloud-db"
    vm = lab_vm(1, 1, 8 * MIB, nics=(NicConfig("nic-0", "00:50:56:00:00:01", "cloud-app"),))
    assert check(run_checks(facts(vm, network_map={})), "target_networks").passed


def test_a_vm_without_nics_needs_no_networks() -> None:
    vm = lab_vm(1, 1, 8 * MIB, nics=())
    assert check(run_checks(facts(vm, network_map={})), "target_networks").passed


# --- capacity ----------------------------------------------------------------------------


def test_the_target_must_hold_every_disk_at_full_capacity() -> None:
    vm = lab_vm(1, disks=2, disk_size=64 * MIB)  # 64 MiB + 32 MiB
    needed = 96 * MIB
    assert check(run_checks(facts(vm, target_free_bytes=needed)), "target_capacity").passed
    result = run_checks(facts(vm, target_free_bytes=needed - 1))
    assert only_failures(result) == {"target_capacity": f"{needed} bytes needed, {needed - 1} free"}


# --- credentials ---------------------------------------------------------------------------


def test_a_running_vm_needs_guest_credentials() -> None:
    vm = lab_vm(1, 1, 8 * MIB)
    assert needs_credentials(vm)
    assert only_failures(run_checks(facts(vm, has_credentials=False))) == {
        "credentials": "guest credentials are required for a running VM"
    }
    with_them = check(run_checks(facts(vm, has_credentials=True)), "credentials")
    assert with_them == CheckResult("credentials", True, "used and dropped")


@pytest.mark.parametrize("has_credentials", [False, True])
def test_a_powered_off_vm_needs_none(has_credentials: bool) -> None:
    vm = lab_vm(1, 1, 8 * MIB, power_state=PowerState.OFF, tools_status=ToolsStatus.NOT_RUNNING)
    assert not needs_credentials(vm)
    result = check(run_checks(facts(vm, has_credentials=has_credentials)), "credentials")
    assert result == CheckResult("credentials", True, "not needed for a powered-off VM")


def test_every_failure_is_reported_at_once() -> None:
    vm = replace(
        lab_vm(1, 1, 8 * MIB),
        guest_os="FreeBSD 13 (64-bit)",
        guest_os_family=GuestOsFamily.OTHER,
        tools_status=ToolsStatus.NOT_INSTALLED,
        disks=(DiskConfig("disk-0", "Hard disk 1", 8 * MIB, boot=False),),
        nics=(NicConfig("nic-0", "00:50:56:00:00:01", "dmz"),),
    )
    result = run_checks(
        facts(vm, lock_holder="m-other", target_free_bytes=0, has_credentials=False, network_map={})
    )
    assert set(only_failures(result)) == set(CHECKS) - {"firmware"}
    assert all(c.reason for c in result if not c.passed)
