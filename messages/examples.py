"""One example of every message, for the protocol document and the tests.

python -m messages.examples    print them as Markdown (signed with the token "example-token")
"""

from __future__ import annotations

import json
from datetime import UTC, datetime

from pydantic import SecretStr

from messages.codec import MESSAGE_TYPES, sign
from messages.commands import (
    BulkMigrationDoneRequest,
    BulkMigrationDoneRequestBody,
    CancelRequest,
    CancelRequestBody,
    CloneOptions,
    CloneVm,
    CommitRequest,
    CommitRequestBody,
    GuestCredentials,
    InventoryFilter,
    MigrateBackRequest,
    MigrateBackRequestBody,
    MigrationSelector,
    NetworkMapping,
    ResetRequest,
    ResetRequestBody,
    SetPolicyRequest,
    SetPolicyRequestBody,
    SourceCloneRequest,
    SourceCloneRequestBody,
    SourceInventoryRequest,
    SourceInventoryRequestBody,
    StatusRequest,
    StatusRequestBody,
    SyncRequest,
    SyncRequestBody,
    TargetResources,
)
from messages.common import (
    DiskInfo,
    Firmware,
    GuestOsFamily,
    MigrationState,
    MigrationType,
    NicInfo,
    Phase,
    PowerState,
    ToolsStatus,
    VmSummary,
)
from messages.envelope import Envelope
from messages.errors import ErrorCode
from messages.events import (
    CommandResponse,
    CommandResponseBody,
    ComponentState,
    ComponentStatus,
    ErrorResponse,
    ErrorResponseBody,
    Heartbeat,
    HeartbeatBody,
    MigrationStatus,
    PrepareCheck,
    ReadyStatus,
    SourceCloneResponse,
    SourceInventoryResponse,
    SourceInventoryResponseBody,
    StatusResponse,
    StatusResponseBody,
)

EXAMPLE_TOKEN = "example-token"
AT = datetime(2026, 11, 21, 9, 30, tzinfo=UTC)
SELECT = MigrationSelector(migration_ids=("mig-5b1e0c2a",))

_VM = VmSummary(
    vm_id="vm-0001",
    name="lnx-web-01",
    guest_os="Ubuntu Linux 22.04 (64-bit)",
    guest_os_family=GuestOsFamily.LINUX,
    firmware=Firmware.UEFI,
    cpus=2,
    memory_mib=4096,
    disks=(DiskInfo(disk_id="disk-0", label="Hard disk 1", capacity_bytes=2**30, boot=True),),
    nics=(NicInfo(nic_id="nic-0", mac="00:50:56:0a:0b:0c", network="prod-app"),),
    resource_pool="Production",
    cluster="cluster-a",
    power_state=PowerState.ON,
    tools_status=ToolsStatus.RUNNING,
)

_STATUS = MigrationStatus(
    migration_id="mig-5b1e0c2a",
    request_id="req-42",
    vm_id="vm-0001",
    vm_name="lnx-web-01",
    migration_type=MigrationType.COLD,
    state=MigrationState.RUNNING,
    phase=Phase.TRANSFER,
    progress_percent=42.5,
    bytes_done=456_340_275,
    bytes_total=1_073_741_824,
    rate_bytes_per_s=104_857_600.0,
    eta_seconds=5.9,
    checks=(PrepareCheck(name="tools_running", passed=True, reason=""),),
    updated_at=AT,
)


def _bodies() -> list[Envelope]:
    clone = SourceCloneRequestBody(
        request_id="req-42",
        vms=(CloneVm(name="lnx-web-01"), CloneVm(vm_id="vm-0002")),
        migration_type=MigrationType.COLD,
        guest_credentials=GuestCredentials(username="admin", password=SecretStr("s3cret")),
        target=TargetResources(site="cloud", resource_pool="migrated"),
        network_map=(NetworkMapping(source="prod-app", target="cloud-app"),),
        application_dependency=(("lnx-web-01", "vm-0002"),),
        options=CloneOptions(bandwidth_cap_mbps=300),
    )
    heartbeat = HeartbeatBody(
        status=ReadyStatus.READY,
        appliance_id="ferry-1",
        sequence=17,
        uptime_s=510.2,
        version="0.1.0",
        components=(ComponentStatus(name="state_store", state=ComponentState.OK, last_ok_at=AT),),
        migration_counts={"running": 1, "completed": 3},
    )
    return [
        SourceInventoryRequest(
            body=SourceInventoryRequestBody(
                filters=InventoryFilter(name_glob="lnx-*", power_state=PowerState.ON), page_size=50
            )
        ),
        SourceCloneRequest(body=clone),
        BulkMigrationDoneRequest(
            body=BulkMigrationDoneRequestBody(select=SELECT, package_location="s3://b/pkg")
        ),
        MigrateBackRequest(body=MigrateBackRequestBody(select=SELECT, planned=True)),
        CommitRequest(body=CommitRequestBody(select=SELECT)),
        SyncRequest(body=SyncRequestBody(select=SELECT)),
        CancelRequest(body=CancelRequestBody(select=MigrationSelector(request_id="req-42"))),
        SetPolicyRequest(
            body=SetPolicyRequestBody(
                cluster="cluster-a", max_concurrent_migrations=4, bandwidth_cap_mbps=300
            )
        ),
        ResetRequest(body=ResetRequestBody(confirm=True)),
        StatusRequest(body=StatusRequestBody(request_id="req-42")),
        Heartbeat(body=heartbeat),
        SourceInventoryResponse(
            body=SourceInventoryResponseBody(
                vms=(_VM,), next_page_token="eyJhZnRlciI6", total_count=7
            )
        ),
        SourceCloneResponse(body=_STATUS),
        StatusResponse(
            body=StatusResponseBody(
                status=ReadyStatus.READY, migrations=(_STATUS,), migration_counts={"running": 1}
            )
        ),
        CommandResponse(
            body=CommandResponseBody(command_type="SetPolicyRequest", detail="policy updated")
        ),
        ErrorResponse(
            body=ErrorResponseBody(
                code=ErrorCode.UNKNOWN_VM,
                message="no VM 'lnx-wbe-01' on site 'onprem'",
                correlation_id="c0ffee00-0000-4000-8000-000000000001",
                command_type="SourceCloneRequest",
            )
        ),
    ]


def examples() -> list[Envelope]:
    """Every message type once, with fixed ids and times, signed with EXAMPLE_TOKEN."""
    out = []
    for index, message in enumerate(_bodies()):
        fixed = message.model_copy(
            update={
                "message_id": f"00000000-0000-4000-8000-{index:012d}",
                "correlation_id": f"c0ffee00-0000-4000-8000-{index:012d}",
                "sent_at": AT,
                "appliance_id": "ferry-1" if message.KIND == "event" else None,
            }
        )
        out.append(sign(fixed, EXAMPLE_TOKEN))
    assert {m.message_type for m in out} == set(MESSAGE_TYPES), "an example is missing"
    return out


def markdown() -> str:
    parts = []
    for message in examples():
        parts.append(f"### {message.message_type}\n")
        parts.append("```json\n" + json.dumps(message.wire_dict(), indent=2) + "\n```\n")
    return "\n".join(parts)


if __name__ == "__main__":
    print(markdown())
