"""Offline packages through real parts: raw sparse files, a directory, LocalStack S3, Redis
checkpoints, a lab site's migrate-time snapshot; ``qemu-img compare`` judges the result."""

from __future__ import annotations

import asyncio
import random
import shutil
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from aiobotocore.session import get_session
from botocore.exceptions import ClientError

from appliance.datapath.nbd import NbdBackend, NbdServer
from appliance.datapath.package import (
    MANIFEST_NAME,
    ExportDisk,
    ExportOptions,
    ImportOptions,
    PackageStore,
    S3Access,
    export_package,
    import_package,
    open_store,
    verify_package,
)
from appliance.datapath.package.manifest import Manifest
from appliance.datapath.package.store import S3Store
from appliance.errors import (
    PackageChunkCorrupt,
    PackageChunkMissing,
    PackageDefects,
    PackageLocationInvalid,
    PackageManifestMismatch,
    PackageStoreUnavailable,
    TransientError,
)
from appliance.sites.lab.site import LabSite
from appliance.state.checkpoints import RedisCheckpointStore
from appliance.state.keys import Keys
from appliance.storage.file import FileBackend
from tests.support.lab import MIB, build_lab, lab_vm

CHUNK = 1 * MIB
OPTIONS = ExportOptions(chunk_size=CHUNK, workers=4)
qemu_img = pytest.mark.skipif(shutil.which("qemu-img") is None, reason="needs qemu-utils")


@pytest.fixture
async def bucket(localstack: str) -> AsyncIterator[tuple[str, S3Access]]:
    """A fresh LocalStack bucket for one test, emptied and deleted afterwards."""
    access = S3Access(endpoint_url=localstack)
    name = f"ferry-package-{uuid.uuid4().hex[:12]}"
    async with s3_client(access) as client:
        await client.create_bucket(Bucket=name)
        yield name, access
        paginator = client.get_paginator("list_objects_v2")
        async for page in paginator.paginate(Bucket=name):
            for item in page.get("Contents", []):
                await client.delete_object(Bucket=name, Key=item["Key"])
        await client.delete_bucket(Bucket=name)


def s3_client(access: S3Access) -> Any:
    return get_session().create_client(
        "s3",
        endpoint_url=access.endpoint_url,
        region_name=access.region,
        aws_access_key_id=access.access_key_id,
        aws_secret_access_key=access.secret_access_key,
    )


async def sparse_raw_disks(directory: Path) -> list[ExportDisk]:
    """Two raw sparse files: data runs, holes, written zeroes, an unaligned short tail."""
    directory.mkdir()
    rng = random.Random(4)
    layouts = {
        "disk-0": (9 * MIB + 12345, [(0, 3 * MIB // 2), (4 * MIB + 4096, 8192), (9 * MIB, 12345)]),
        "disk-1": (5 * MIB, [(2 * MIB, MIB)]),
    }
    disks = []
    for disk_id, (size, runs) in layouts.items():
        backend = FileBackend.create(directory / f"{disk_id}.raw", size)
        for offset, length in runs:
            await backend.write(offset, rng.randbytes(length))
        if disk_id == "disk-0":
            await backend.write(6 * MIB, bytes(MIB))  # allocated, all zero: not stored
        await backend.flush()
        await backend.close()
        source = FileBackend.open(directory / f"{disk_id}.raw", readonly=True)
        disks.append(ExportDisk(disk_id, source))
    return disks


DATA_OBJECTS = 5  # disk-0: chunks 0, 1, 4, 9; disk-1: chunk 2


def raw_targets(directory: Path, disks: list[ExportDisk]) -> dict[str, FileBackend]:
    directory.mkdir(exist_ok=True)
    return {
        d.disk_id: FileBackend.create(directory / f"{d.disk_id}.raw", d.source.size, exist_ok=True)
        for d in disks
    }


async def assert_equal_images(disks: list[ExportDisk], targets: dict[str, FileBackend]) -> None:
    for disk in disks:
        target = targets[disk.disk_id]
        await target.flush()
        assert await target.read(0, target.size) == await disk.source.read(0, disk.source.size)
        compare = await asyncio.create_subprocess_exec(
            *("qemu-img", "compare", "-q", "-f", "raw", "-F", "raw"),
            *(disk.source.name, target.name),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        output, _ = await compare.communicate()
        assert compare.returncode == 0, output.decode()


async def close_all(disks: list[ExportDisk], targets: dict[str, FileBackend]) -> None:
    for disk in disks:
        await disk.source.close()
    for target in targets.values():
        await target.close()


@qemu_img
async def test_a_directory_package_of_sparse_raw_disks_imports_byte_equal(tmp_path: Path) -> None:
    disks = await sparse_raw_disks(tmp_path / "onprem")
    location = tmp_path / "usb" / "mig-7"
    try:
        async with open_store(str(location)) as store:
            exported = await export_package("mig-7", disks, store, options=OPTIONS)
        chunks = sorted(location.rglob("*.chunk"))
        assert len(chunks) == DATA_OBJECTS
        assert sum(p.stat().st_size for p in chunks) == 4 * MIB + 12345
        targets = raw_targets(tmp_path / "cloud", disks)
        async with open_store(str(location)) as store:
            result = await import_package(
                store,
                exported.manifest_sha256,
                targets,
                options=ImportOptions(target_is_zero=True),
            )
        assert result.counters.chunks_written == DATA_OBJECTS
        await assert_equal_images(disks, targets)
        # The cloud volume stays sparse: the package's zero ranges were never written.
        allocated = sum(e.length for e in await targets["disk-1"].extents() if not e.hole)
        assert allocated == MIB
    finally:
        await close_all(disks, locals().get("targets", {}))


@qemu_img
async def test_an_s3_package_round_trip_names_defects_and_takes_a_corrected_import(
    tmp_path: Path, bucket: tuple[str, S3Access], redis: aioredis.Redis, keys: Keys
) -> None:
    name, access = bucket
    location = f"s3://{name}/migrations/mig-8"
    disks = await sparse_raw_disks(tmp_path / "onprem")
    targets = raw_targets(tmp_path / "cloud", disks)
    try:
        async with open_store(location, access) as store:
            exported = await export_package("mig-8", disks, store, options=OPTIONS)
        manifest = exported.manifest
        async with s3_client(access) as client:
            listing = await client.list_objects_v2(Bucket=name, Prefix="migrations/mig-8/")
            stored = sorted(item["Key"] for item in listing["Contents"])
            assert len(stored) == DATA_OBJECTS + 1
            assert f"migrations/mig-8/{MANIFEST_NAME}" in stored
            gone = manifest.disk("disk-0").chunks[1]
            bad = manifest.disk("disk-1").chunks[0]
            await client.delete_object(Bucket=name, Key=f"migrations/mig-8/{gone.object}")
            original = await get_object(client, name, f"migrations/mig-8/{bad.object}")
            flipped = bytearray(original)
            flipped[12345] ^= 0x80
            await put_object(client, name, f"migrations/mig-8/{bad.object}", bytes(flipped))

        def checkpoints(disk_id: str) -> RedisCheckpointStore:
            return RedisCheckpointStore(redis, keys, f"mig-8/import/{disk_id}")

        async with open_store(location, access) as store:
            with pytest.raises(PackageDefects) as caught:
                await import_package(
                    store, exported.manifest_sha256, targets, checkpoints=checkpoints
                )
        assert [(type(d), d.disk_id, d.offset, d.object_name) for d in caught.value.defects] == [
            (PackageChunkMissing, "disk-0", gone.offset, gone.object),
            (PackageChunkCorrupt, "disk-1", bad.offset, bad.object),
        ]
        assert location in str(caught.value)

        async with s3_client(access) as client:  # the corrected import
            await put_object(client, name, f"migrations/mig-8/{bad.object}", original)
            await put_object(
                client,
                name,
                f"migrations/mig-8/{gone.object}",
                await disks[0].source.read(gone.offset, gone.length),
            )
        async with open_store(location, access) as store:
            report = await verify_package(store, exported.manifest_sha256)
            assert report.ok and report.chunks_checked == DATA_OBJECTS
            result = await import_package(
                store, exported.manifest_sha256, targets, checkpoints=checkpoints
            )
        # Only the two corrected chunks were fetched and written the second time.
        assert (result.counters.chunks_written, result.counters.bytes_fetched) == (
            2,
            gone.length + bad.length,
        )
        await assert_equal_images(disks, targets)
    finally:
        await close_all(disks, targets)


async def get_object(client: Any, bucket: str, key: str) -> bytes:
    response = await client.get_object(Bucket=bucket, Key=key)
    async with response["Body"] as body:
        data: bytes = await body.read()
    return data


async def put_object(client: Any, bucket: str, key: str, data: bytes) -> None:
    await client.put_object(Bucket=bucket, Key=key, Body=data)


async def test_a_tampered_manifest_in_s3_is_refused(
    tmp_path: Path, bucket: tuple[str, S3Access]
) -> None:
    name, access = bucket
    disks = await sparse_raw_disks(tmp_path / "onprem")
    targets = raw_targets(tmp_path / "cloud", disks)
    try:
        async with open_store(f"s3://{name}/p", access) as store:
            exported = await export_package("mig-9", disks, store, options=OPTIONS)
            document = Manifest.model_validate_json(await store.get(MANIFEST_NAME) or b"")
            tampered = document.model_copy(update={"migration_id": "mig-other"})
            await store.put(MANIFEST_NAME, tampered.model_dump_json().encode())
            with pytest.raises(PackageManifestMismatch) as caught:
                await import_package(store, exported.manifest_sha256, targets)
        assert caught.value.expected == exported.manifest_sha256
        for target in targets.values():
            assert all(extent.hole for extent in await target.extents())
    finally:
        await close_all(disks, targets)


class GatedStore:
    """Puts stop for good once ``allow`` of them have started (the test's gate)."""

    def __init__(self, inner: PackageStore, allow: int) -> None:
        self.inner = inner
        self.allow = allow
        self.started = self.finished = 0
        self.blocked = asyncio.Event()
        self.allowed_done = asyncio.Event()

    @property
    def location(self) -> str:
        return self.inner.location

    async def list(self) -> dict[str, int]:
        return await self.inner.list()

    async def get(self, name: str) -> bytes | None:
        return await self.inner.get(name)

    async def sync(self) -> None:
        await self.inner.sync()

    async def put(self, name: str, data: bytes | memoryview) -> None:
        if self.started >= self.allow:
            self.blocked.set()
            await asyncio.Event().wait()
        self.started += 1
        await self.inner.put(name, data)
        self.finished += 1
        if self.finished == self.allow:
            self.allowed_done.set()


class GatedTarget:
    """A raw target file whose writes stop for good once ``allow`` have started."""

    def __init__(self, inner: FileBackend, allow: int) -> None:
        self.inner = inner
        self.allow = allow
        self.started = self.finished = 0
        self.blocked = asyncio.Event()
        self.allowed_done = asyncio.Event()

    def __getattr__(self, attribute: str) -> Any:
        return getattr(self.inner, attribute)

    @property
    def size(self) -> int:
        return self.inner.size

    async def write(self, offset: int, data: bytes | memoryview) -> None:
        if self.started >= self.allow:
            self.blocked.set()
            await asyncio.Event().wait()
        self.started += 1
        await self.inner.write(offset, data)
        self.finished += 1
        if self.finished == self.allow:
            self.allowed_done.set()


@qemu_img
async def test_interrupted_s3_export_and_import_resume_where_they_stopped(
    tmp_path: Path, bucket: tuple[str, S3Access], redis: aioredis.Redis, keys: Keys
) -> None:
    name, access = bucket
    location = f"s3://{name}/mig-10"
    disks = await sparse_raw_disks(tmp_path / "onprem")
    targets = raw_targets(tmp_path / "cloud", disks)
    try:
        async with open_store(location, access) as store:
            gated = GatedStore(store, allow=2)
            task = asyncio.create_task(export_package("mig-10", disks, gated, options=OPTIONS))
            await gated.blocked.wait()
            await gated.allowed_done.wait()
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert await store.get(MANIFEST_NAME) is None
            exported = await export_package("mig-10", disks, store, options=OPTIONS)
        assert (exported.counters.chunks_present, exported.counters.chunks_stored) == (2, 3)

        def checkpoints(disk_id: str) -> RedisCheckpointStore:
            return RedisCheckpointStore(redis, keys, f"mig-10/import/{disk_id}")

        gate = GatedTarget(targets["disk-0"], allow=2)
        gated_targets: dict[str, Any] = {**targets, "disk-0": gate}
        options = ImportOptions(workers=2)
        async with open_store(location, access) as store:
            importing = asyncio.create_task(
                import_package(
                    store,
                    exported.manifest_sha256,
                    gated_targets,
                    checkpoints=checkpoints,
                    options=options,
                )
            )
            await gate.blocked.wait()
            await gate.allowed_done.wait()
            importing.cancel()
            with pytest.raises(asyncio.CancelledError):
                await importing
            result = await import_package(
                store, exported.manifest_sha256, targets, checkpoints=checkpoints, options=options
            )
        # disk-0's first two data chunks were durable in Redis: the rest (2 + disk-1's 1) left.
        assert result.counters.chunks_written == 3
        await assert_equal_images(disks, targets)
    finally:
        await close_all(disks, targets)


async def test_a_lab_vm_snapshot_exported_to_s3_lands_in_its_arm_volumes(
    tmp_path: Path, bucket: tuple[str, S3Access]
) -> None:
    name, access = bucket
    vm = lab_vm(1, disks=2, disk_size=40 * MIB)
    await build_lab(tmp_path, [vm])
    onprem = LabSite.open(tmp_path / "sites" / "onprem")
    cloud = LabSite.open(tmp_path / "sites" / "cloud")
    try:
        snapshot = await onprem.snapshot_vm(vm.vm_id, "hdm_1")
        sources = [
            ExportDisk(disk_id, await onprem.open_disk(vm.vm_id, disk_id, snapshot_id))
            for disk_id, snapshot_id in snapshot.disks
        ]
        expected = {d.disk_id: await d.source.read(0, d.source.size) for d in sources}
        live = await onprem.open_disk(vm.vm_id, "disk-0")
        await live.write(0, b"written after the snapshot" * 100)  # must not reach the package
        location = f"s3://{name}/{vm.vm_id}"
        async with open_store(location, access) as store:
            exported = await export_package("mig-11", sources, store, options=OPTIONS)
        # The lab's content has holes and all-zero chunks: the zero path is exercised too.
        assert exported.counters.chunks_zero > 0 and exported.counters.chunks_stored > 0
        volumes = {
            d.disk_id: await cloud.create_volume(f"mig-11-{d.disk_id}", d.source.size)
            for d in sources
        }
        async with open_store(location, access) as store:
            result = await import_package(store, exported.manifest_sha256, volumes)
        for disk_id, volume in volumes.items():
            assert await volume.read(0, volume.size) == expected[disk_id]
        assert [disk_id for disk_id, _ in result.image_digests] == ["disk-0", "disk-1"]
    finally:
        await onprem.close()
        await cloud.close()


async def test_a_bucket_that_does_not_exist_is_named(localstack: str, tmp_path: Path) -> None:
    access = S3Access(endpoint_url=localstack)
    location = f"s3://ferry-missing-{uuid.uuid4().hex[:12]}/p"
    disks = await sparse_raw_disks(tmp_path / "onprem")
    targets = raw_targets(tmp_path / "cloud", disks)
    try:
        async with open_store(location, access) as store:
            with pytest.raises(PackageLocationInvalid, match="no such bucket"):
                await export_package("mig-12", disks, store, options=OPTIONS)
            # At the import, a missing bucket is an import still to be made: wait for it.
            with pytest.raises(PackageManifestMismatch, match="no such bucket"):
                await import_package(store, "0" * 64, targets)
    finally:
        await close_all(disks, targets)


class FlakyS3:
    """The real S3 client, with ``failures`` of its put_object calls answered 503 SlowDown."""

    def __init__(self, client: Any, failures: int) -> None:
        self._client = client
        self.failures = failures
        self.refused = 0

    def __getattr__(self, attribute: str) -> Any:
        return getattr(self._client, attribute)

    async def put_object(self, **request: Any) -> Any:
        if self.refused < self.failures:
            self.refused += 1
            refusal: Any = {
                "Error": {"Code": "SlowDown", "Message": "reduce your request rate"},
                "ResponseMetadata": {"HTTPStatusCode": 503},
            }
            raise ClientError(refusal, "PutObject")
        return await self._client.put_object(**request)


async def test_s3_refusals_are_retried_at_the_edge_then_named(
    tmp_path: Path, bucket: tuple[str, S3Access]
) -> None:
    name, access = bucket
    disks = await sparse_raw_disks(tmp_path / "onprem")
    try:
        async with s3_client(access) as client:
            flaky = FlakyS3(client, failures=2)
            result = await export_package("m", disks, S3Store(flaky, name, "ok"), options=OPTIONS)
            assert flaky.refused == 2 and result.counters.chunks_stored == DATA_OBJECTS
            down = FlakyS3(client, failures=10**6)
            with pytest.raises(PackageStoreUnavailable) as caught:
                await export_package("m", disks, S3Store(down, name, "down"), options=OPTIONS)
        assert isinstance(caught.value, TransientError)
        assert caught.value.location == f"s3://{name}/down" and "SlowDown" in str(caught.value)
    finally:
        await close_all(disks, {})


@qemu_img
async def test_a_package_between_nbd_exports_reads_nothing_back_from_the_volume(
    tmp_path: Path, redis: aioredis.Redis, keys: Keys
) -> None:
    """As the appliance runs it: the snapshot and the cloud volume behind NBD servers."""
    disks = await sparse_raw_disks(tmp_path / "onprem")
    source_file = disks[0].source
    target_path = tmp_path / "volume.raw"
    location = tmp_path / "package"
    try:
        async with (
            FileBackend.create(target_path, source_file.size) as target_file,
            NbdServer({"snap": source_file}) as onprem,
            NbdServer({"vol": target_file}) as cloud,
            await NbdBackend.connect(onprem.address, "snap") as snapshot,
            await NbdBackend.connect(cloud.address, "vol") as volume,
        ):
            async with open_store(str(location)) as store:
                exported = await export_package(
                    "mig-13", [ExportDisk("disk-0", snapshot)], store, options=OPTIONS
                )
                result = await import_package(
                    store,
                    exported.manifest_sha256,
                    {"disk-0": volume},
                    checkpoints=lambda d: RedisCheckpointStore(redis, keys, f"mig-13/{d}"),
                )
            # Data only went one way: the whole-image check asked the volume for hashes.
            assert volume.bytes_sent >= result.counters.bytes_written
            assert volume.bytes_received < 64 * 1024
        written = {"disk-0": FileBackend.open(target_path, readonly=True)}
        await assert_equal_images([disks[0]], written)
        await written["disk-0"].close()
    finally:
        await close_all(disks, {})
