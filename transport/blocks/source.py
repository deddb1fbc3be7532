"""Reading one source file as wire blocks (stored form + digest).

**Descriptors.** A ``FileSource`` holds no descriptor until its first read,
and gives it back when its ``SourceWindow`` needs room: a window keeps at most
``size`` sources open, least recently read closed first (a source being read
at that moment is closed as soon as its read ends). A session of 10,000 files
thus holds ``size`` descriptors (plus one per read in flight), not 10,000.
Sources made without a window share one process-wide window of
``DEFAULT_WINDOW``.

**Change detection.** The size and mtime the manifest promised are checked
when the source is made, and the file's identity (device, inode, ctime) is
remembered then. Every block read is followed by an ``fstat`` of the same
descriptor, and every (re)open by one too: a write, a truncation, a
``utime`` that puts the old mtime back (it moves ctime) or a rename of
another file over the name (another inode) is reported as ``SourceChanged``
before the block is handed out. Linux updates mtime/ctime before it copies a
write's bytes (``file_update_time`` in ``__generic_file_write_iter``), so a
block that saw new bytes is always followed by an ``fstat`` that sees the new
times: a mix of two versions is never sent unnoticed (short of a clock that
does not move between the two writes, which the receiver's whole-file digest
still catches).
"""

from __future__ import annotations

import os
import stat
import sys
import threading
from collections import OrderedDict
from pathlib import Path

from transport.blocks.digest import block_digest, file_digest
from transport.blocks.manifest import FileEntry
from transport.blocks.sparse import Hole, is_hole, zero_digest
from transport.blocks.transform import BlockTransform
from transport.errors import ErrorKind, SourceChanged, TransportError, from_os_error

DEFAULT_WINDOW = 16
"""Open descriptors shared by sources made without a window (a client's upload)."""


def entry_for(path: Path, relpath: str, block_size: int, st: os.stat_result | None = None) -> FileEntry:
    """A manifest entry for a local file or folder."""
    st = st or os.stat(path)
    if stat.S_ISDIR(st.st_mode):
        return FileEntry(relpath, "dir", mtime_ns=st.st_mtime_ns, mode=stat.S_IMODE(st.st_mode))
    return FileEntry(
        relpath,
        "file",
        size=st.st_size,
        mtime_ns=st.st_mtime_ns,
        mode=stat.S_IMODE(st.st_mode),
        block_size=block_size,
    )


class SourceWindow:
    """At most ``size`` sources keep a descriptor open; the least recently read closes first.

    Thread-safe. A source evicted while a read holds its descriptor closes it
    when that read ends, so the bound is ``size`` plus the reads in flight.
    """

    def __init__(self, size: int) -> None:
        if size < 1:
            raise ValueError("a source window holds at least one file")
        self.size = size
        self._lock = threading.Lock()
        self._open: OrderedDict[FileSource, None] = OrderedDict()

    def touch(self, source: FileSource) -> None:
        """``source`` was just read: make it the most recent, closing the oldest beyond ``size``."""
        victims = []
        with self._lock:
            self._open[source] = None
            self._open.move_to_end(source)
            while len(self._open) > self.size:
                victims.append(self._open.popitem(last=False)[0])
        for victim in victims:  # outside our lock: a source takes its own lock to close
            victim._evict()

    def forget(self, source: FileSource) -> None:
        with self._lock:
            self._open.pop(source, None)

    def __len__(self) -> int:
        with self._lock:
            return len(self._open)


_SHARED_WINDOW = SourceWindow(DEFAULT_WINDOW)


class FileSource:
    """A local file read block by block; thread-safe (``pread`` on a shared descriptor).

    Raises ``SourceChanged`` (409) when the file differs from ``entry`` (at
    construction, at any open, after any read), and the kinds of
    ``transport.errors.from_os_error`` for other OS errors (503 when the system
    is out of descriptors, 403 on permission, 500 on I/O errors). ``where``
    completes messages ("changed on the server during the transfer").
    """

    __slots__ = ("_path", "entry", "_encode", "layout", "_window", "_where", "_size", "_lock",
                 "_fd", "_users", "_evicted", "_closed", "_identity", "plain_digests",
                 "__weakref__")  # one per file of a folder: 100,000 of them must stay small

    def __init__(self, path: str | os.PathLike[str], entry: FileEntry, *,
                 encode: BlockTransform | None = None, window: SourceWindow | None = None,
                 where: str = "") -> None:
        self._path = os.fspath(path)  # a str: a Path with its parts is ~300 bytes more a file
        self.entry = entry
        self._encode = encode
        self.layout = entry.layout()
        self._window = window if window is not None else _SHARED_WINDOW
        self._where = sys.intern(f" {where}") if where else ""  # one str, not one a file
        self._size = entry.size if encode is not None else self.layout.stored_size
        self._lock = threading.Lock()
        self._fd = -1
        self._users = 0  # reads holding the descriptor
        self._evicted = False  # close the descriptor when the last read ends
        self._closed = False
        st = self._stat(None)
        self._identity = (st.st_dev, st.st_ino, st.st_ctime_ns)
        self.plain_digests: dict[int, bytes] = {}
        """Digests of plaintext blocks read through an encoding transform: the
        file's own checksum, which the stored envelope's digests cannot give."""

    @property
    def path(self) -> Path:
        return Path(self._path)

    @property
    def name(self) -> str:
        """The file as users know it: its path in the manifest, or its own name for the root."""
        return self.entry.path or os.path.basename(self._path)

    @property
    def is_open(self) -> bool:
        return self._fd >= 0

    def read_block(self, index: int) -> tuple[bytes | bytearray, bytes]:
        """(wire bytes, wire digest) of block ``index``."""
        if self._encode is not None:
            offset, length = self.layout.plain_range(index)
        else:
            offset, length = self.layout.stored_range(index)
        data = self._read(offset, length)
        if self._encode is not None:
            self.plain_digests[index] = block_digest(data)
            data = self._encode.encode(index, data)
        return data, block_digest(data)

    def read_wire(self, index: int) -> tuple[bytes | bytearray | Hole, bytes]:
        """As ``read_block``, but a block lying wholly in a hole of the file (``SEEK_DATA``,
        ``transport.blocks.sparse``) is not read: ``(Hole(length), zero_digest(length))``.
        Only for a source sent as it is stored (an encoding source reads every block)."""
        if self._encode is None:
            offset, length = self.layout.stored_range(index)
            if self._hole(offset, length):
                return Hole(length), zero_digest(length)
        return self.read_block(index)

    def plain_root(self) -> str:
        """Whole-file digest of the plaintext (reads blocks not read yet)."""
        for i in range(self.layout.count):
            if i not in self.plain_digests:
                offset, length = self.layout.plain_range(i)
                self.plain_digests[i] = block_digest(self._read(offset, length))
        return file_digest(self.entry.block_size, self.entry.size,
                           (self.plain_digests[i] for i in range(self.layout.count)))

    def check_unchanged(self) -> None:
        """Raise ``SourceChanged`` unless the file at ``path`` is still the one being sent."""
        self._stat(self._identity)

    def close(self) -> None:
        """Give the descriptor back (at the end of a read in flight); later reads are refused."""
        with self._lock:
            self._closed = True
            if self._users == 0:
                self._close_fd()
        self._window.forget(self)

    # -- descriptor handling ------------------------------------------------------------------
    def _read(self, offset: int, length: int) -> bytes | bytearray:
        fd = self._acquire()
        try:
            data: bytes | bytearray = os.pread(fd, length, offset)
            while len(data) < length:  # short reads are legal; EOF here means the file shrank
                more = os.pread(fd, length - len(data), offset + len(data))
                if not more:
                    raise self._changed()
                data += more
            # After the read, not before: a write that raced it has moved mtime/ctime by now.
            self._check(os.fstat(fd), self._identity)
        except OSError as exc:
            raise from_os_error(exc, self.name) from None
        finally:
            self._release()
        return data

    def _hole(self, offset: int, length: int) -> bool:
        fd = self._acquire()
        try:
            hole = is_hole(fd, offset, length)
            if hole:  # the file may have changed since: checked as after any read
                self._check(os.fstat(fd), self._identity)
        except OSError as exc:
            raise from_os_error(exc, self.name) from None
        finally:
            self._release()
        return hole

    def _acquire(self) -> int:
        with self._lock:
            if self._closed:
                raise TransportError(f"{self.name}: the transfer was closed", kind=ErrorKind.CONFLICT)
            if self._fd < 0:
                self._fd = self._open()
            self._users += 1
            self._evicted = False
            fd = self._fd
        self._window.touch(self)
        return fd

    def _release(self) -> None:
        with self._lock:
            self._users -= 1
            if self._users == 0 and (self._evicted or self._closed):
                self._close_fd()

    def _evict(self) -> None:
        """Called by the window: close now, or when the reads in flight end."""
        with self._lock:
            if self._users == 0:
                self._close_fd()
            else:
                self._evicted = True

    def _close_fd(self) -> None:  # with self._lock held
        self._evicted = False
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            os.close(fd)

    def _open(self) -> int:  # with self._lock held
        try:
            fd = os.open(self._path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise self._changed("was removed") from None
        except OSError as exc:
            raise from_os_error(exc, self.name) from None
        try:
            self._check(os.fstat(fd), self._identity)
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _stat(self, identity: tuple[int, int, int] | None) -> os.stat_result:
        try:
            st = os.stat(self._path)
        except (FileNotFoundError, NotADirectoryError):
            raise self._changed("was removed") from None
        except OSError as exc:
            raise from_os_error(exc, self.name) from None
        self._check(st, identity)
        return st

    def _check(self, st: os.stat_result, identity: tuple[int, int, int] | None) -> None:
        if st.st_size != self._size or st.st_mtime_ns != self.entry.mtime_ns:
            raise self._changed()
        if identity is not None and (st.st_dev, st.st_ino, st.st_ctime_ns) != identity:
            raise self._changed()

    def _changed(self, how: str = "changed") -> SourceChanged:
        return SourceChanged(f"{self.name}: {how}{self._where} during the transfer")

