"""Check a package by hand, without a target: is every chunk there, and is each one intact?

``ferry-appliance package verify LOCATION`` runs this before (or instead of)
an import: it fetches and hashes every chunk the manifest lists and reports
every missing or corrupt one, plus objects the manifest does not know.
"""

from __future__ import annotations

from dataclasses import dataclass

from appliance.datapath.package.importing import load_manifest
from appliance.datapath.package.manifest import MANIFEST_NAME, ChunkEntry, DiskEntry
from appliance.datapath.package.store import PackageStore
from appliance.datapath.workers import run_bounded
from appliance.errors import PackageChunkCorrupt, PackageChunkMissing, PackageDefects
from appliance.storage.hashing import chunk_hash


@dataclass(frozen=True, slots=True)
class VerifyReport:
    location: str
    migration_id: str
    manifest_sha256: str
    disks: int
    chunks_checked: int
    bytes_checked: int
    defects: tuple[PackageChunkMissing | PackageChunkCorrupt, ...]
    unknown_objects: tuple[str, ...]
    """Objects in the package the manifest does not list (harmless; left by other exports)."""

    @property
    def ok(self) -> bool:
        return not self.defects

    def raise_for_defects(self) -> None:
        if self.defects:
            raise PackageDefects(self.location, self.defects)


async def verify_package(
    store: PackageStore, expected_sha256: str | None = None, *, workers: int = 4
) -> VerifyReport:
    """Every chunk fetched and hashed; ``expected_sha256`` None accepts any valid manifest."""
    manifest, sha = await load_manifest(store, expected_sha256)
    present = await store.list()
    defects: list[PackageChunkMissing | PackageChunkCorrupt] = []
    checked = [0, 0]

    async def check(item: tuple[DiskEntry, ChunkEntry]) -> None:
        disk, chunk = item
        data = await store.get(chunk.object) if chunk.object in present else None
        if data is None:
            defects.append(
                PackageChunkMissing(disk.disk_id, chunk.offset, chunk.length, chunk.object)
            )
            return
        checked[0] += 1
        checked[1] += len(data)
        found = chunk_hash(data).hex()
        if found != chunk.hash or len(data) != chunk.length:
            defects.append(
                PackageChunkCorrupt(
                    disk.disk_id, chunk.offset, chunk.length, chunk.object, chunk.hash, found
                )
            )

    items = ((disk, chunk) for disk in manifest.disks for chunk in disk.chunks)
    await run_bounded(items, check, workers=workers)
    listed = {chunk.object for disk in manifest.disks for chunk in disk.chunks} | {MANIFEST_NAME}
    order = {disk.disk_id: n for n, disk in enumerate(manifest.disks)}
    defects.sort(key=lambda d: (order[d.disk_id], d.offset))
    return VerifyReport(
        location=store.location,
        migration_id=manifest.migration_id,
        manifest_sha256=sha,
        disks=len(manifest.disks),
        chunks_checked=checked[0],
        bytes_checked=checked[1],
        defects=tuple(defects),
        unknown_objects=tuple(sorted(set(present) - listed)),
    )
