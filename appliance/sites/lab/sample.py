"""A sample on-prem site with realistic variety, reproducible from a seed."""

from __future__ import annotations

import random
from dataclasses import dataclass

from appliance.sites.model import Datastore, DiskConfig, NicConfig, SiteConfig, VmConfig
from messages.common import Firmware, GuestOsFamily, PowerState, ToolsStatus

MIB = 1024 * 1024
GIB = 1024 * MIB

GUESTS: tuple[tuple[str, GuestOsFamily], ...] = (
    ("Ubuntu Linux 22.04 (64-bit)", GuestOsFamily.LINUX),
    ("Red Hat Enterprise Linux 9 (64-bit)", GuestOsFamily.LINUX),
    ("Debian GNU/Linux 12 (64-bit)", GuestOsFamily.LINUX),
    ("SUSE Linux Enterprise 15 (64-bit)", GuestOsFamily.LINUX),
    ("CentOS 7 (64-bit)", GuestOsFamily.LINUX),
    ("Microsoft Windows Server 2022 (64-bit)", GuestOsFamily.WINDOWS),
    ("Microsoft Windows Server 2019 (64-bit)", GuestOsFamily.WINDOWS),
    ("Microsoft Windows 11 (64-bit)", GuestOsFamily.WINDOWS),
    ("FreeBSD 13 (64-bit)", GuestOsFamily.OTHER),
)
ROLES = ("web", "app", "db", "cache", "mq", "build", "ad", "file", "mail", "monitor")
ONPREM_NETWORKS = ("VM Network", "prod-app", "prod-db", "dmz", "backup")
ONPREM_POOLS = ("Production", "Development", "Test")
ONPREM_CLUSTERS = ("cluster-a", "cluster-b")


@dataclass(frozen=True, slots=True)
class SampleSpec:
    vms: int = 12
    seed: int = 7
    disk_size: int = 64 * MIB  # the boot disk; data disks are 1/2 or 1/4 of it


def onprem_site_config(name: str = "onprem") -> SiteConfig:
    return SiteConfig(
        name=name,
        kind="onprem",
        clusters=ONPREM_CLUSTERS,
        networks=ONPREM_NETWORKS,
        resource_pools=ONPREM_POOLS,
        datastores=(Datastore("datastore1", 2048 * GIB), Datastore("datastore2", 1024 * GIB)),
    )


CLOUD_NETWORKS = ("cloud-default", "cloud-app", "cloud-db", "cloud-dmz", "cloud-backup")
CLOUD_POOLS = ("migrated", "default")


def cloud_site_config(name: str = "cloud") -> SiteConfig:
    return SiteConfig(
        name=name,
        kind="cloud",
        clusters=("cloud-cluster",),
        networks=CLOUD_NETWORKS,
        resource_pools=CLOUD_POOLS,
        datastores=(Datastore("cloud-store", 16 * 1024 * GIB),),
    )


def _mac(rng: random.Random) -> str:
    return "00:50:56:" + ":".join(f"{rng.randrange(256):02x}" for _ in range(3))


def _disks(rng: random.Random, spec: SampleSpec) -> tuple[DiskConfig, ...]:
    count = rng.choice((1, 1, 2, 2, 3))
    disks = [DiskConfig("disk-0", "Hard disk 1", spec.disk_size, boot=True)]
    for index in range(1, count):
        size = spec.disk_size // rng.choice((2, 4))
        disks.append(DiskConfig(f"disk-{index}", f"Hard disk {index + 1}", size))
    return tuple(disks)


def _nics(rng: random.Random) -> tuple[NicConfig, ...]:
    count = rng.choice((1, 1, 1, 2))
    networks = rng.sample(ONPREM_NETWORKS, count)
    return tuple(
        NicConfig(f"nic-{index}", _mac(rng), network) for index, network in enumerate(networks)
    )


def sample_vm(index: int, rng: random.Random, spec: SampleSpec) -> VmConfig:
    guest_os, family = GUESTS[index % len(GUESTS)]
    windows = family is GuestOsFamily.WINDOWS
    firmware = Firmware.UEFI if (windows or rng.random() < 0.4) else Firmware.BIOS
    power = PowerState.ON if rng.random() < 0.75 else PowerState.OFF
    tools = ToolsStatus.RUNNING if power is PowerState.ON else ToolsStatus.NOT_RUNNING
    if rng.random() < 0.1:
        tools = ToolsStatus.NOT_INSTALLED
    role = ROLES[index % len(ROLES)]
    prefix = "win" if windows else "lnx"
    return VmConfig(
        vm_id=f"vm-{index + 1:04d}",
        name=f"{prefix}-{role}-{index + 1:02d}",
        guest_os=guest_os,
        guest_os_family=family,
        firmware=firmware,
        cpus=rng.choice((1, 2, 2, 4, 8)),
        memory_mib=rng.choice((1024, 2048, 4096, 8192, 16384)),
        disks=_disks(rng, spec),
        nics=_nics(rng),
        resource_pool=rng.choice(ONPREM_POOLS),
        cluster=ONPREM_CLUSTERS[index % len(ONPREM_CLUSTERS)],
        power_state=power,
        tools_status=tools,
    )


def sample_vms(spec: SampleSpec) -> list[VmConfig]:
    rng = random.Random(spec.seed)
    return [sample_vm(index, rng, spec) for index in range(spec.vms)]
