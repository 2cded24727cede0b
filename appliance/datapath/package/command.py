"""``ferry-appliance package verify LOCATION``: a package checked by hand, printed."""

from __future__ import annotations

import asyncio
import json
import sys

from appliance.datapath.package.store import S3Access, open_store
from appliance.datapath.package.verify import VerifyReport, verify_package
from appliance.errors import PackageChunkMissing
from appliance.settings import Settings


async def _verify(settings: Settings, location: str, manifest_sha256: str | None) -> VerifyReport:
    async with open_store(location, S3Access.from_settings(settings)) as store:
        return await verify_package(store, manifest_sha256)


def _document(report: VerifyReport) -> dict[str, object]:
    return {
        "location": report.location,
        "migration_id": report.migration_id,
        "manifest_sha256": report.manifest_sha256,
        "disks": report.disks,
        "chunks_checked": report.chunks_checked,
        "bytes_checked": report.bytes_checked,
        "ok": report.ok,
        "defects": [
            {
                "kind": "missing" if isinstance(d, PackageChunkMissing) else "corrupt",
                "disk_id": d.disk_id,
                "offset": d.offset,
                "length": d.length,
                "object": d.object_name,
                "message": str(d),
            }
            for d in report.defects
        ],
        "unknown_objects": list(report.unknown_objects),
    }


def verify_command(
    settings: Settings, location: str, manifest_sha256: str | None, as_json: bool
) -> int:
    """0 when every chunk is there and intact, 1 otherwise (manifest errors raise)."""
    report = asyncio.run(_verify(settings, location, manifest_sha256))
    if as_json:
        print(json.dumps(_document(report), indent=2))
        return 0 if report.ok else 1
    print(
        f"package {report.location} (migration {report.migration_id}, manifest sha256 "
        f"{report.manifest_sha256}): {report.disks} disk(s), {report.chunks_checked} chunk(s), "
        f"{report.bytes_checked} bytes checked"
    )
    for defect in report.defects:
        print(f"  DEFECT {defect}", file=sys.stderr)
    for name in report.unknown_objects:
        print(f"  not in the manifest (ignored): {name}")
    print("OK" if report.ok else f"{len(report.defects)} defect(s): the package needs correcting")
    return 0 if report.ok else 1
