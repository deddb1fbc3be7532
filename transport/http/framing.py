"""Block frames inside HTTP chunked bodies: version 2 carries pieces, version 1 blocks.

A stream is a sequence of frames, each a header followed by ``length`` bytes
of a block's stored form (network byte order):

* version 2, a **piece** (28 bytes, 60 with a digest)::

      "FBK2" | flags u8 | 0 u8 x3 | file u32 | block u64 | offset u32 | length u32
      [| digest 32 bytes, when flags & FLAG_DIGEST]

  bytes ``[offset, offset + length)`` of the block. The block's BLAKE3 digest is
  announced once per session, on whichever path (``docs/blocks.md``): an HTTP
  sender puts it in the frame of the piece at offset 0 (a whole block is one
  such piece). Unknown flags and non-zero reserved bytes are refused, so a
  newer sender's frames are never misread. With ``flags & FLAG_HOLE`` (0x02)
  the piece is a **hole**: ``length`` bytes that read as zeros, with no payload
  on the wire (``transport.blocks.sparse``); a hole frame also carries the
  digest (of the zeros) and starts at offset 0. A sender uses it only with a
  receiver that said it reads it (the daemon's ``holes`` feature; a client's
  ``holes=1`` query on a download).
* version 1, a **whole block** (52 bytes)::

      "FBK1" | file u32 | block u64 | length u32 | digest 32 bytes

  read as the piece at offset 0 with the block's whole length and its digest.
  The daemon still accepts version 1 uploads (clients before version 2) and
  sends version 1 downloads to a client that does not ask for version 2.
* a **bundle** (version 1 of the bundle frame, 28 bytes then ``length`` bytes of items)::

      "FBB1" | 0 u8 x4 | count u32 | length u32 | 0 u8 x12
      then ``count`` items: file u32 | size u32 | digest 32 bytes | size bytes

  whole one-block files (``size`` is the stored form of the file's only block,
  ``digest`` its BLAKE3 digest), many per frame: a folder of small files then
  costs one frame, one read of the body and one executor job per bundle instead
  of one per file. Sent only to a peer that announced ``bundles``. The receiver
  refuses a bundle of more than ``MAX_BUNDLE_ITEMS`` items or ``MAX_BUNDLE_BYTES``
  bytes, items whose sizes do not add up to ``length``, reserved bytes set.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from transport.blocks.digest import DIGEST_SIZE
from transport.errors import ProtocolError

MAGIC = b"FBK1"
HEADER = struct.Struct("!4sIQI32s")
HEADER_SIZE = HEADER.size  # version 1: 52
MAGIC2 = b"FBK2"
PIECE = struct.Struct("!4sB3sIQII")
PIECE_SIZE = PIECE.size  # version 2 without a digest: 28
FLAG_DIGEST = 0x01
FLAG_HOLE = 0x02
_FLAGS = FLAG_DIGEST | FLAG_HOLE
_RESERVED = b"\0\0\0"
CONTENT_TYPE = "application/x-fallback-blocks"
FRAME_VERSIONS = (1, 2)
MAGIC_BUNDLE = b"FBB1"
BUNDLE = struct.Struct("!4s4sII12s")  # same size as a version 2 piece header: 28
ITEM = struct.Struct("!II32s")
ITEM_SIZE = ITEM.size  # 40
MAX_BUNDLE_ITEMS = 1024
"""Most files one bundle frame may carry (a sender puts in at most ``BUNDLE_ITEMS``)."""
BUNDLE_ITEMS = 256
"""Files a sender puts in one bundle: the receiver commits them as one group."""
BUNDLE_BYTES = 1 << 20
"""Bytes of file data a sender puts in one bundle (at least one file, however large)."""
MAX_BUNDLE_BYTES = (8 << 20) + MAX_BUNDLE_ITEMS * ITEM_SIZE
"""Largest bundle body a receiver reads, in bytes (with the session's largest block)."""


@dataclass(frozen=True, slots=True)
class BundleItem:
    """One whole one-block file of a bundle: file index, its block's stored bytes and digest."""

    file: int
    data: bytes | bytearray | memoryview
    digest: bytes


def pack_bundle(items: list[BundleItem]) -> list[bytes | bytearray | memoryview]:
    """The frame of ``items`` as buffers to write in order (header, then each item)."""
    out: list[bytes | bytearray | memoryview] = []
    total = 0
    for it in items:
        out.append(ITEM.pack(it.file, len(it.data), it.digest))
        out.append(it.data)
        total += ITEM_SIZE + len(it.data)
    return [BUNDLE.pack(MAGIC_BUNDLE, b"\0" * 4, len(items), total, b"\0" * 12), *out]


def parse_bundle_header(data: bytes, max_length: int) -> tuple[int, int]:
    """(count, body length) of a bundle header (``PIECE_SIZE`` bytes); ``ProtocolError``
    for reserved bytes set, too many items or a body larger than ``max_length`` items'
    worth (``max_length`` is the session's largest block)."""
    magic, r1, count, length, r2 = BUNDLE.unpack(data)
    if magic != MAGIC_BUNDLE or r1 != b"\0" * 4 or r2 != b"\0" * 12:
        raise ProtocolError("bundle frame with unknown flags or reserved bytes")
    if not 0 < count <= MAX_BUNDLE_ITEMS:
        raise ProtocolError(f"bundle of {count} files (at most {MAX_BUNDLE_ITEMS})")
    if length > min(MAX_BUNDLE_BYTES, count * (ITEM_SIZE + max_length)):
        raise ProtocolError(f"bundle of {length} bytes exceeds the limit")
    return count, length


def parse_bundle(body: bytes, count: int, max_length: int) -> list[BundleItem]:
    """Split a bundle body into its ``count`` items; ``ProtocolError`` when the sizes do
    not add up to the body exactly or an item exceeds ``max_length``."""
    view = memoryview(body)
    items: list[BundleItem] = []
    pos = 0
    for _ in range(count):
        if pos + ITEM_SIZE > len(body):
            raise ProtocolError("bundle ended inside an item header")
        f, n, d = ITEM.unpack_from(body, pos)
        pos += ITEM_SIZE
        if n > max_length or pos + n > len(body):
            raise ProtocolError(f"bundle item of file {f} has a bad size ({n} bytes)")
        items.append(BundleItem(f, view[pos:pos + n], d))
        pos += n
    if pos != len(body):
        raise ProtocolError("bundle items do not fill the bundle")
    return items


@dataclass(frozen=True, slots=True)
class FrameHeader:
    """A version 1 frame: a whole block and its digest."""

    file: int
    block: int
    length: int
    digest: bytes

    def pack(self) -> bytes:
        return HEADER.pack(MAGIC, self.file, self.block, self.length, self.digest)


@dataclass(frozen=True, slots=True)
class PieceHeader:
    """Bytes ``[offset, offset + length)`` of a block; ``digest`` when this frame announces
    it. ``whole`` marks a version 1 frame, which must hold the whole block; ``hole`` a
    frame with no payload whose ``length`` bytes read as zeros (version 2 only)."""

    file: int
    block: int
    offset: int
    length: int
    digest: bytes | None = None
    whole: bool = False
    hole: bool = False

    @property
    def payload(self) -> int:
        """Bytes following the header on the wire (0 for a hole)."""
        return 0 if self.hole else self.length

    def pack(self, version: int = 2) -> bytes:
        """The header in ``version`` 2 or, for a whole block with its digest, 1."""
        if version == 1:
            if self.offset != 0 or self.digest is None or self.hole:
                raise ValueError("a version 1 frame is a whole block with its digest")
            return HEADER.pack(MAGIC, self.file, self.block, self.length, self.digest)
        if self.hole:
            if self.offset != 0 or self.digest is None:
                raise ValueError("a hole frame starts at offset 0 and carries its digest")
            return PIECE.pack(MAGIC2, FLAG_DIGEST | FLAG_HOLE, _RESERVED, self.file, self.block,
                              0, self.length) + self.digest
        if self.digest is None:
            return PIECE.pack(MAGIC2, 0, _RESERVED, self.file, self.block, self.offset,
                              self.length)
        return PIECE.pack(MAGIC2, FLAG_DIGEST, _RESERVED, self.file, self.block, self.offset,
                          self.length) + self.digest


def parse_header(data: bytes, max_length: int) -> FrameHeader:
    """A version 1 header (``HEADER_SIZE`` bytes); raises ``ProtocolError``."""
    magic, f, b, n, d = HEADER.unpack(data)
    if magic != MAGIC:
        raise ProtocolError("bad frame magic: not a fallback block stream")
    if n > max_length:
        raise ProtocolError(f"frame of {n} bytes exceeds the largest block ({max_length})")
    return FrameHeader(f, b, n, d)


def header_rest(start: bytes) -> int:
    """Header bytes still to read after the first ``PIECE_SIZE`` bytes of a frame."""
    magic = start[:4]
    if magic == MAGIC2:
        return DIGEST_SIZE if start[4] & FLAG_DIGEST else 0
    if magic == MAGIC:
        return HEADER_SIZE - PIECE_SIZE
    if magic == MAGIC_BUNDLE:
        return 0
    raise ProtocolError("bad frame magic: not a fallback block stream")


def parse_piece(data: bytes, max_length: int) -> PieceHeader:
    """A whole header of either version (``PIECE_SIZE + header_rest``); ``ProtocolError``
    for a bad magic, unknown flags, reserved bytes set, or more than ``max_length`` bytes
    (the session's largest block)."""
    if data[:4] == MAGIC:
        h = parse_header(data, max_length)
        return PieceHeader(h.file, h.block, 0, h.length, h.digest, whole=True)
    magic, flags, reserved, f, b, offset, n = PIECE.unpack(data[:PIECE_SIZE])
    if magic != MAGIC2:
        raise ProtocolError("bad frame magic: not a fallback block stream")
    if flags & ~_FLAGS or reserved != _RESERVED:
        raise ProtocolError(f"frame of block {b} has unknown flags {flags:#x} or reserved bytes")
    if n > max_length:
        raise ProtocolError(f"frame of {n} bytes exceeds the largest block ({max_length})")
    hole = bool(flags & FLAG_HOLE)
    if hole and (offset != 0 or not flags & FLAG_DIGEST or n == 0):
        raise ProtocolError(f"hole frame of block {b} without its digest, empty, or not at "
                            "offset 0")
    digest = data[PIECE_SIZE:PIECE_SIZE + DIGEST_SIZE] if flags & FLAG_DIGEST else None
    return PieceHeader(f, b, offset, n, digest, hole=hole)
