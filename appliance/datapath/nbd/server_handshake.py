"""Server side of the NBD fixed newstyle handshake: option haggling up to transmission.

Supported options: EXPORT_NAME, ABORT, LIST, INFO, GO, STRUCTURED_REPLY,
LIST_META_CONTEXT and SET_META_CONTEXT (``base:allocation`` and Ferry's
``ferry:xxh3-128``, see ``protocol``). Anything else, TLS included, gets
``NBD_REP_ERR_UNSUP``. Malformed option data gets ``NBD_REP_ERR_INVALID``
and the haggling goes on, as the spec asks; only what cannot be answered
(bad magic, unknown client flags, oversized option data, an unknown export
in EXPORT_NAME) ends the connection, by raising ``NbdProtocolError``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from appliance.datapath.nbd import protocol as p
from appliance.datapath.nbd.channel import Channel
from appliance.errors import NbdProtocolError
from appliance.storage.backend import Backend

MAX_OPTION_DATA = 64 * 1024
BASE_ALLOCATION_ID = 1
FERRY_CHECKSUM_ID = 2
CONTEXT_IDS = {p.BASE_ALLOCATION: BASE_ALLOCATION_ID, p.FERRY_CHECKSUM_CONTEXT: FERRY_CHECKSUM_ID}


@dataclass(frozen=True, slots=True)
class Export:
    name: str
    backend: Backend
    readonly: bool


@dataclass(frozen=True, slots=True)
class Session:
    """What the handshake agreed on, for the transmission phase."""

    export: Export
    structured: bool
    contexts: frozenset[int]
    flags: int


def transmission_flags(export: Export, structured: bool) -> int:
    flags = (
        p.TransmissionFlag.HAS_FLAGS
        | p.TransmissionFlag.SEND_FLUSH
        | p.TransmissionFlag.SEND_FUA
        | p.TransmissionFlag.SEND_TRIM
        | p.TransmissionFlag.SEND_WRITE_ZEROES
        # Flush and FUA act on the shared backend, so they cover every connection.
        | p.TransmissionFlag.CAN_MULTI_CONN
    )
    if structured:
        # A read is always answered with one content chunk, so DF costs nothing.
        flags |= p.TransmissionFlag.SEND_DF
    if export.readonly:
        flags |= p.TransmissionFlag.READ_ONLY
    return int(flags)


def match_contexts(query: str, listing: bool) -> list[str]:
    """Context names a query selects; ``base:``/``ferry:`` are wildcards when listing."""
    if query in CONTEXT_IDS:
        return [query]
    if listing:
        namespace = query.partition(":")[0] + ":"
        return [name for name in CONTEXT_IDS if name.startswith(namespace) and query == namespace]
    return []


class _Abort(Exception):
    """The client ended the haggling with NBD_OPT_ABORT."""


class ServerHandshake:
    def __init__(
        self,
        channel: Channel,
        lookup: Callable[[str], Export | None],
        names: Callable[[], list[str]],
        max_block: int,
    ) -> None:
        self._channel = channel
        self._max_block = max_block
        self._lookup = lookup
        self._names = names
        self._no_zeroes = False
        self._structured = False
        self._meta_export: str | None = None
        self._contexts: frozenset[int] = frozenset()

    async def run(self) -> Session | None:
        """The agreed session, or None when the client aborted."""
        greeting_flags = p.HandshakeFlag.FIXED_NEWSTYLE | p.HandshakeFlag.NO_ZEROES
        await self._channel.send(p.SERVER_GREETING.pack(p.NBDMAGIC, p.IHAVEOPT, greeting_flags))
        (client_flags,) = p.CLIENT_FLAGS.unpack(await self._channel.read_exactly(4))
        if client_flags & ~int(p.ClientFlag.FIXED_NEWSTYLE | p.ClientFlag.NO_ZEROES):
            raise NbdProtocolError(f"unknown client flags {client_flags:#x}")
        self._no_zeroes = bool(client_flags & p.ClientFlag.NO_ZEROES)
        try:
            while True:
                session = await self._option()
                if session is not None:
                    return session
        except _Abort:
            return None

    async def _option(self) -> Session | None:
        magic, option, length = p.OPTION_HEADER.unpack(await self._channel.read_exactly(16))
        if magic != p.IHAVEOPT:
            raise NbdProtocolError(f"bad option magic {magic:#x}")
        if length > MAX_OPTION_DATA:
            raise NbdProtocolError(f"option {option} carries {length} bytes")
        data = await self._channel.read_exactly(length) if length else b""
        try:
            return await self._dispatch(option, data)
        except NbdProtocolError as exc:
            if option == p.Option.EXPORT_NAME:
                raise
            await self._reply(option, p.Reply.ERR_INVALID, exc.reason.encode())
            return None

    async def _dispatch(self, option: int, data: bytes) -> Session | None:
        if option == p.Option.EXPORT_NAME:
            return await self._export_name(data)
        if option in (p.Option.INFO, p.Option.GO):
            return await self._info(option, data)
        if option == p.Option.ABORT:
            await self._reply(option, p.Reply.ACK)
            raise _Abort
        if option == p.Option.LIST:
            await self._list(data)
        elif option == p.Option.STRUCTURED_REPLY:
            if data:
                raise NbdProtocolError("NBD_OPT_STRUCTURED_REPLY takes no data")
            self._structured = True
            await self._reply(option, p.Reply.ACK)
        elif option in (p.Option.LIST_META_CONTEXT, p.Option.SET_META_CONTEXT):
            await self._meta_context(option, data)
        else:
            await self._reply(option, p.Reply.ERR_UNSUP, b"option not supported")
        return None

    async def _reply(self, option: int, reply: int, data: bytes = b"") -> None:
        await self._channel.send(p.pack_option_reply(option, reply, data))

    async def _export_name(self, data: bytes) -> Session:
        name = p.OptionReader(data).string(len(data))
        export = self._lookup(name)
        if export is None:
            raise NbdProtocolError(f"no export {name!r}")
        session = self._session(export)
        reply = p.EXPORT_NAME_REPLY.pack(export.backend.size, session.flags)
        await self._channel.send(reply if self._no_zeroes else reply + p.ZEROES_124)
        return session

    async def _info(self, option: int, data: bytes) -> Session | None:
        request = p.parse_info_request(data)
        export = self._lookup(request.export)
        if export is None:
            await self._reply(option, p.Reply.ERR_UNKNOWN, f"no export {request.export!r}".encode())
            return None
        session = self._session(export)
        size = export.backend.size
        await self._reply(
            option, p.Reply.INFO, p.INFO_EXPORT.pack(p.Info.EXPORT, size, session.flags)
        )
        block_size = p.INFO_BLOCK_SIZE.pack(
            p.Info.BLOCK_SIZE, 1, p.PREFERRED_BLOCK, self._max_block
        )
        await self._reply(option, p.Reply.INFO, block_size)
        if p.Info.NAME in request.infos:
            await self._reply(option, p.Reply.INFO, p.U16.pack(p.Info.NAME) + export.name.encode())
        await self._reply(option, p.Reply.ACK)
        return session if option == p.Option.GO else None

    def _session(self, export: Export) -> Session:
        # Contexts count only when selected for the export that is finally chosen.
        contexts = self._contexts if self._meta_export == export.name else frozenset()
        return Session(
            export, self._structured, contexts, transmission_flags(export, self._structured)
        )

    async def _list(self, data: bytes) -> None:
        if data:
            raise NbdProtocolError("NBD_OPT_LIST takes no data")
        for name in self._names():
            await self._reply(p.Option.LIST, p.Reply.SERVER, p.pack_string(name))
        await self._reply(p.Option.LIST, p.Reply.ACK)

    async def _meta_context(self, option: int, data: bytes) -> None:
        setting = option == p.Option.SET_META_CONTEXT
        if setting:
            # A SET replaces the previous selection even when it fails.
            self._meta_export, self._contexts = None, frozenset()
        if not self._structured:
            raise NbdProtocolError("meta contexts need structured replies first")
        query = p.parse_meta_context_query(data)
        if self._lookup(query.export) is None:
            await self._reply(option, p.Reply.ERR_UNKNOWN, f"no export {query.export!r}".encode())
            return
        queries = query.queries if query.queries or setting else tuple(CONTEXT_IDS)
        names = dict.fromkeys(n for q in queries for n in match_contexts(q, not setting))
        for name in names:
            context_id = CONTEXT_IDS[name] if setting else 0
            await self._reply(option, p.Reply.META_CONTEXT, p.U32.pack(context_id) + name.encode())
        if setting:
            self._meta_export = query.export
            self._contexts = frozenset(CONTEXT_IDS[name] for name in names)
        await self._reply(option, p.Reply.ACK)
