"""Prepare-to-migrate checks: each reported by name, pass or fail, with the reason.

Pure functions over what the sites say; the workflow gathers the facts and
records the results. UEFI guests are supported (HDM refuses them).
"""

from __future__ import annotations

from dataclasses import dataclass

from appliance.orchestrator.record import CheckResult
from appliance.sites.model import SiteConfig, VmConfig
from messages.common import GuestOsFamily, PowerState, ToolsStatus

SUPPORTED_FAMILIES = (GuestOsFamily.LINUX, GuestOsFamily.WINDOWS)


@dataclass(frozen=True, slots=True)
class PrecheckFacts:
    vm: VmConfig
    lock_holder: str | None
    migration_id: str
    target: SiteConfig
    target_free_bytes: int
    network_map: dict[str, str]
    has_credentials: bool


def needs_credentials(vm: VmConfig) -> bool:
    """Guest preparation runs inside a running guest; a powered-off VM is prepared offline."""
    return vm.power_state is PowerState.ON


def target_network(source: str, network_map: dict[str, str], target: SiteConfig) -> str | None:
    wanted = network_map.get(source, source)
    return wanted if wanted in target.networks else None


def run_checks(facts: PrecheckFacts) -> tuple[CheckResult, ...]:
    vm = facts.vm
    return (
        _not_migrating(facts),
        _os_supported(vm),
        _tools(vm),
        _boot_disk(vm),
        CheckResult("firmware", True, f"{vm.firmware.value} supported"),
        _networks(facts),
        _capacity(facts),
        _credentials(facts),
    )


def _not_migrating(facts: PrecheckFacts) -> CheckResult:
    if facts.lock_holder in (None, facts.migration_id):
        return CheckResult("not_already_migrating", True)
    return CheckResult("not_already_migrating", False, f"held by migration {facts.lock_holder}")


def _os_supported(vm: VmConfig) -> CheckResult:
    if vm.guest_os_family in SUPPORTED_FAMILIES:
        return CheckResult("os_supported", True, vm.guest_os)
    return CheckResult("os_supported", False, f"{vm.guest_os} is not a supported guest OS")


def _tools(vm: VmConfig) -> CheckResult:
    if vm.tools_status is ToolsStatus.RUNNING:
        return CheckResult("tools_running", True)
    if vm.tools_status is ToolsStatus.NOT_INSTALLED:
        return CheckResult("tools_running", False, "guest tools are not installed")
    if vm.power_state is not PowerState.ON:
        return CheckResult("tools_running", True, "VM is powered off: prepared offline")
    return CheckResult("tools_running", False, "guest tools are not running")


def _boot_disk(vm: VmConfig) -> CheckResult:
    if vm.disks and vm.disks[0].boot:
        return CheckResult("os_on_first_disk", True)
    return CheckResult("os_on_first_disk", False, "the boot disk is not the first disk")


def _networks(facts: PrecheckFacts) -> CheckResult:
    missing = [
        nic.network
        for nic in facts.vm.nics
        if target_network(nic.network, facts.network_map, facts.target) is None
    ]
    if not missing:
        return CheckResult("target_networks", True)
    return CheckResult(
        "target_networks", False, "no target network for " + ", ".join(sorted(set(missing)))
    )


def _capacity(facts: PrecheckFacts) -> CheckResult:
    needed = sum(disk.capacity_bytes for disk in facts.vm.disks)
    if needed <= facts.target_free_bytes:
        return CheckResult("target_capacity", True, f"{needed} bytes needed")
    return CheckResult(
        "target_capacity", False, f"{needed} bytes needed, {facts.target_free_bytes} free"
    )


def _credentials(facts: PrecheckFacts) -> CheckResult:
    if not needs_credentials(facts.vm):
        return CheckResult("credentials", True, "not needed for a powered-off VM")
    if facts.has_credentials:
        return CheckResult("credentials", True, "used and dropped")
    return CheckResult("credentials", False, "guest credentials are required for a running VM")
