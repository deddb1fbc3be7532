"""Block frames inside HTTP chunked bodies.

A stream is a sequence of frames ``FBK1 | file:u32 | block:u64 | len:u32 |
digest:32`` followed by ``len`` bytes of the block's stored form. The digest
lets the receiver verify each block on arrival (plain HTTP has no integrity
of its own) and is what the receiver journals for the resume check.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from transport.errors import ProtocolError

MAGIC = b"FBK1"
HEADER = struct.Struct("!4sIQI32s")
HEADER_SIZE = HEADER.size
CONTENT_TYPE = "application/x-fallback-blocks"


@dataclass(frozen=True, slots=True)
class FrameHeader:
    file: int
    block: int
    length: int
    digest: bytes

    def pack(self) -> bytes:
        return HEADER.pack(MAGIC, self.file, self.block, self.length, self.digest)


def parse_header(data: bytes, max_length: int) -> FrameHeader:
    magic, f, b, n, d = HEADER.unpack(data)
    if magic != MAGIC:
        raise ProtocolError("bad frame magic: not a fallback block stream")
    if n > max_length:
        raise ProtocolError(f"frame of {n} bytes exceeds the largest block ({max_length})")
    return FrameHeader(f, b, n, d)
