"""Block digests and the whole-file digest built from them.

BLAKE3 is used for blocks: about 4 GB/s on one core here against 1.5 GB/s for
SHA-256, and the binding releases the GIL, so digests run beside the event loop.

The whole-file digest (``b3blocks:<hex>``) is BLAKE3 over the block size, the
file size and the ordered block digests. Both ends compute it from digests they
already have, so verifying a file end to end costs no second pass over its
bytes, and a resumed file gets the same digest as one sent in one go.
``fallback checksum FILE`` computes it for any local file.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterable

import blake3

ALGO = "b3blocks"
DIGEST_SIZE = 32


def block_digest(data: bytes | bytearray | memoryview) -> bytes:
    """Digest of one block as moved on the wire (its stored form)."""
    return blake3.blake3(data).digest()


def file_digest(block_size: int, size: int, digests: Iterable[bytes]) -> str:
    """Whole-file digest from the ordered block digests, as ``algo:hex``."""
    h = blake3.blake3(struct.pack("!QQ", block_size, size))
    for d in digests:
        h.update(d)
    return f"{ALGO}:{h.hexdigest()}"


def digest_path(path: str | os.PathLike[str], block_size: int) -> str:
    """``file_digest`` of a local file, reading it one block at a time."""
    digests = []
    size = 0
    buf = bytearray(block_size)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while True:
            n = f.readinto(buf)
            if not n:
                break
            # A short read can happen before EOF (pipes, network file systems):
            # fill the block before hashing so block boundaries stay fixed.
            while n < block_size:
                more = f.readinto(view[n:])
                if not more:
                    break
                n += more
            digests.append(block_digest(view[:n]))
            size += n
            if n < block_size:
                break
    return file_digest(block_size, size, digests)
