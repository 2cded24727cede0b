"""The one protocol every site driver implements (lab today; vSphere and KVM later)."""

from __future__ import annotations

from typing import Protocol

from appliance.sites.model import SiteConfig, VmConfig


class Site(Protocol):
    @property
    def name(self) -> str: ...

    async def config(self) -> SiteConfig: ...

    async def list_vms(self) -> list[VmConfig]:
        """Every VM of the site, whole: never cut at a limit."""
        ...

    async def get_vm(self, vm_id: str) -> VmConfig:
        """Raises UnknownVm."""
        ...
