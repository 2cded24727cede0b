"""Epochs between the components: the cloud cache's ``EpochSink`` over Redis.

The cache ships an epoch in two requests to the on-prem I/O manager, both
carried by Redis (the data itself goes over NBD, through the WAN link):

* ``stage``: "open the staging export of epoch N of this disk"; the answer
  names the export (``stage/<disk>/<N>``) and the I/O manager's NBD address;
* ``commit``: "verify, record and apply epoch N with this manifest".

Keys (``{p}`` the prefix, ``{onprem}`` the I/O manager's instance, e.g.
``onprem/onprem-1``)::

    {p}:epoch-requests:{onprem}          stream  request (JSON); consumer group "onprem"
    {p}:epoch-replies:{onprem}           stream  request_id, reply (JSON): wakes waiters
    {p}:epoch-reply:{onprem}:{request}   string  the reply (JSON), kept REPLY_TTL_S

:class:`RedisEpochSink` (in the cache process) appends a request with a fresh
id and waits for the reply on the replies stream, bounded by ``timeout_s``
(``ComponentSilent`` after it, a transient error: the cache's shipper tries
again). :class:`EpochService` (in the on-prem process) reads the requests
through its consumer group, so requests appended while it was down are read
when it starts, and answers each one. Both requests are idempotent on the
I/O manager (the same staging export again; a commit of an epoch already
applied with the same digest is a no-op), so a retry never does harm. A
request refused for a stale token raises ``StaleToken`` in the cache, which
stops shipping and keeps the epoch dirty.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import Awaitable, Callable
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from redis.exceptions import ResponseError

from appliance.components.cache.shipping import EpochManifest as CacheManifest
from appliance.components.control import cancel_read, last_stream_id, read_after
from appliance.components.onprem import EpochManifest as OnpremManifest
from appliance.components.onprem import ManifestEntry as OnpremEntry
from appliance.components.onprem import OnpremIoManager
from appliance.components.orders import ComponentId
from appliance.datapath.nbd.channel import NbdAddress, TcpAddress
from appliance.errors import (
    ComponentSilent,
    EpochOutOfOrder,
    EpochRejected,
    FerryError,
    StaleToken,
    StateStoreUnavailable,
)
from appliance.logs import get_logger
from appliance.state.store import StateStore, text

log = get_logger(__name__)

STREAM_MAXLEN = 1000
REPLY_TTL_S = 3600
GROUP = "onprem"
READ_BLOCK_MS = 2000
MAX_IN_FLIGHT = 8


class EpochVerb(StrEnum):
    STAGE = "stage"
    COMMIT = "commit"


class ReplyCode(StrEnum):
    OK = ""
    STALE_TOKEN = "stale_token"
    OUT_OF_ORDER = "out_of_order"  # `expected`: the epoch on-prem takes next
    REJECTED = "rejected"
    INVALID = "invalid"


class EpochRequest(BaseModel):
    """One request on the wire (cache to on-prem)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    request_id: str = Field(pattern=r"^[0-9a-f]{32}$")
    verb: EpochVerb
    disk_id: str = Field(min_length=1, max_length=128)
    epoch: int = Field(ge=1)
    token: int = Field(ge=1)
    entries: list[tuple[int, int, str]] = Field(default_factory=list)
    """commit: (offset, length, xxh3-128 hex) per chunk, sorted."""
    digest: str = ""
    """commit: the whole-epoch digest (hex)."""


class EpochReply(BaseModel):
    """The answer to one request (on-prem to cache)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    request_id: str
    code: ReplyCode = ReplyCode.OK
    reason: str = ""
    address: str = ""
    export: str = ""
    highest: int = 0
    expected: int = 0


def _keys(store: StateStore, onprem: ComponentId) -> tuple[str, str, str]:
    prefix = store.keys.prefix
    return (
        f"{prefix}:epoch-requests:{onprem}",
        f"{prefix}:epoch-replies:{onprem}",
        f"{prefix}:epoch-reply:{onprem}:",
    )


def to_onprem_manifest(manifest: CacheManifest) -> OnpremManifest:
    """The cache's manifest as the I/O manager's (same packing and digest, other names)."""
    entries = tuple(OnpremEntry(e.offset, e.length, e.digest) for e in manifest.entries)
    return OnpremManifest(entries, manifest.digest)


def parse_address(text_address: str) -> TcpAddress:
    host, _, port = text_address.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"expected HOST:PORT, got {text_address!r}")
    return TcpAddress(host, int(port))


class RedisEpochSink:
    """The cloud cache's ``EpochSink``: asks the on-prem component through Redis.

    ``address``: where the cache reaches the I/O manager's NBD server (through the
    WAN link); when None, the address the I/O manager reports is used.
    ``on_rejected(disk_id, epoch)`` is called when on-prem rejects a commit (its
    staging does not hold what the cache sent, e.g. it restarted and discarded
    it): the next attempt must send the whole epoch again.
    """

    def __init__(
        self,
        store: StateStore,
        onprem: ComponentId,
        *,
        address: NbdAddress | None = None,
        timeout_s: float = 60.0,
        on_rejected: Callable[[str, int], None] | None = None,
    ) -> None:
        self._store = store
        self.onprem = onprem
        self._address = address
        self._timeout_s = timeout_s
        self._on_rejected = on_rejected
        self._requests, self._replies, self._reply_prefix = _keys(store, onprem)
        self.refused: dict[str, int] = {}
        """Disks whose epoch was refused for a stale token: the highest token on-prem holds."""

    async def stage(self, disk_id: str, epoch: int, token: int) -> tuple[NbdAddress, str]:
        reply = await self._ask(EpochVerb.STAGE, disk_id, epoch, token)
        address = self._address or parse_address(reply.address)
        return address, reply.export

    async def commit(self, disk_id: str, epoch: int, token: int, manifest: CacheManifest) -> None:
        entries = [(e.offset, e.length, e.digest.hex()) for e in manifest.entries]
        await self._ask(
            EpochVerb.COMMIT, disk_id, epoch, token, entries=entries, digest=manifest.digest.hex()
        )

    async def _ask(
        self,
        verb: EpochVerb,
        disk_id: str,
        epoch: int,
        token: int,
        *,
        entries: list[tuple[int, int, str]] | None = None,
        digest: str = "",
    ) -> EpochReply:
        request = EpochRequest(
            request_id=uuid.uuid4().hex,
            verb=verb,
            disk_id=disk_id,
            epoch=epoch,
            token=token,
            entries=entries or [],
            digest=digest,
        )
        after = await last_stream_id(self._store, self._replies)
        body = request.model_dump_json()
        await self._store.run(
            lambda r: r.xadd(
                self._requests, {"request": body}, maxlen=STREAM_MAXLEN, approximate=True
            )
        )
        reply = await self._wait(request.request_id, after, disk_id)
        if reply.code is ReplyCode.STALE_TOKEN:
            self.refused[disk_id] = reply.highest
            raise StaleToken(disk_id, token, reply.highest)
        if reply.code is ReplyCode.OUT_OF_ORDER:
            # The shipper knows what to do: past it means on-prem committed this epoch
            # already (its reply was lost), so the commit is replayed, not the copy.
            raise EpochOutOfOrder(disk_id, epoch, reply.expected)
        if reply.code is not ReplyCode.OK:
            if verb is EpochVerb.COMMIT and self._on_rejected is not None:
                self._on_rejected(disk_id, epoch)  # what was staged is not what was sent
            raise EpochRejected(disk_id, epoch, f"{verb.value}: {reply.reason}")
        return reply

    async def _wait(self, request_id: str, after: str, disk_id: str) -> EpochReply:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._timeout_s
        key = self._reply_prefix + request_id
        while True:
            stored: Any = await self._store.run(lambda r: r.get(key))
            if stored is not None:
                return EpochReply.model_validate_json(stored)
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise ComponentSilent(str(self.onprem), disk_id, request_id, self._timeout_s)
            for entry_id, fields in await read_after(self._store, self._replies, after, remaining):
                after = text(entry_id)
                if text(fields.get(b"request_id", b"")) == request_id and b"reply" in fields:
                    return EpochReply.model_validate_json(fields[b"reply"])


class EpochService:
    """The on-prem side: answers the epoch requests of its instance with the I/O manager."""

    def __init__(
        self,
        store: StateStore,
        instance: ComponentId,
        manager: OnpremIoManager,
        *,
        ready: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self._store = store
        self.instance = instance
        self._manager = manager
        self._ready = ready
        self._requests, self._replies, self._reply_prefix = _keys(store, instance)
        self._slots = asyncio.Semaphore(MAX_IN_FLIGHT)
        self._work: set[asyncio.Task[None]] = set()
        self.answered = 0
        self.refused_stale: dict[str, int] = {}
        """Per disk, the epoch requests refused for a stale token (a fenced-out sender)."""

    async def run(self, stop: asyncio.Event) -> None:
        """Answer requests until ``stop``: first those read before a restart, then new ones."""
        if self._ready is not None:
            await self._ready()
        backlog = True  # first what was read before a restart and never answered
        while not stop.is_set():
            try:
                if backlog:
                    await self._ensure_group()
                entries = await self._read(stop, "0" if backlog else ">")
            except (StateStoreUnavailable, ResponseError) as error:
                # Unreachable, or the stream and its group were deleted (NOGROUP): wait,
                # make the group again and read on.
                log.warning("epoch requests cannot be read; retrying", error=str(error))
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), timeout=1.0)
                backlog = True
                continue
            backlog = False
            for entry_id, fields in entries:
                await self._slots.acquire()
                task = asyncio.create_task(self._handle(text(entry_id), fields))
                self._work.add(task)
                task.add_done_callback(self._done)
        if self._work:
            await asyncio.gather(*self._work, return_exceptions=True)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._work.discard(task)
        self._slots.release()
        if not task.cancelled() and task.exception() is not None:
            log.error("epoch request failed", error=repr(task.exception()))

    async def _ensure_group(self) -> None:
        async def create(r: Any) -> None:
            try:
                await r.xgroup_create(self._requests, GROUP, id="0", mkstream=True)
            except ResponseError as error:
                if "BUSYGROUP" not in str(error):  # BUSYGROUP: it exists already
                    raise

        await self._store.run(create)

    async def _read(self, stop: asyncio.Event, position: str) -> list[tuple[Any, Any]]:
        consumer = self.instance.name
        backlog = position == "0"

        async def read(r: Any) -> Any:
            return await r.xreadgroup(
                GROUP,
                consumer,
                {self._requests: position},
                count=None if backlog else MAX_IN_FLIGHT,
                block=None if backlog else READ_BLOCK_MS,
            )

        reading = asyncio.ensure_future(self._store.run(read))
        stopping = asyncio.ensure_future(stop.wait())
        try:
            await asyncio.wait({reading, stopping}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopping.cancel()
        if not reading.done():
            await cancel_read(reading)
            return []
        answer = reading.result()
        if not answer:
            return []
        entries: list[tuple[Any, Any]] = answer[0][1]
        return entries

    async def _handle(self, entry_id: str, fields: dict[bytes, bytes]) -> None:
        raw = fields.get(b"request", b"")
        try:
            request = EpochRequest.model_validate_json(raw)
        except ValueError as error:
            log.warning("invalid epoch request", error=str(error)[:300])
        else:
            reply = await self.answer(request)
            await self._reply(reply)
        await self._store.run(lambda r: r.xack(self._requests, GROUP, entry_id))

    async def answer(self, request: EpochRequest) -> EpochReply:
        bound = log.bind(disk_id=request.disk_id, epoch=request.epoch, verb=request.verb.value)
        try:
            if request.verb is EpochVerb.STAGE:
                address, export = await self._manager.stage_export(
                    request.disk_id, request.epoch, request.token
                )
                return EpochReply(
                    request_id=request.request_id, address=str(address), export=export
                )
            manifest = OnpremManifest(
                tuple(OnpremEntry(o, n, bytes.fromhex(h)) for o, n, h in request.entries),
                bytes.fromhex(request.digest),
            )
            await self._manager.commit_epoch(
                request.disk_id, request.epoch, request.token, manifest
            )
            return EpochReply(request_id=request.request_id)
        except StaleToken as error:
            bound.warning("epoch request refused: stale token", error=str(error))
            self.refused_stale[request.disk_id] = self.refused_stale.get(request.disk_id, 0) + 1
            code, reason, highest = ReplyCode.STALE_TOKEN, str(error), error.highest
        except EpochOutOfOrder as error:
            bound.info("epoch request out of order", error=str(error))
            return EpochReply(
                request_id=request.request_id,
                code=ReplyCode.OUT_OF_ORDER,
                reason=str(error)[:500],
                expected=error.expected,
            )
        except (FerryError, ValueError) as error:
            bound.warning("epoch request rejected", error=str(error))
            code, reason, highest = ReplyCode.REJECTED, str(error), 0
        return EpochReply(
            request_id=request.request_id, code=code, reason=reason[:500], highest=highest
        )

    async def _reply(self, reply: EpochReply) -> None:
        body = reply.model_dump_json()

        async def write(r: Any) -> None:
            pipe = r.pipeline(transaction=True)
            pipe.set(self._reply_prefix + reply.request_id, body, ex=REPLY_TTL_S)
            pipe.xadd(
                self._replies,
                {"request_id": reply.request_id, "reply": body},
                maxlen=STREAM_MAXLEN,
                approximate=True,
            )
            await pipe.execute()

        await self._store.run(write)
        self.answered += 1
