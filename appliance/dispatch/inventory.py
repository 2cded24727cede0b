"""Answering SourceInventoryRequest: filter, order, and page the source site's VMs.

Pages are keyset-paged on (name, vm_id), so VMs added or removed between pages
never shift the rest; the token also pins the filters it was issued for. A page
is shrunk until its message fits the configured size limit, never truncated:
``next_page_token`` always leads to the rest.

One bad VM never hides the others: a VM whose configuration the site cannot
read, or whose description is not fit for the wire (a 10,000 character name, a
lone surrogate), is left out, listed in ``skipped`` on the first page, logged,
and handed to ``on_skipped`` (the event log).
"""

from __future__ import annotations

import base64
import binascii
import fnmatch
import hashlib
import json
from collections.abc import Awaitable, Callable, Sequence

from pydantic import ValidationError

from appliance.errors import CommandRejected
from appliance.logs import get_logger
from appliance.sites.model import VmConfig, safe_label
from appliance.sites.protocol import Site
from messages.commands import InventoryFilter, SourceInventoryRequestBody
from messages.common import DiskInfo, MigrationState, NicInfo, VmSummary
from messages.errors import ErrorCode
from messages.events import InventorySkip, SourceInventoryResponseBody

ENVELOPE_ALLOWANCE = 2048  # bytes of envelope around the body, with room to spare
MigrationStatesOf = Callable[[Sequence[str]], Awaitable[dict[str, MigrationState]]]
"""The state of each VM's latest migration, by VM id (VMs never migrated are left out)."""
SkipReport = Callable[[InventorySkip], Awaitable[None]]
log = get_logger(__name__)


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


def wire_summary(vm: VmConfig, migration_state: MigrationState | None) -> VmSummary | str:
    """The VM's wire description, or why it has none (a field the wire refuses)."""
    try:
        described = summary(vm, migration_state)
        described.model_dump_json().encode("utf-8")
    except ValidationError as error:
        fields = sorted({".".join(str(p) for p in e["loc"]) for e in error.errors()})
        return f"not fit for the wire: {', '.join(fields)[:200]}"
    except (UnicodeError, ValueError):
        return "not fit for the wire: a text field is not valid UTF-8"
    return described


def _skip(vm_id: str, reason: str) -> InventorySkip:
    return InventorySkip(
        vm_id=safe_label(vm_id, 255), code=ErrorCode.INVALID_VM.value, message=reason[:1024]
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
    # UTF-8, not \u escapes: a 255 character name of any script fits the token's limit.
    document = {"after": list(after), "f": _filter_digest(filters)}
    raw = json.dumps(document, ensure_ascii=False).encode("utf-8")
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
        on_skipped: SkipReport | None = None,
    ) -> None:
        self._site = site
        self._budget = max_message_bytes - ENVELOPE_ALLOWANCE
        self._states_of = migration_states_of
        self._on_skipped = on_skipped

    async def page(self, request: SourceInventoryRequestBody) -> SourceInventoryResponseBody:
        scan = await self._site.scan_vms()
        skipped = [_skip(p.vm_id, p.reason) for p in scan.problems]
        described: list[tuple[VmConfig, VmSummary]] = []
        for vm in scan.vms:
            if not matches(vm, request.filters):
                continue
            outcome = wire_summary(vm, None)
            if isinstance(outcome, str):
                skipped.append(_skip(vm.vm_id, f"VM {safe_label(vm.vm_id)}: {outcome}"))
            else:
                described.append((vm, outcome))
        described.sort(key=lambda pair: (pair[0].name, pair[0].vm_id))
        start = 0
        if request.page_token is not None:
            after = decode_token(request.page_token, request.filters)
            start = next(
                (i for i, (vm, _) in enumerate(described) if (vm.name, vm.vm_id) > after),
                len(described),
            )
        await self._report(skipped)
        await self._add_states(described, start, request.page_size)
        return self._fit(described, start, request, tuple(skipped) if start == 0 else ())

    async def _add_states(
        self, described: list[tuple[VmConfig, VmSummary]], start: int, page_size: int
    ) -> None:
        """Fill migration_state for the VMs this page can hold (one batched lookup)."""
        window = range(start, min(start + page_size, len(described)))
        states = await self._states_of([described[i][0].vm_id for i in window])
        for i in window:
            vm, vm_summary = described[i]
            state = states.get(vm.vm_id)
            if state is not None:
                described[i] = (vm, vm_summary.model_copy(update={"migration_state": state}))

    async def _report(self, skipped: list[InventorySkip]) -> None:
        for skip in skipped:
            log.warning("VM left out of the inventory", vm_id=skip.vm_id, reason=skip.message)
            if self._on_skipped is not None:
                await self._on_skipped(skip)

    def _fit(
        self,
        vms: Sequence[tuple[VmConfig, VmSummary]],
        start: int,
        request: SourceInventoryRequestBody,
        skipped: tuple[InventorySkip, ...],
    ) -> SourceInventoryResponseBody:
        count = min(request.page_size, len(vms) - start)
        while True:
            chosen = vms[start : start + count]
            more = start + count < len(vms)
            last = chosen[-1][0] if chosen else None
            token = (
                encode_token((last.name, last.vm_id), request.filters)
                if (more and last is not None)
                else None
            )
            body = SourceInventoryResponseBody(
                vms=tuple(described for _, described in chosen),
                next_page_token=token,
                total_count=len(vms),
                skipped=skipped,
            )
            if count <= 1 or len(body.model_dump_json()) <= self._budget:
                return body
            count //= 2
