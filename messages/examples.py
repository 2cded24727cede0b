"""One example of every message, for the protocol document and the tests.

python -m messages.examples            print them as Markdown: commands signed with the
                                       token "example-token", events with the example key
python -m messages.examples --vectors  print the RFC 8785 (JCS) test vectors
"""

from __future__ import annotations

import hashlib
import hmac
import json
import sys
from datetime import UTC, datetime

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
    EventsRequest,
    EventsRequestBody,
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
    VmRef,
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
from messages.envelope import Envelope, canonical_json
from messages.errors import ErrorCode
from messages.events import (
    CommandResponse,
    CommandResponseBody,
    ComponentState,
    ComponentStatus,
    ErrorResponse,
    ErrorResponseBody,
    EventsResponse,
    EventsResponseBody,
    Heartbeat,
    HeartbeatBody,
    LoggedEvent,
    MigrationStatus,
    PrepareCheck,
    ReadyStatus,
    SourceCloneResponse,
    SourceInventoryResponse,
    SourceInventoryResponseBody,
    StatusResponse,
    StatusResponseBody,
)
from messages.keys import ApplianceKeyPair

EXAMPLE_TOKEN = "example-token"
EXAMPLE_SIGNING_SEED = hashlib.sha256(b"ferry example ed25519 seed").digest()
EXAMPLE_SEALING_SECRET = hashlib.sha256(b"ferry example x25519 secret").digest()
EXAMPLE_KEYS = ApplianceKeyPair(EXAMPLE_SIGNING_SEED, EXAMPLE_SEALING_SECRET)
"""The example appliance's key pair: its private halves are public knowledge, never use it."""
EXAMPLE_LOGIN = ("admin", "s3cret")
EXAMPLE_SEALED = (
    "wtzXCvTTWAe8+IOthMVyjZCvuFJg27QpaRRGnJseqG3t8WHnANApAa0+0y9AWcoDS8TF4RWbilRKCAa6ESuGk71YSHNv"
    "D/5xfFY6MLULWCITF7FA+C1TnvEIGA=="
)
"""EXAMPLE_LOGIN sealed to EXAMPLE_KEYS (a sealed box is randomised, so it is fixed here)."""
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
    volumes=("mig-5b1e0c2a-disk-0",),
)

_IN_CLOUD = MigrationStatus(
    migration_id="mig-77d0a4e1",
    request_id="req-43",
    vm_id="vm-0003",
    vm_name="lnx-db-01",
    migration_type=MigrationType.TBC,
    state=MigrationState.RUNNING,
    phase=Phase.IN_CLOUD,
    progress_percent=0.0,
    updated_at=AT,
    committed_epoch=3,
    last_epoch_at=datetime(2026, 11, 21, 9, 20, tzinfo=UTC),
    rpo_lag_s=600.0,
    dirty_bytes=734_003_200,
    cache_bytes=3_221_225_472,
    volumes=("lnx-db-01_ARM", "lnx-db-01_ARM_2"),
)


def _bodies() -> list[Envelope]:
    clone = SourceCloneRequestBody(
        request_id="req-42",
        vms=(CloneVm(name="lnx-web-01"), CloneVm(vm_id="vm-0002")),
        migration_type=MigrationType.COLD,
        guest_credentials=GuestCredentials(sealed=EXAMPLE_SEALED),
        target=TargetResources(site="cloud", resource_pool="migrated"),
        network_map=(NetworkMapping(source="prod-app", target="cloud-app"),),
        application_dependency=((VmRef(name="lnx-web-01"), VmRef(vm_id="vm-0002")),),
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
        appliance_key=EXAMPLE_KEYS.public.text,
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
                cluster="cluster-a",
                rto_rpo_interval_s=600,
                rpo_dirty_bytes=10 * 2**30,
                max_concurrent_migrations=4,
                max_in_progress_per_cache_node=2,
                bandwidth_cap_mbps=300,
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
                status=ReadyStatus.READY,
                migrations=(_STATUS, _IN_CLOUD),
                migration_counts={"running": 2},
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
        EventsRequest(body=EventsRequestBody(kinds=("component_failed",), count=20)),
        EventsResponse(
            body=EventsResponseBody(
                events=(
                    LoggedEvent(
                        event_id="1764581523000-0",
                        kind="component_failed",
                        at="2026-12-01T09:32:03+00:00",
                        fields={
                            "component": "cache/cache-1",
                            "detail": "no heartbeat for 120.4s (timeout 120s)",
                        },
                    ),
                )
            )
        ),
    ]


def examples() -> list[Envelope]:
    """Every message type once, with fixed ids and times, signed: commands with
    EXAMPLE_TOKEN, events with EXAMPLE_KEYS (Ed25519 signatures are deterministic)."""
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
        out.append(sign(fixed, EXAMPLE_KEYS if message.KIND == "event" else EXAMPLE_TOKEN))
    assert {m.message_type for m in out} == set(MESSAGE_TYPES), "an example is missing"
    return out


JCS_VECTORS = (
    r'{"b": 2, "a": 1, "c": {"z": [3, {"y": null, "x": true}], "w": false}}',
    r'{"numbers": [1.0, 1e2, 0.1, 1e-7, 1e21, 1.2345678901234568e20, -0.0, 3.14159, 5e-324]}',
    r'{"big": 9007199254740991, "negative": -9007199254740991, "zero": 0}',
    r'{"name": "caf\u00e9 \u2615 \ud834\udd1e", "\u20ac": "\u20ac", '
    r'"\ud83d\ude00": "emoji key", "\ufb01": "ligature key"}',
    r'{"s": "line\nbreak \"quoted\" \\ tab\t \u0001 \u001f /"}',
)
"""Inputs whose canonical form a client in another language checks itself against."""

JCS_REJECTED = ('{"too_big": 9007199254740993}',)
"""Inputs with no canonical form: integers beyond 2**53 - 1 (send those as strings)."""


def vectors() -> list[dict[str, str]]:
    """Each JCS vector: its input, canonical text, HMAC with EXAMPLE_TOKEN, Ed25519 with
    EXAMPLE_KEYS (hex)."""
    out = []
    for text in JCS_VECTORS:
        canonical = canonical_json(json.loads(text))
        out.append(
            {
                "input": text,
                "canonical": canonical.decode("utf-8"),
                "hmac_sha256": hmac.new(EXAMPLE_TOKEN.encode(), canonical, "sha256").hexdigest(),
                "ed25519": EXAMPLE_KEYS.sign(canonical).hex(),
            }
        )
    return out


def vectors_markdown() -> str:
    return "```json\n" + json.dumps(vectors(), indent=2, ensure_ascii=False) + "\n```\n"


def markdown() -> str:
    parts = []
    for message in examples():
        parts.append(f"### {message.message_type}\n")
        parts.append("```json\n" + json.dumps(message.wire_dict(), indent=2) + "\n```\n")
    return "\n".join(parts)


if __name__ == "__main__":
    print(vectors_markdown() if sys.argv[1:] == ["--vectors"] else markdown())
