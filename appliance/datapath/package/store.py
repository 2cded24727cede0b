"""Where a package lives: a directory or an S3 prefix, behind one narrow interface.

``open_store("/mnt/usb/mig-42")`` or ``open_store("s3://bucket/mig-42", s3)``
gives a :class:`PackageStore`:

* ``list()`` names every object of the package with its size, paged to the
  end (S3 ListObjectsV2 pages; a directory walk), so an export knows what an
  interrupted run already wrote and an import knows what is missing without
  asking object by object;
* ``put()`` is atomic: a directory object is written to a temporary file,
  fsynced and renamed (``sync()`` then fsyncs the directories), an S3 object
  appears whole or not at all; so an object that exists is complete;
* ``get()`` returns None for an object that is not there.

S3 calls are retried here, at the edge (jittered, bounded), then raise
:class:`~appliance.errors.PackageStoreUnavailable`; a bucket that does not
exist, or a request S3 refuses (access denied), is
:class:`~appliance.errors.PackageLocationInvalid`. A directory that is full
raises :class:`~appliance.errors.OutOfSpace` (what was written stays, for a
resumed export), one that cannot be written (read-only, not a directory,
no permission) ``PackageLocationInvalid``, any other I/O error
``PackageStoreUnavailable`` (a disk unplugged: worth trying again).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Protocol, TypeVar

from aiobotocore.config import AioConfig
from aiobotocore.session import get_session
from botocore.exceptions import BotoCoreError, ClientError

from appliance.errors import OutOfSpace, PackageLocationInvalid, PackageStoreUnavailable
from appliance.retrying import RetryPolicy, retry
from appliance.settings import Settings

S3_RETRY = RetryPolicy(attempts=5, initial_s=0.2, max_s=4.0)
_MISSING_CODES = ("NoSuchKey", "404", "NotFound")
_FULL = (errno.ENOSPC, errno.EDQUOT)
_UNUSABLE = (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR, errno.EEXIST, errno.EISDIR)
T = TypeVar("T")


class PackageStore(Protocol):
    @property
    def location(self) -> str: ...

    async def list(self) -> dict[str, int]:
        """Every object of the package (names relative to it) and its size in bytes."""
        ...

    async def get(self, name: str) -> bytes | None: ...

    async def put(self, name: str, data: bytes | memoryview) -> None: ...

    async def sync(self) -> None:
        """Make every ``put`` so far durable."""
        ...


def _relative(name: str) -> PurePosixPath:
    """``name`` as a path inside the package; ValueError for one that would leave it."""
    path = PurePosixPath(name)
    if not name or path.is_absolute() or any(part in ("", ".", "..") for part in path.parts):
        raise ValueError(f"object name {name!r} is not inside the package")
    return path


def _os_error(location: str, operation: str, error: OSError, size: int = 0) -> Exception:
    """The package error an OSError of a directory store stands for."""
    if error.errno in _FULL:
        return OutOfSpace(location, size)
    if error.errno in _UNUSABLE:
        return PackageLocationInvalid(location, f"{operation}: {error.strerror or error}")
    return PackageStoreUnavailable(location, operation, error)


class DirectoryStore:
    """A package in a directory (a mounted disk, a share); created on first write."""

    def __init__(self, root: Path) -> None:
        self._root = root
        self._dirty: set[Path] = set()

    @property
    def location(self) -> str:
        return str(self._root)

    def _path(self, name: str) -> Path:
        return self._root.joinpath(*_relative(name).parts)

    async def list(self) -> dict[str, int]:
        try:
            return await asyncio.to_thread(self._list)
        except OSError as error:
            raise _os_error(self.location, "list", error) from error

    def _list(self) -> dict[str, int]:
        found: dict[str, int] = {}
        if not self._root.is_dir():
            return found
        for directory, subdirectories, files in os.walk(self._root):
            subdirectories[:] = [d for d in subdirectories if not d.startswith(".")]
            base = Path(directory)
            for file in files:
                if not file.startswith("."):  # temporaries of writes in progress
                    path = base / file
                    found[path.relative_to(self._root).as_posix()] = path.stat().st_size
        return found

    async def get(self, name: str) -> bytes | None:
        path = self._path(name)
        try:
            return await asyncio.to_thread(path.read_bytes)
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            return None
        except OSError as error:
            raise _os_error(self.location, f"read {name}", error) from error

    async def put(self, name: str, data: bytes | memoryview) -> None:
        path = self._path(name)
        try:
            await asyncio.to_thread(self._write, path, data)
        except OSError as error:
            raise _os_error(self.location, f"write {name}", error, len(data)) from error
        self._dirty.add(path.parent)

    @staticmethod
    def _write(path: Path, data: bytes | memoryview) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(f".{path.name}.tmp")
        with temporary.open("wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        temporary.replace(path)

    async def sync(self) -> None:
        directories, self._dirty = self._dirty, set()
        try:
            await asyncio.to_thread(self._sync, directories)
        except OSError as error:
            raise _os_error(self.location, "sync", error) from error

    def _sync(self, directories: set[Path]) -> None:
        # Every directory this run wrote into, up to the root and the root's parent: one
        # made by this run must be durable in its own parent too.
        every = {self._root, self._root.parent}
        for directory in directories:
            while self._root in directory.parents:
                every.add(directory)
                directory = directory.parent
        for directory in sorted(d for d in every if d.is_dir()):
            fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


@dataclass(frozen=True, slots=True)
class S3Access:
    """How to reach S3 (LocalStack in tests): the appliance's endpoint and credentials."""

    endpoint_url: str | None = None
    region: str = "us-east-1"
    access_key_id: str = field(default="test", repr=False)
    secret_access_key: str = field(default="test", repr=False)

    @classmethod
    def from_settings(cls, settings: Settings) -> S3Access:
        return cls(
            endpoint_url=settings.s3_endpoint,
            region=settings.region,
            access_key_id=settings.aws_access_key_id.get_secret_value(),
            secret_access_key=settings.aws_secret_access_key.get_secret_value(),
        )


def _error_code(error: BaseException) -> str:
    if isinstance(error, ClientError):
        return str(error.response.get("Error", {}).get("Code", ""))
    return ""


def _transient(error: BaseException) -> bool:
    if isinstance(error, ClientError):
        status = error.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        code = _error_code(error)
        return status >= 500 or code in ("Throttling", "SlowDown", "RequestTimeout")
    return isinstance(error, BotoCoreError | OSError | asyncio.TimeoutError)


class S3Store:
    """A package under ``s3://bucket/prefix``; the bucket must exist."""

    def __init__(self, client: Any, bucket: str, prefix: str) -> None:
        self._client = client
        self._bucket = bucket
        self._prefix = prefix.strip("/")

    @property
    def location(self) -> str:
        return f"s3://{self._bucket}/{self._prefix}" if self._prefix else f"s3://{self._bucket}"

    def _key(self, name: str) -> str:
        relative = _relative(name).as_posix()
        return f"{self._prefix}/{relative}" if self._prefix else relative

    async def _call(self, operation: str, action: Callable[[], Awaitable[T]]) -> T:
        def give_up(cause: BaseException, attempts: int) -> PackageStoreUnavailable:
            return PackageStoreUnavailable(self.location, operation, cause)

        try:
            return await retry(S3_RETRY, action, transient=_transient, give_up=give_up)
        except ClientError as error:
            code = _error_code(error) or "refused"
            reason = "no such bucket" if code == "NoSuchBucket" else f"S3 {operation}: {code}"
            raise PackageLocationInvalid(self.location, reason) from error

    async def list(self) -> dict[str, int]:
        start = f"{self._prefix}/" if self._prefix else ""

        async def page_all() -> dict[str, int]:
            found: dict[str, int] = {}
            paginator = self._client.get_paginator("list_objects_v2")
            async for page in paginator.paginate(Bucket=self._bucket, Prefix=start):
                for item in page.get("Contents", []):
                    found[item["Key"][len(start) :]] = int(item["Size"])
            return found

        return await self._call("list", page_all)

    async def get(self, name: str) -> bytes | None:
        key = self._key(name)

        async def fetch() -> bytes | None:
            try:
                response = await self._client.get_object(Bucket=self._bucket, Key=key)
            except ClientError as error:
                if _error_code(error) in _MISSING_CODES:
                    return None
                raise
            async with response["Body"] as body:
                data: bytes = await body.read()
            return data

        return await self._call(f"get {key}", fetch)

    async def put(self, name: str, data: bytes | memoryview) -> None:
        key = self._key(name)
        body = bytes(data)

        async def upload() -> None:
            await self._client.put_object(Bucket=self._bucket, Key=key, Body=body)

        await self._call(f"put {key}", upload)

    async def sync(self) -> None:
        """Nothing to do: S3 acknowledges a put once it is durable."""


def parse_s3(location: str) -> tuple[str, str]:
    """``(bucket, prefix)`` of ``s3://bucket/prefix``."""
    bucket, _, prefix = location.removeprefix("s3://").partition("/")
    if not bucket:
        raise PackageLocationInvalid(location, "an S3 location needs a bucket: s3://bucket/prefix")
    if any(part in (".", "..") for part in prefix.split("/")):
        raise PackageLocationInvalid(location, "the prefix may not hold '.' or '..'")
    return bucket, prefix


@contextlib.asynccontextmanager
async def open_store(
    location: str, s3: S3Access | None = None, *, connections: int = 16
) -> AsyncIterator[PackageStore]:
    """The package at ``location``: a directory path, or ``s3://bucket/prefix``."""
    if location.startswith("s3://"):
        bucket, prefix = parse_s3(location)
        access = s3 or S3Access()
        config = AioConfig(
            max_pool_connections=connections,
            retries={"total_max_attempts": 1},  # retries happen at our edge
            connect_timeout=10,
            read_timeout=60,
            # LocalStack and other endpoints given by address have no per-bucket host names.
            s3={"addressing_style": "path"} if access.endpoint_url else None,
        )
        async with get_session().create_client(
            "s3",
            endpoint_url=access.endpoint_url,
            region_name=access.region,
            aws_access_key_id=access.access_key_id,
            aws_secret_access_key=access.secret_access_key,
            config=config,
        ) as client:
            yield S3Store(client, bucket, prefix)
        return
    if "://" in location or not location:
        raise PackageLocationInvalid(location, "expected a directory path or s3://bucket/prefix")
    yield DirectoryStore(Path(location).expanduser().resolve())
