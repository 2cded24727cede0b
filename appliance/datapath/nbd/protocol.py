"""NBD wire constants, struct layouts and parsing helpers (newstyle fixed handshake).

Everything is big-endian, as the NBD protocol specification (doc/proto.md in
NetworkBlockDevice/nbd) lays it out. Only what Ferry speaks is here: no TLS,
no extended headers, no oldstyle handshake.

Ferry checksum extension (non-standard, negotiated, invisible to other peers):

- Metadata context ``ferry:xxh3-128`` (namespace ``ferry``). A client that
  selects it with ``NBD_OPT_SET_META_CONTEXT`` may send
  ``NBD_CMD_FERRY_CHECKSUM`` (type 0xFE01), a request shaped like a READ
  (offset, length, no payload, at most the maximum block size).
- The reply is one structured chunk of type ``NBD_REPLY_TYPE_FERRY_CHECKSUM``
  (0x7E01, flag DONE) whose 16-byte payload is the xxh3-128 digest of the
  range as it reads (holes hash as zeroes); errors come as usual error chunks.
- BLOCK_STATUS answers for this context with one descriptor of status 0, as
  the spec requires one chunk per selected context.
- Digests per block: with the command flag ``NBD_CMD_FLAG_FERRY_BLOCKS``
  (bit 14) the request asks for one digest per block of ``2**shift`` bytes,
  ``shift`` (12 to 25) in flag bits 8 to 13; the last block is clipped at the
  end of the range. The reply chunk's payload is then the blocks' digests in
  order, 16 bytes each. One request thus checks many chunks: the whole-image
  check of a 2 GiB disk costs 64 requests, not 2,048. A shift out of range,
  or the bits without the flag, is EINVAL.

Ferry hashed writes (same extension, same negotiation):

- With the context selected, ``NBD_CMD_WRITE`` accepts the command flag
  ``NBD_CMD_FLAG_FERRY_HASH`` (bit 15, the far end from the flags the spec
  allocates from bit 0). The request is an ordinary WRITE, payload included,
  so anything that frames NBD requests still frames it.
- The server writes as usual; once the write returned (and FUA's flush, if
  asked), it replies with one structured chunk of type
  ``NBD_REPLY_TYPE_FERRY_WRITE_HASH`` (0x7E02, flag DONE) whose 16-byte
  payload is the xxh3-128 digest of the payload *as received*: no re-read,
  no extra round trip. A failed write gets the usual error chunk, no digest.
- Without the context the bit is an unknown flag: EINVAL, as the spec says.
  Standard peers never set it, so they never see the new chunk type.
- What it proves: the bytes reached the server intact and the write
  succeeded. What it does not: that storage returns them; the whole-image
  check (a fresh checksum of the target) covers that.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum, IntFlag

from appliance.errors import NbdProtocolError

NBDMAGIC = 0x4E42444D41474943  # "NBDMAGIC"
IHAVEOPT = 0x49484156454F5054  # "IHAVEOPT"
OPTION_REPLY_MAGIC = 0x0003E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF

MAX_STRING = 4096
DEFAULT_MAX_BLOCK = 32 * 1024 * 1024  # what every peer must accept (2**25)
PREFERRED_BLOCK = 4096

BASE_ALLOCATION = "base:allocation"
FERRY_CHECKSUM_CONTEXT = "ferry:xxh3-128"


class HandshakeFlag(IntFlag):
    FIXED_NEWSTYLE = 1 << 0
    NO_ZEROES = 1 << 1


class ClientFlag(IntFlag):
    FIXED_NEWSTYLE = 1 << 0
    NO_ZEROES = 1 << 1


class TransmissionFlag(IntFlag):
    HAS_FLAGS = 1 << 0
    READ_ONLY = 1 << 1
    SEND_FLUSH = 1 << 2
    SEND_FUA = 1 << 3
    ROTATIONAL = 1 << 4
    SEND_TRIM = 1 << 5
    SEND_WRITE_ZEROES = 1 << 6
    SEND_DF = 1 << 7
    CAN_MULTI_CONN = 1 << 8
    SEND_RESIZE = 1 << 9
    SEND_CACHE = 1 << 10
    SEND_FAST_ZERO = 1 << 11


class Option(IntEnum):
    EXPORT_NAME = 1
    ABORT = 2
    LIST = 3
    PEEK_EXPORT = 4
    STARTTLS = 5
    INFO = 6
    GO = 7
    STRUCTURED_REPLY = 8
    LIST_META_CONTEXT = 9
    SET_META_CONTEXT = 10
    EXTENDED_HEADERS = 11


class Reply(IntEnum):
    ACK = 1
    SERVER = 2
    INFO = 3
    META_CONTEXT = 4
    ERR_UNSUP = 2**31 + 1
    ERR_POLICY = 2**31 + 2
    ERR_INVALID = 2**31 + 3
    ERR_PLATFORM = 2**31 + 4
    ERR_TLS_REQD = 2**31 + 5
    ERR_UNKNOWN = 2**31 + 6
    ERR_SHUTDOWN = 2**31 + 7
    ERR_BLOCK_SIZE_REQD = 2**31 + 8
    ERR_TOO_BIG = 2**31 + 9


REPLY_ERROR_BIT = 2**31


class Info(IntEnum):
    EXPORT = 0
    NAME = 1
    DESCRIPTION = 2
    BLOCK_SIZE = 3


class Command(IntEnum):
    READ = 0
    WRITE = 1
    DISC = 2
    FLUSH = 3
    TRIM = 4
    CACHE = 5
    WRITE_ZEROES = 6
    BLOCK_STATUS = 7
    RESIZE = 8
    FERRY_CHECKSUM = 0xFE01


class CommandFlag(IntFlag):
    FUA = 1 << 0
    NO_HOLE = 1 << 1
    DF = 1 << 2
    REQ_ONE = 1 << 3
    FAST_ZERO = 1 << 4
    FERRY_HASH = 1 << 15
    """Ferry extension, WRITE only: reply with the digest of the payload received."""
    FERRY_BLOCKS = 1 << 14
    """Ferry extension, FERRY_CHECKSUM only: a digest per block (size in FERRY_BLOCK_SHIFT)."""


FERRY_BLOCK_SHIFT = 0x3F << 8
"""Flag bits 8-13 of a FERRY_CHECKSUM with FERRY_BLOCKS: log2 of the block size."""
FERRY_BLOCK_SHIFTS = range(12, 26)
"""Block sizes a per-block checksum may ask for: 4 KiB to 32 MiB, powers of two."""


def ferry_block_supported(block: int) -> bool:
    shift = block.bit_length() - 1
    return block == 1 << shift and shift in FERRY_BLOCK_SHIFTS


def ferry_block_flags(block: int) -> int:
    """The FERRY_CHECKSUM flags asking for a digest per ``block`` bytes."""
    if not ferry_block_supported(block):
        raise ValueError(f"checksum block of {block} bytes: not a power of two in 4 KiB..32 MiB")
    return CommandFlag.FERRY_BLOCKS | (block.bit_length() - 1) << 8


def ferry_block_size(flags: int) -> int | None:
    """The block size a FERRY_CHECKSUM's flags ask for, None for one digest of the range."""
    shift = (flags & FERRY_BLOCK_SHIFT) >> 8
    if not flags & CommandFlag.FERRY_BLOCKS:
        if shift:
            raise ValueError("block size bits set without the per-block flag")
        return None
    if shift not in FERRY_BLOCK_SHIFTS:
        raise ValueError(f"checksum block shift {shift} outside 12..25")
    return 1 << shift


def block_count(length: int, block: int) -> int:
    return -(-length // block)


class ReplyFlag(IntFlag):
    DONE = 1 << 0


class ReplyType(IntEnum):
    NONE = 0
    OFFSET_DATA = 1
    OFFSET_HOLE = 2
    BLOCK_STATUS = 5
    FERRY_CHECKSUM = 0x7E01
    FERRY_WRITE_HASH = 0x7E02
    ERROR = 2**15 + 1
    ERROR_OFFSET = 2**15 + 2


REPLY_TYPE_ERROR_BIT = 2**15


class Errno(IntEnum):
    """The error values the protocol allows on the wire (not the host's errno)."""

    EPERM = 1
    EIO = 5
    ENOMEM = 12
    EINVAL = 22
    ENOSPC = 28
    EOVERFLOW = 75
    ENOTSUP = 95
    ESHUTDOWN = 108


class StateFlag(IntFlag):
    """Status flags of the ``base:allocation`` context."""

    HOLE = 1 << 0
    ZERO = 1 << 1


# Handshake.
SERVER_GREETING = struct.Struct(">QQH")  # NBDMAGIC, IHAVEOPT, handshake flags
CLIENT_FLAGS = struct.Struct(">I")
OPTION_HEADER = struct.Struct(">QII")  # IHAVEOPT, option, data length
OPTION_REPLY_HEADER = struct.Struct(">QIII")  # magic, option, reply type, data length
EXPORT_NAME_REPLY = struct.Struct(">QH")  # size, transmission flags (then 124 zeroes)
INFO_EXPORT = struct.Struct(">HQH")  # NBD_INFO_EXPORT, size, transmission flags
INFO_BLOCK_SIZE = struct.Struct(">HIII")  # NBD_INFO_BLOCK_SIZE, minimum, preferred, maximum
U16 = struct.Struct(">H")
U32 = struct.Struct(">I")
U64 = struct.Struct(">Q")

# Transmission.
REQUEST = struct.Struct(">IHHQQI")  # magic, flags, type, handle, offset, length
SIMPLE_REPLY = struct.Struct(">IIQ")  # magic, error, handle
STRUCTURED_REPLY = struct.Struct(">IHHQI")  # magic, flags, type, handle, payload length
# What follows the magic, for a reader that reads the magic first to tell the two apart.
SIMPLE_REPLY_TAIL = struct.Struct(">IQ")
STRUCTURED_REPLY_TAIL = struct.Struct(">HHQI")
OFFSET_HOLE = struct.Struct(">QI")  # offset, hole size
ERROR_HEADER = struct.Struct(">IH")  # error, message length
BLOCK_DESCRIPTOR = struct.Struct(">II")  # length, status flags
ZEROES_124 = bytes(124)


@dataclass(frozen=True, slots=True)
class Request:
    flags: int
    command: int
    handle: int
    offset: int
    length: int


def parse_request(header: bytes | bytearray | memoryview) -> Request:
    magic, flags, command, handle, offset, length = REQUEST.unpack(header)
    if magic != REQUEST_MAGIC:
        raise NbdProtocolError(f"bad request magic {magic:#x}")
    return Request(flags, command, handle, offset, length)


def pack_request(command: int, handle: int, offset: int, length: int, flags: int = 0) -> bytes:
    return REQUEST.pack(REQUEST_MAGIC, flags, command, handle, offset, length)


def pack_option(option: int, data: bytes = b"") -> bytes:
    return OPTION_HEADER.pack(IHAVEOPT, option, len(data)) + data


def pack_option_reply(option: int, reply: int, data: bytes = b"") -> bytes:
    return OPTION_REPLY_HEADER.pack(OPTION_REPLY_MAGIC, option, reply, len(data)) + data


def pack_string(text: str) -> bytes:
    """A string as options carry it: a 32-bit length, then UTF-8 bytes."""
    raw = text.encode()
    return U32.pack(len(raw)) + raw


def pack_structured_header(flags: int, reply_type: int, handle: int, length: int) -> bytes:
    return STRUCTURED_REPLY.pack(STRUCTURED_REPLY_MAGIC, flags, reply_type, handle, length)


def pack_error_chunk(handle: int, error: int, message: str = "") -> bytes:
    raw = message.encode()[:MAX_STRING]
    payload = ERROR_HEADER.pack(error, len(raw)) + raw
    return pack_structured_header(ReplyFlag.DONE, ReplyType.ERROR, handle, len(payload)) + payload


def pack_meta_context_query(export: str, queries: list[str]) -> bytes:
    """Data of NBD_OPT_LIST_META_CONTEXT / NBD_OPT_SET_META_CONTEXT."""
    return pack_string(export) + U32.pack(len(queries)) + b"".join(map(pack_string, queries))


def pack_info_request(export: str, infos: list[Info]) -> bytes:
    """Data of NBD_OPT_INFO / NBD_OPT_GO."""
    return pack_string(export) + U16.pack(len(infos)) + b"".join(U16.pack(i) for i in infos)


class OptionReader:
    """Reads the fields of an option's data, raising NbdProtocolError when it runs short."""

    def __init__(self, data: bytes) -> None:
        self._data = data
        self._pos = 0

    @property
    def remaining(self) -> int:
        return len(self._data) - self._pos

    def take(self, length: int) -> bytes:
        if length > self.remaining:
            raise NbdProtocolError(f"option data too short: need {length}, have {self.remaining}")
        chunk = self._data[self._pos : self._pos + length]
        self._pos += length
        return chunk

    def u16(self) -> int:
        value: int = U16.unpack(self.take(2))[0]
        return value

    def u32(self) -> int:
        value: int = U32.unpack(self.take(4))[0]
        return value

    def string(self, length: int | None = None) -> str:
        """A UTF-8 string of ``length`` bytes, or of a leading 32-bit length."""
        if length is None:
            length = self.u32()
        if length > MAX_STRING:
            raise NbdProtocolError(f"string of {length} bytes exceeds {MAX_STRING}")
        try:
            return self.take(length).decode()
        except UnicodeDecodeError as exc:
            raise NbdProtocolError(f"string is not UTF-8: {exc}") from None


@dataclass(frozen=True, slots=True)
class InfoRequest:
    export: str
    infos: tuple[int, ...]


def parse_info_request(data: bytes) -> InfoRequest:
    reader = OptionReader(data)
    export = reader.string()
    infos = tuple(reader.u16() for _ in range(reader.u16()))
    if reader.remaining:
        raise NbdProtocolError(f"{reader.remaining} trailing bytes in an info request")
    return InfoRequest(export, infos)


@dataclass(frozen=True, slots=True)
class MetaContextQuery:
    export: str
    queries: tuple[str, ...]


def parse_meta_context_query(data: bytes) -> MetaContextQuery:
    reader = OptionReader(data)
    export = reader.string()
    queries = tuple(reader.string() for _ in range(reader.u32()))
    if reader.remaining:
        raise NbdProtocolError(f"{reader.remaining} trailing bytes in a meta context query")
    return MetaContextQuery(export, queries)


def overflows(offset: int, length: int, size: int) -> bool:
    """True when ``[offset, offset + length)`` does not fit in an export of ``size`` bytes."""
    return offset > size or length > size - offset


def status_flags(zero: bool, hole: bool) -> int:
    """``base:allocation`` flags of an extent."""
    return (StateFlag.HOLE if hole else 0) | (StateFlag.ZERO if zero else 0)
