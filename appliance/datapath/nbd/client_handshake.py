"""Client side of the NBD fixed newstyle handshake.

Negotiates structured replies, the ``base:allocation`` context and, when
the server offers it, Ferry's ``ferry:xxh3-128`` checksum context, then
enters transmission with NBD_OPT_GO (asking for block size constraints),
falling back to NBD_OPT_EXPORT_NAME for servers that do not know GO.
"""

from __future__ import annotations

from dataclasses import dataclass

from appliance.datapath.nbd import protocol as p
from appliance.datapath.nbd.channel import Channel
from appliance.errors import NbdExportRefused, NbdProtocolError

MAX_OPTION_REPLY = 64 * 1024


@dataclass(frozen=True, slots=True)
class ExportInfo:
    """What the server told us about the export."""

    name: str
    size: int
    flags: int
    min_block: int
    preferred_block: int
    max_block: int
    structured: bool
    allocation_context: int | None
    checksum_context: int | None

    def has(self, flag: p.TransmissionFlag) -> bool:
        return bool(self.flags & flag)

    @property
    def readonly(self) -> bool:
        return self.has(p.TransmissionFlag.READ_ONLY)


@dataclass(frozen=True, slots=True)
class OptionReply:
    option: int
    reply: int
    data: bytes

    @property
    def error(self) -> bool:
        return bool(self.reply & p.REPLY_ERROR_BIT)

    def describe(self) -> str:
        try:
            name = p.Reply(self.reply).name
        except ValueError:
            name = f"{self.reply:#x}"
        message = self.data.decode(errors="replace")
        return f"{name}: {message}" if message else name


class ClientHandshake:
    def __init__(self, channel: Channel, export: str) -> None:
        self._channel = channel
        self._export = export
        self._no_zeroes = False

    async def run(self) -> ExportInfo:
        await self._greeting()
        structured = await self._simple_option(p.Option.STRUCTURED_REPLY)
        contexts: dict[str, int] = {}
        if structured:
            contexts = await self._set_meta_contexts([p.BASE_ALLOCATION, p.FERRY_CHECKSUM_CONTEXT])
        info = await self._go(structured, contexts)
        return info

    async def _greeting(self) -> None:
        magic, opt_magic, flags = p.SERVER_GREETING.unpack(
            await self._channel.read_exactly(p.SERVER_GREETING.size)
        )
        if magic != p.NBDMAGIC or opt_magic != p.IHAVEOPT:
            raise NbdProtocolError(f"not a newstyle NBD server (magic {magic:#x} {opt_magic:#x})")
        if not flags & p.HandshakeFlag.FIXED_NEWSTYLE:
            raise NbdProtocolError("server does not speak fixed newstyle")
        self._no_zeroes = bool(flags & p.HandshakeFlag.NO_ZEROES)
        client_flags = p.ClientFlag.FIXED_NEWSTYLE
        if self._no_zeroes:
            client_flags |= p.ClientFlag.NO_ZEROES
        await self._channel.send(p.CLIENT_FLAGS.pack(client_flags))

    async def _send_option(self, option: int, data: bytes = b"") -> None:
        await self._channel.send(p.pack_option(option, data))

    async def _reply(self, option: int) -> OptionReply:
        magic, replied, reply, length = p.OPTION_REPLY_HEADER.unpack(
            await self._channel.read_exactly(p.OPTION_REPLY_HEADER.size)
        )
        if magic != p.OPTION_REPLY_MAGIC:
            raise NbdProtocolError(f"bad option reply magic {magic:#x}")
        if replied != option:
            raise NbdProtocolError(f"reply to option {replied} while waiting for {option}")
        if length > MAX_OPTION_REPLY:
            raise NbdProtocolError(f"option reply of {length} bytes")
        data = await self._channel.read_exactly(length) if length else b""
        return OptionReply(replied, reply, data)

    async def _simple_option(self, option: int) -> bool:
        """Send a data-less option: True on ACK, False on any error reply."""
        await self._send_option(option)
        reply = await self._reply(option)
        if reply.reply not in (p.Reply.ACK,) and not reply.error:
            raise NbdProtocolError(f"unexpected reply {reply.describe()} to option {option}")
        return not reply.error

    async def _set_meta_contexts(self, queries: list[str]) -> dict[str, int]:
        option = p.Option.SET_META_CONTEXT
        await self._send_option(option, p.pack_meta_context_query(self._export, queries))
        contexts: dict[str, int] = {}
        while True:
            reply = await self._reply(option)
            if reply.error:
                return {}
            if reply.reply == p.Reply.ACK:
                return contexts
            if reply.reply != p.Reply.META_CONTEXT or len(reply.data) < 4:
                raise NbdProtocolError(f"unexpected reply {reply.describe()} to SET_META_CONTEXT")
            (context_id,) = p.U32.unpack(reply.data[:4])
            contexts[reply.data[4:].decode(errors="replace")] = context_id

    async def _go(self, structured: bool, contexts: dict[str, int]) -> ExportInfo:
        option = p.Option.GO
        await self._send_option(option, p.pack_info_request(self._export, [p.Info.BLOCK_SIZE]))
        size: int | None = None
        flags = 0
        blocks = (1, p.PREFERRED_BLOCK, p.DEFAULT_MAX_BLOCK)
        while True:
            reply = await self._reply(option)
            if reply.reply == p.Reply.ERR_UNSUP:
                size, flags = await self._export_name()
                break
            if reply.reply == p.Reply.ERR_UNKNOWN:
                raise NbdExportRefused(self._export, reply.describe())
            if reply.error:
                raise NbdProtocolError(
                    f"server refused export {self._export!r}: {reply.describe()}"
                )
            if reply.reply == p.Reply.ACK:
                break
            if reply.reply != p.Reply.INFO or len(reply.data) < 2:
                raise NbdProtocolError(f"unexpected reply {reply.describe()} to NBD_OPT_GO")
            (kind,) = p.U16.unpack(reply.data[:2])
            if kind == p.Info.EXPORT and len(reply.data) == p.INFO_EXPORT.size:
                _, size, flags = p.INFO_EXPORT.unpack(reply.data)
            elif kind == p.Info.BLOCK_SIZE and len(reply.data) == p.INFO_BLOCK_SIZE.size:
                blocks = p.INFO_BLOCK_SIZE.unpack(reply.data)[1:]
        if size is None:
            raise NbdProtocolError("server accepted NBD_OPT_GO without NBD_INFO_EXPORT")
        return ExportInfo(
            name=self._export,
            size=size,
            flags=flags,
            min_block=blocks[0],
            preferred_block=blocks[1],
            max_block=min(blocks[2], p.DEFAULT_MAX_BLOCK),
            structured=structured,
            allocation_context=contexts.get(p.BASE_ALLOCATION),
            checksum_context=contexts.get(p.FERRY_CHECKSUM_CONTEXT),
        )

    async def _export_name(self) -> tuple[int, int]:
        """The pre-GO way in: no error is possible, the server just hangs up on refusal."""
        await self._send_option(p.Option.EXPORT_NAME, self._export.encode())
        size, flags = p.EXPORT_NAME_REPLY.unpack(
            await self._channel.read_exactly(p.EXPORT_NAME_REPLY.size)
        )
        if not self._no_zeroes:
            await self._channel.read_exactly(len(p.ZEROES_124))
        return size, flags
