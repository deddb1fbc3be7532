"""Holes of sparse files: found on the sender, kept on the receiver.

A block whose byte range lies wholly in a hole of the source file (``lseek``
``SEEK_DATA`` finds no data in it, as ``cp --sparse`` and ``rsync -S`` look for
it) is not read and not sent as zeros: the sender moves a ``Hole`` of the
block's length and the digest of that many zero bytes (``zero_digest``), and
the HTTP frame carrying it has no payload (``docs/protocol.md``, flag
``HOLE``). The receiver checks the announced digest against ``zero_digest`` and
leaves the range a hole in its partial file (``ensure_zero``: nothing to write
where the partial has no data there, which is always the case for a fresh
partial), so a 5 GiB file with 10 MB of data takes about 10 MB of disk on both
sides. A block holding any data is sent whole, zeros included (the unit is the
block: at most one block per data region boundary is written with zeros).

The digests are those of the bytes the file reads as, so the whole-file digest,
verification and resume are the same as for a file written out in full.
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass
from functools import lru_cache

from transport.blocks.digest import block_digest

__all__ = ["Hole", "ZERO_CHUNK", "ensure_zero", "is_hole", "zero_digest", "zeros"]

ZERO_CHUNK = 4 << 20
"""Bytes of the shared zero buffer (``zeros``): one default block."""

_ZEROS = bytes(ZERO_CHUNK)


@dataclass(frozen=True, slots=True)
class Hole:
    """``length`` bytes that read as zeros and are not stored (a hole of a sparse file)."""

    length: int

    def __len__(self) -> int:
        return self.length


@lru_cache(maxsize=64)
def zero_digest(length: int) -> bytes:
    """``block_digest`` of ``length`` zero bytes (cached: a file has at most two block
    lengths, so every hole block of a session costs one hash in all)."""
    if length <= ZERO_CHUNK:
        return block_digest(memoryview(_ZEROS)[:length])
    return block_digest(bytes(length))


def zeros(length: int) -> memoryview:
    """A read-only view of ``length`` zero bytes (shared for up to ``ZERO_CHUNK``), for a
    peer that cannot take a ``Hole`` and must get the zeros themselves."""
    if length <= ZERO_CHUNK:
        return memoryview(_ZEROS)[:length]
    return memoryview(bytes(length))


def is_hole(fd: int, offset: int, length: int) -> bool:
    """True when ``[offset, offset + length)`` of the open file ``fd`` holds no data
    (``SEEK_DATA`` from ``offset`` lands at or past its end, or finds none: ``ENXIO``).
    False on a file system without ``SEEK_DATA`` (it reports every byte as data), and
    for an empty range. ``OSError`` for other errors."""
    if length <= 0 or not hasattr(os, "SEEK_DATA"):
        return False
    try:
        return os.lseek(fd, offset, os.SEEK_DATA) >= offset + length
    except OSError as exc:
        if exc.errno == errno.ENXIO:  # no data at or after offset (or offset past the end)
            return True
        if exc.errno == errno.EINVAL:  # SEEK_DATA not supported here
            return False
        raise


def ensure_zero(fd: int, offset: int, length: int) -> int:
    """Make ``[offset, offset + length)`` of ``fd`` read as zeros, writing only where the
    file has data there (stale bytes of an unverified piece from an earlier attempt):
    a range that is a hole, or past the end of the file, stays unallocated. Returns the
    bytes written (0 in the usual case). ``OSError`` from the writes."""
    stop = offset + length
    written = 0
    pos = offset
    while pos < stop:
        data = _seek(fd, pos, "SEEK_DATA")
        if data is None:  # no data at or after pos
            break
        if data >= stop:
            break
        hole = _seek(fd, data, "SEEK_HOLE")
        end = max(min(stop if hole is None else hole, stop), data + 1)
        while data < end:
            n = os.pwrite(fd, zeros(min(end - data, ZERO_CHUNK)), data)
            data += n
            written += n
        pos = end
    return written


def _seek(fd: int, pos: int, how: str) -> int | None:
    """``lseek(fd, pos, SEEK_DATA or SEEK_HOLE)``; None for ``ENXIO`` (nothing there);
    where the system or file system has no such whence, ``pos`` for ``SEEK_DATA`` (all
    data) and None for ``SEEK_HOLE`` (no hole before the end)."""
    whence = getattr(os, how, None)
    if whence is None:
        return pos if how == "SEEK_DATA" else None
    try:
        return os.lseek(fd, pos, whence)
    except OSError as exc:
        if exc.errno == errno.ENXIO:
            return None
        if exc.errno == errno.EINVAL:
            return pos if how == "SEEK_DATA" else None
        raise
