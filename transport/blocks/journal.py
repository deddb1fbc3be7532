"""The durable journal of verified blocks of one partial file (both in a state folder).

Layout: ``FBJ1``, a 4-byte length, a JSON header (what is being received:
source identity and layout), then fixed 44-byte records
``index:u64 | digest:32 | crc32:u32``. A record is appended only after the
block's bytes were made durable (``fdatasync`` of the partial file first), so
after a kill -9 or a power cut every journaled block is really on disk; a torn
last record fails its CRC and is cut off on load.

The journal file also carries the writer's lock (``flock``): two transfers
writing one target cannot both hold it, so the second fails clearly instead of
interleaving blocks.
"""

from __future__ import annotations

import fcntl
import json
import os
import struct
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from transport.blocks.digest import DIGEST_SIZE
from transport.errors import ConflictError

MAGIC = b"FBJ1"
_REC = struct.Struct("!Q32sI")
_LEN = struct.Struct("!I")


class Journal:
    """An open, locked journal. Not thread-safe: the receiver serialises calls."""

    def __init__(self, path: Path, fd: int, meta: dict[str, Any], have: dict[int, bytes]) -> None:
        self.path = path
        self._fd = fd
        self.meta = meta
        self.have = have

    @classmethod
    def open(cls, path: Path, meta: dict[str, Any], *, keep: bool,
             label: str | None = None, sync: bool = True,
             accept: Callable[[dict[str, Any]], bool] | None = None) -> Journal:
        """Lock and open the journal at ``path``.

        With ``keep`` and a stored header equal to ``meta``, the recorded
        blocks are loaded; otherwise the journal restarts empty with ``meta``.
        ``accept``: a stored header it returns true for is taken over too: the
        records are kept and the header becomes ``meta`` (a resume that compares
        every kept block with a source whose mtime moved on, ``rebase``).
        Raises ``ConflictError`` (naming ``label``, the target, or else the
        journal's file name) when another writer holds the lock. ``sync``: a new
        header is made durable (``fdatasync``); off with ``--no-fsync``.
        """
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise ConflictError(
                    f"{label or path.name}: another transfer is writing this file"
                ) from None
            # The previous holder may have removed the journal (a commit) between our open
            # and our lock: a lock on that unlinked file guards nothing, so open the path anew.
            try:
                if os.path.samestat(os.fstat(fd), os.stat(path)):
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
        try:
            old_meta, have = _load(fd) if keep else (None, {})
            if old_meta != meta:
                taken = old_meta is not None and accept is not None and accept(old_meta)
                _rewrite(fd, meta, sync)
                if not taken:
                    have = {}
                journal = cls(path, fd, meta, {})
                # A crash between the header and the records leaves fewer records: never
                # a record under a header it was not made for.
                journal.append(sorted(have.items()), sync=sync)
                return journal
            return cls(path, fd, meta, have)
        except BaseException:
            os.close(fd)
            raise

    @staticmethod
    def peek(path: Path) -> tuple[dict[str, Any] | None, dict[int, bytes]]:
        """Read a journal without locking it (to answer a resume query)."""
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except (FileNotFoundError, NotADirectoryError):  # no journal, or no state folder
            return None, {}
        try:
            return _load(fd)
        finally:
            os.close(fd)

    def append(self, records: list[tuple[int, bytes]], *, sync: bool) -> None:
        if not records:
            return
        buf = b"".join(
            _REC.pack(i, d, zlib.crc32(struct.pack("!Q", i) + d)) for i, d in records
        )
        os.lseek(self._fd, 0, os.SEEK_END)
        os.write(self._fd, buf)
        if sync:
            os.fdatasync(self._fd)
        for i, d in records:
            self.have[i] = d

    def reset(self, meta: dict[str, Any], *, sync: bool = True) -> None:
        self.meta = meta
        self.have = {}
        _rewrite(self._fd, meta, sync)

    def close(self, *, remove: bool = False) -> None:
        if self._fd < 0:
            return
        if remove:
            try:
                self.path.unlink()
            except FileNotFoundError:
                pass
        os.close(self._fd)  # closing drops the flock
        self._fd = -1


def _rewrite(fd: int, meta: dict[str, Any], sync: bool = True) -> None:
    blob = json.dumps(meta, sort_keys=True).encode()
    os.ftruncate(fd, 0)
    os.pwrite(fd, MAGIC + _LEN.pack(len(blob)) + blob, 0)
    if sync:
        os.fdatasync(fd)


def _load(fd: int) -> tuple[dict[str, Any] | None, dict[int, bytes]]:
    size = os.fstat(fd).st_size
    head = os.pread(fd, 8, 0)
    if len(head) < 8 or head[:4] != MAGIC:
        return None, {}
    (n,) = _LEN.unpack(head[4:])
    if n > 1 << 20:
        return None, {}
    try:
        meta = json.loads(os.pread(fd, n, 8))
    except ValueError:
        return None, {}
    if not isinstance(meta, dict):
        return None, {}
    have: dict[int, bytes] = {}
    start = 8 + n
    body = os.pread(fd, size - start, start) if size > start else b""
    good = 0
    for off in range(0, len(body) - _REC.size + 1, _REC.size):
        i, d, crc = _REC.unpack_from(body, off)
        if crc != zlib.crc32(struct.pack("!Q", i) + d) or len(d) != DIGEST_SIZE:
            break
        have[i] = d
        good = off + _REC.size
    if good != len(body) and fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE != os.O_RDONLY:
        os.ftruncate(fd, start + good)  # cut a torn tail so new records follow good ones
    return meta, have
