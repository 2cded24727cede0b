"""Answering SourceInventoryRequest: filter, order, and page the source site's VMs.

Pages are keyset-paged on (name, vm_id), so VMs added or removed between pages
never shift the rest; the token also pins the filters it was issued for. A page
is shrunk until its message fits the configured size limit, never truncated:
``next_page_token`` always leads to the rest.
"""

from __future__ import annotations

import base64
import binascii
import fnmatch
import hashlib
import json
from collections.abc import Awaitable, Callable, Sequence

from appliance.errors import CommandRejected
from appliance.sites.model import VmConfig
from appliance.sites.protocol import Site
from messages.commands import InventoryFilter, SourceInventoryRequestBody
from messages.common import DiskInfo, MigrationState, NicInfo, VmSummary
from messages.events import SourceInventoryResponseBody

ENVELOPE_ALLOWANCE = 2048  # bytes of envelope around the body, with room to spare
MigrationStatesOf = Callable[[Sequence[str]], Awaitable[dict[str, MigrationState]]]
"""The state of each VM's latest migration, by VM id (VMs never migrated are left out)."""


async def _never_migrated(_vm_ids: Sequence[str]) -> dict[str, MigrationState]:
    return {}


def summary(vm: VmConfig, migration_state: MigrationState | None = None) -> VmSummary:
    return VmSummary(
        vm_id=vm.vm_id,
        name=vm.name,
        guest_os=vm.guest_os,
        guest_os_family=vm.guest_os_family,
        firmware=vm.firmware,
        cpus=vm.cpus,
        memory_mib=vm.memory_mib,
        disks=tuple(
            DiskInfo(disk_id=d.disk_id, label=d.label, capacity_bytes=d.capacity_bytes, boot=d.boot)
            for d in vm.disks
        ),
        nics=tuple(NicInfo(nic_id=n.nic_id, mac=n.mac, network=n.network) for n in vm.nics),
        resource_pool=vm.resource_pool,
        cluster=vm.cluster,
        power_state=vm.power_state,
        tools_status=vm.tools_status,
        migration_state=migration_state,
    )


def matches(vm: VmConfig, filters: InventoryFilter) -> bool:
    if filters.name_glob is not None and not fnmatch.fnmatchcase(vm.name, filters.name_glob):
        return False
    if filters.cluster is not None and vm.cluster != filters.cluster:
        return False
    return filters.power_state is None or vm.power_state is filters.power_state


def _filter_digest(filters: InventoryFilter) -> str:
    return hashlib.sha256(filters.model_dump_json().encode()).hexdigest()[:16]


def encode_token(after: tuple[str, str], filters: InventoryFilter) -> str:
    raw = json.dumps({"after": list(after), "f": _filter_digest(filters)}).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_token(token: str, filters: InventoryFilter) -> tuple[str, str]:
    try:
        padded = token + "=" * (-len(token) % 4)
        data = json.loads(base64.urlsafe_b64decode(padded.encode()))
        name, vm_id = data["after"]
        digest = data["f"]
    except (ValueError, KeyError, TypeError, binascii.Error):
        raise CommandRejected("page_token is not one this appliance issued") from None
    if digest != _filter_digest(filters) or not isinstance(name, str):
        raise CommandRejected("page_token was issued for different filters")
    return name, str(vm_id)


class Inventory:
    def __init__(
        self,
        site: Site,
        max_message_bytes: int,
        migration_states_of: MigrationStatesOf = _never_migrated,
    ) -> None:
        self._site = site
        self._budget = max_message_bytes - ENVELOPE_ALLOWANCE
        self._states_of = migration_states_of

    async def page(self, request: SourceInventoryRequestBody) -> SourceInventoryResponseBody:
        vms = sorted(
            (vm for vm in await self._site.list_vms() if matches(vm, request.filters)),
            key=lambda vm: (vm.name, vm.vm_id),
        )
        start = 0
        if request.page_token is not None:
            after = decode_token(request.page_token, request.filters)
            start = next((i for i, vm in enumerate(vms) if (vm.name, vm.vm_id) > after), len(vms))
        page = vms[start : start + request.page_size]
        states = await self._states_of([vm.vm_id for vm in page])
        return self._fit(vms, start, request, states)

    def _fit(
        self,
        vms: Sequence[VmConfig],
        start: int,
        request: SourceInventoryRequestBody,
        states: dict[str, MigrationState],
    ) -> SourceInventoryResponseBody:
        count = min(request.page_size, len(vms) - start)
        while True:
            chosen = vms[start : start + count]
            more = start + count < len(vms)
            token = (
                encode_token((chosen[-1].name, chosen[-1].vm_id), request.filters)
                if (more and chosen)
                else None
            )
            body = SourceInventoryResponseBody(
                vms=tuple(summary(vm, states.get(vm.vm_id)) for vm in chosen),
                next_page_token=token,
                total_count=len(vms),
            )
            if count <= 1 or len(body.model_dump_json()) <= self._budget:
                return body
            count //= 2
