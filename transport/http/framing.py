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
  newer sender's frames are never misread.
* version 1, a **whole block** (52 bytes)::

      "FBK1" | file u32 | block u64 | length u32 | digest 32 bytes

  read as the piece at offset 0 with the block's whole length and its digest.
  The daemon still accepts version 1 uploads (clients before version 2) and
  sends version 1 downloads to a client that does not ask for version 2.
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
_RESERVED = b"\0\0\0"
CONTENT_TYPE = "application/x-fallback-blocks"
FRAME_VERSIONS = (1, 2)


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
    it. ``whole`` marks a version 1 frame, which must hold the whole block."""

    file: int
    block: int
    offset: int
    length: int
    digest: bytes | None = None
    whole: bool = False

    def pack(self, version: int = 2) -> bytes:
        """The header in ``version`` 2 or, for a whole block with its digest, 1."""
        if version == 1:
            if self.offset != 0 or self.digest is None:
                raise ValueError("a version 1 frame is a whole block with its digest")
            return HEADER.pack(MAGIC, self.file, self.block, self.length, self.digest)
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
    if flags & ~FLAG_DIGEST or reserved != _RESERVED:
        raise ProtocolError(f"frame of block {b} has unknown flags {flags:#x} or reserved bytes")
    if n > max_length:
        raise ProtocolError(f"frame of {n} bytes exceeds the largest block ({max_length})")
    digest = data[PIECE_SIZE:PIECE_SIZE + DIGEST_SIZE] if flags & FLAG_DIGEST else None
    return PieceHeader(f, b, offset, n, digest)
