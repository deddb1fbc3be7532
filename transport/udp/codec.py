"""The UDP datagram format, versions 1 and 2 (documented byte by byte in docs/protocol.md).

Version 2 is version 1 plus **hole pieces** in DATA (below); a connection speaks one
version, agreed over the control channel (``UdpConfig.version``), in every datagram of
both directions, and a receiver drops a datagram of another version.

Every datagram is ``header (20 bytes, clear, authenticated as AAD) | sealed body |
tag (16 bytes)``; all integers are network byte order::

    0  u8   magic 0xFB
    1  u8   version 1 or 2 (the connection's)
    2  u8   type (PROBE 1, PROBE_ACK 2, DATA 3, FEEDBACK 4, KEEPALIVE 5, CLOSE 6, ERROR 7)
    3  u8   flags, 0 (reserved: a receiver drops a datagram with other bits set)
    4  u64  connection id (chosen by the daemon, given over the control channel)
    12 u64  packet number (per direction, from 0, never repeats within a key, < 2**62)

Bodies (after decryption):

* DATA and KEEPALIVE: ``ts_us u32 | floor_delta u32`` then, for DATA, one or more pieces
  ``file u32 | block u32 | offset u32 | length u16 | length bytes``; fewer than 14 bytes
  left after the last piece are zero padding (so full datagrams keep one size for GSO,
  and a 14-byte zero "piece header" is malformed). Version 2 adds the **hole piece**
  ``file u32 | block u32 | offset u32 | 0 u16 | length u32`` (18 bytes, no payload):
  ``length`` (>= 1) bytes at ``offset`` that read as zeros (a hole of a sparse file);
  a zero length field is malformed in version 1. ``ts_us`` is the
  sender's clock in microseconds modulo 2**32 (one-way-delay samples, no synchronised
  clocks needed); ``packet number - floor_delta`` is the sender's oldest packet whose
  fate it does not know yet (gQUIC's STOP_WAITING: the receiver forgets older numbers).
* FEEDBACK: ``largest u64 | ack_delay_us u32 | recv_bytes u64 | recv_packets u64 |
  recv_time_us u64 | owd_count u32 | owd_min_us i32 | owd_max_us i32 | low u64 |
  nranges u16 | nranges x (gap varint, length varint)``: packet numbers received, as
  ascending ranges from ``low`` (first start = low + gap; next start = previous stop +
  gap; length >= 1). Every number in ``[low, last stop)`` is reported: received iff in a
  range; ``largest`` is received too. Varints are QUIC's (RFC 9000 section 16).
* PROBE: ``token u64 | send_time_us u64`` then zero padding (to test that full-size
  datagrams cross the path). PROBE_ACK: ``token u64 | echo_time_us u64 | probe_size u32``.
* CLOSE and ERROR: ``code u16 | reason_length u16 | reason (UTF-8, <= 512 bytes)``.

Parsing the header never allocates beyond the ints it returns (``struct.unpack_from``
on the caller's buffer); bodies are parsed only after the AEAD accepted them. Every
length is checked; malformed input raises ``ProtocolError``.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from transport.errors import ProtocolError

MAGIC = 0xFB
VERSION = 1
VERSION_HOLES = 2
"""The first version with hole pieces."""
VERSIONS = (1, 2)

PROBE = 1
PROBE_ACK = 2
DATA = 3
FEEDBACK = 4
KEEPALIVE = 5
CLOSE = 6
ERROR = 7
TYPE_NAMES = {PROBE: "PROBE", PROBE_ACK: "PROBE_ACK", DATA: "DATA", FEEDBACK: "FEEDBACK",
              KEEPALIVE: "KEEPALIVE", CLOSE: "CLOSE", ERROR: "ERROR"}
#: Types the receiver acknowledges (they count in the sender's in-flight bytes).
ACK_ELICITING = frozenset({DATA, KEEPALIVE})

HEADER = struct.Struct("!BBBBQQ")
HEADER_SIZE = HEADER.size  # 20
TAG_SIZE = 16
#: ``(magic << 24) | (version << 16)``: the first four header bytes as one u32, minus type.
PREFIX_WORD = (MAGIC << 24) | (VERSION << 16)
HEADER_WORD = struct.Struct("!I")

DATA_PREFIX = struct.Struct("!II")       # ts_us, floor_delta
PIECE_HEADER = struct.Struct("!IIIH")    # file, block, offset, length
HOLE_LENGTH = struct.Struct("!I")        # after a piece header of length 0 (version 2)
HOLE_PIECE = struct.Struct("!IIIHI")     # file, block, offset, 0, length: 18 bytes
DATA_OVERHEAD = HEADER_SIZE + DATA_PREFIX.size + TAG_SIZE  # 44: before the first piece
#: Prefix and first piece header in one call (the hot path's common case).
DATA_FIRST = struct.Struct("!IIIIIH")
FEEDBACK_FIXED = struct.Struct("!QIQQQIiiQH")
PROBE_BODY = struct.Struct("!QQ")
PROBE_ACK_BODY = struct.Struct("!QQI")
CLOSE_BODY = struct.Struct("!HH")

MAX_PN = (1 << 62) - 1
U32 = 0xFFFFFFFF
MIN_DATAGRAM = 296      # Aspera's lower bound for -Z
MAX_DATAGRAM = 65507    # IPv4 UDP payload limit
#: 1,500-byte MTU minus 40 (IPv6) and 8 (UDP): fits both IPv4 and IPv6 paths.
DEFAULT_DATAGRAM = 1452
MAX_REASON = 512


def max_piece_payload(datagram_size: int) -> int:
    """Largest piece payload in one DATA datagram of ``datagram_size`` bytes (1394 at 1452)."""
    return datagram_size - DATA_OVERHEAD - PIECE_HEADER.size


def check_datagram_size(size: int) -> int:
    """Validate a configured datagram size (UDP payload bytes); ``ValueError`` outside bounds."""
    if not MIN_DATAGRAM <= size <= MAX_DATAGRAM:
        raise ValueError(f"datagram size {size} outside [{MIN_DATAGRAM}, {MAX_DATAGRAM}]")
    return size


# -- varints (RFC 9000 section 16) -------------------------------------------------------

def varint_size(value: int) -> int:
    if value < 0x40:
        return 1
    if value < 0x4000:
        return 2
    if value < 0x40000000:
        return 4
    if value <= MAX_PN:
        return 8
    raise ValueError(f"varint too large: {value}")


def push_varint(out: bytearray, value: int) -> None:
    """Append ``value`` (0 <= value < 2**62) as a QUIC varint."""
    if value < 0x40:
        out.append(value)
    elif value < 0x4000:
        out += (value | 0x4000).to_bytes(2, "big")
    elif value < 0x40000000:
        out += (value | 0x80000000).to_bytes(4, "big")
    elif value <= MAX_PN:
        out += (value | 0xC000000000000000).to_bytes(8, "big")
    else:
        raise ValueError(f"varint too large: {value}")


def pull_varint(buf: bytes | memoryview, pos: int) -> tuple[int, int]:
    """``(value, next position)``; ``ProtocolError`` when ``buf`` ends inside the varint."""
    if pos >= len(buf):
        raise ProtocolError("truncated varint")
    first = buf[pos]
    size = 1 << (first >> 6)
    if pos + size > len(buf):
        raise ProtocolError("truncated varint")
    value = first & 0x3F
    for i in range(1, size):
        value = (value << 8) | buf[pos + i]
    return value, pos + size


# -- decoded frames (control path; DATA's hot path parses inline in connection.py) -------

@dataclass(frozen=True, slots=True)
class Header:
    type: int
    connection_id: int
    packet_number: int
    version: int = VERSION


@dataclass(frozen=True, slots=True)
class Piece:
    """One piece of a block: ``data`` is ``length`` bytes at ``offset`` of ``(file, block)``."""

    file: int
    block: int
    offset: int
    data: bytes


@dataclass(frozen=True, slots=True)
class HolePiece:
    """A hole piece (version 2): ``length`` bytes at ``offset`` of ``(file, block)`` that
    read as zeros and are not on the wire."""

    file: int
    block: int
    offset: int
    length: int


@dataclass(frozen=True, slots=True)
class DataFrame:
    ts_us: int
    floor_delta: int
    pieces: tuple[Piece | HolePiece, ...]


@dataclass(frozen=True, slots=True)
class Keepalive:
    ts_us: int
    floor_delta: int


@dataclass(frozen=True, slots=True)
class Feedback:
    """Receiver's report. Times in microseconds; ``ranges`` are ascending ``(start, stop)``."""

    largest: int
    ack_delay_us: int
    recv_bytes: int
    recv_packets: int
    recv_time_us: int
    owd_count: int
    owd_min_us: int
    owd_max_us: int
    low: int
    ranges: tuple[tuple[int, int], ...]


@dataclass(frozen=True, slots=True)
class Probe:
    token: int
    send_time_us: int
    size: int


@dataclass(frozen=True, slots=True)
class ProbeAck:
    token: int
    echo_time_us: int
    probe_size: int


@dataclass(frozen=True, slots=True)
class Close:
    """CLOSE (``error`` False: orderly end) or ERROR (``error`` True: fatal protocol error)."""

    code: int
    reason: str
    error: bool = False


Frame = DataFrame | Keepalive | Feedback | Probe | ProbeAck | Close


def parse_header(buf: bytes | bytearray | memoryview) -> Header:
    """The header of a datagram; ``ProtocolError`` when short or of another magic/version."""
    if len(buf) < HEADER_SIZE + TAG_SIZE:
        raise ProtocolError(f"datagram of {len(buf)} bytes is shorter than header and tag")
    magic, version, type_, flags, cid, pn = HEADER.unpack_from(buf, 0)
    if magic != MAGIC or version not in VERSIONS:
        raise ProtocolError(f"bad magic/version {magic:#x}/{version}")
    if flags or type_ not in TYPE_NAMES:
        raise ProtocolError(f"bad type {type_} or flags {flags}")
    if pn > MAX_PN:
        raise ProtocolError("packet number beyond 2**62")
    return Header(type_, cid, pn, version)


def encode_header(type_: int, connection_id: int, packet_number: int,
                  version: int = VERSION) -> bytes:
    return HEADER.pack(MAGIC, version, type_, 0, connection_id, packet_number)


# -- bodies ------------------------------------------------------------------------------

def encode_data(ts_us: int, floor_delta: int,
                pieces: list[tuple[int, int, int, bytes | memoryview | int]]) -> bytes:
    """A DATA body (no header, not sealed). A piece whose data is an ``int`` is a hole
    piece of that many bytes (version 2 only: the caller knows its connection's)."""
    if not pieces:
        raise ValueError("DATA carries at least one piece")
    out = bytearray(DATA_PREFIX.pack(ts_us & U32, floor_delta))
    for file, block, offset, data in pieces:
        if isinstance(data, int):
            if not 0 < data <= U32 or offset + data > U32 + 1:
                raise ValueError("hole length outside [1, 2**32 - offset]")
            out += HOLE_PIECE.pack(file, block, offset, 0, data)
            continue
        if not 0 < len(data) <= 0xFFFF:
            raise ValueError("piece length outside [1, 65535]")
        out += PIECE_HEADER.pack(file, block, offset, len(data))
        out += data
    return bytes(out)


def parse_data(body: bytes | memoryview, version: int = VERSION) -> DataFrame:
    """A DATA body of a connection speaking ``version`` (hole pieces from 2 on)."""
    if len(body) < DATA_PREFIX.size + PIECE_HEADER.size:
        raise ProtocolError("DATA body too short")
    ts, floor = DATA_PREFIX.unpack_from(body, 0)
    pos, end = DATA_PREFIX.size, len(body)
    pieces: list[Piece | HolePiece] = []
    while pos + PIECE_HEADER.size <= end:
        file, block, offset, length = PIECE_HEADER.unpack_from(body, pos)
        pos += PIECE_HEADER.size
        if length == 0 and version >= VERSION_HOLES:
            if pos + HOLE_LENGTH.size > end:
                raise ProtocolError("hole piece truncated")
            (hole,) = HOLE_LENGTH.unpack_from(body, pos)
            pos += HOLE_LENGTH.size
            if hole == 0 or offset + hole > U32 + 1:
                raise ProtocolError(f"hole piece [{offset}, {offset + hole}) empty or past 2**32")
            pieces.append(HolePiece(file, block, offset, hole))
            continue
        if length == 0 or pos + length > end:
            raise ProtocolError(f"piece length {length} outside the datagram")
        pieces.append(Piece(file, block, offset, bytes(body[pos:pos + length])))
        pos += length
    if any(body[pos:]):
        raise ProtocolError("DATA padding (fewer bytes than a piece header) must be zero")
    return DataFrame(ts, floor, tuple(pieces))


def encode_keepalive(ts_us: int, floor_delta: int) -> bytes:
    return DATA_PREFIX.pack(ts_us & U32, floor_delta)


def parse_keepalive(body: bytes | memoryview) -> Keepalive:
    if len(body) != DATA_PREFIX.size:
        raise ProtocolError("KEEPALIVE body must be 8 bytes")
    ts, floor = DATA_PREFIX.unpack_from(body, 0)
    return Keepalive(ts, floor)


def encode_feedback(fb: Feedback, max_size: int) -> bytes:
    """A FEEDBACK body of at most ``max_size`` bytes: trailing ranges are dropped to fit.

    The ranges must be ascending, disjoint, at or above ``fb.low``; ``ValueError``
    otherwise. Dropping the newest ranges keeps the report truthful: it then covers
    ``[low, last stop kept)`` (plus ``largest``), which the sender reads as such.
    """
    tail = bytearray()
    count, prev = 0, fb.low
    room = max_size - FEEDBACK_FIXED.size
    for start, stop in fb.ranges:
        if start < prev or stop <= start:
            raise ValueError("feedback ranges must be ascending and disjoint from low")
        gap, length = start - prev, stop - start
        need = varint_size(gap) + varint_size(length)
        if len(tail) + need > room or count == 0xFFFF:
            break
        push_varint(tail, gap)
        push_varint(tail, length)
        count += 1
        prev = stop
    head = FEEDBACK_FIXED.pack(fb.largest, min(fb.ack_delay_us, U32), fb.recv_bytes,
                               fb.recv_packets, fb.recv_time_us, min(fb.owd_count, U32),
                               fb.owd_min_us, fb.owd_max_us, fb.low, count)
    return head + bytes(tail)


def parse_feedback(body: bytes | memoryview, max_ranges: int = 4096) -> Feedback:
    """Decode FEEDBACK; ranges are checked ascending, non-empty and below ``largest + 1``."""
    if len(body) < FEEDBACK_FIXED.size:
        raise ProtocolError("FEEDBACK body too short")
    (largest, ack_delay, recv_bytes, recv_packets, recv_time, owd_count, owd_min, owd_max,
     low, count) = FEEDBACK_FIXED.unpack_from(body, 0)
    if largest > MAX_PN or low > largest + 1 or count > max_ranges:
        raise ProtocolError("FEEDBACK largest/low/count out of bounds")
    pos, prev = FEEDBACK_FIXED.size, low
    ranges: list[tuple[int, int]] = []
    for _ in range(count):
        gap, pos = pull_varint(body, pos)
        length, pos = pull_varint(body, pos)
        start = prev + gap
        stop = start + length
        if length == 0 or stop > largest + 1:
            raise ProtocolError("FEEDBACK range empty or beyond largest")
        ranges.append((start, stop))
        prev = stop
    if pos != len(body):
        raise ProtocolError("trailing bytes after FEEDBACK ranges")
    return Feedback(largest, ack_delay, recv_bytes, recv_packets, recv_time, owd_count,
                    owd_min, owd_max, low, tuple(ranges))


def encode_probe(token: int, send_time_us: int, pad_to: int = 0) -> bytes:
    """A PROBE body, zero-padded so the sealed datagram is ``pad_to`` bytes (if larger)."""
    body = PROBE_BODY.pack(token, send_time_us)
    pad = pad_to - HEADER_SIZE - TAG_SIZE - len(body)
    return body + bytes(pad) if pad > 0 else body


def parse_probe(body: bytes | memoryview) -> Probe:
    if len(body) < PROBE_BODY.size:
        raise ProtocolError("PROBE body too short")
    token, ts = PROBE_BODY.unpack_from(body, 0)
    if any(body[PROBE_BODY.size:]):
        raise ProtocolError("PROBE padding must be zero")
    return Probe(token, ts, len(body) + HEADER_SIZE + TAG_SIZE)


def encode_probe_ack(token: int, echo_time_us: int, probe_size: int) -> bytes:
    return PROBE_ACK_BODY.pack(token, echo_time_us, probe_size)


def parse_probe_ack(body: bytes | memoryview) -> ProbeAck:
    if len(body) != PROBE_ACK_BODY.size:
        raise ProtocolError("PROBE_ACK body must be 20 bytes")
    return ProbeAck(*PROBE_ACK_BODY.unpack_from(body, 0))


def encode_close(code: int, reason: str) -> bytes:
    raw = reason.encode("utf-8")[:MAX_REASON]
    # Never cut a multi-byte character in two.
    raw = raw.decode("utf-8", "ignore").encode("utf-8")
    return CLOSE_BODY.pack(code, len(raw)) + raw


def parse_close(body: bytes | memoryview, *, error: bool) -> Close:
    if len(body) < CLOSE_BODY.size:
        raise ProtocolError("CLOSE body too short")
    code, length = CLOSE_BODY.unpack_from(body, 0)
    if length > MAX_REASON or CLOSE_BODY.size + length != len(body):
        raise ProtocolError("CLOSE reason length mismatch")
    try:
        reason = bytes(body[CLOSE_BODY.size:]).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ProtocolError("CLOSE reason is not UTF-8") from exc
    return Close(code, reason, error)


def parse_body(type_: int, body: bytes | memoryview, version: int = VERSION) -> Frame:
    """Decode an authenticated body of ``type_`` (of a connection speaking ``version``);
    ``ProtocolError`` when malformed."""
    if type_ == DATA:
        return parse_data(body, version)
    if type_ == FEEDBACK:
        return parse_feedback(body)
    if type_ == KEEPALIVE:
        return parse_keepalive(body)
    if type_ == PROBE:
        return parse_probe(body)
    if type_ == PROBE_ACK:
        return parse_probe_ack(body)
    if type_ in (CLOSE, ERROR):
        return parse_close(body, error=type_ == ERROR)
    raise ProtocolError(f"unknown type {type_}")
