"""Reading one source file as wire blocks (stored form + digest).

The source keeps the stat taken when it was opened and checks it again when
the last block was read: a file that changed underneath a transfer is reported
as ``SourceChanged`` instead of arriving as a mix of two versions.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from transport.blocks.digest import block_digest, file_digest
from transport.blocks.manifest import FileEntry
from transport.blocks.transform import BlockTransform
from transport.errors import SourceChanged


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


class FileSource:
    """A local file read block by block; thread-safe (``pread`` only)."""

    def __init__(self, path: Path, entry: FileEntry, *, encode: BlockTransform | None = None) -> None:
        self.path = path
        self.entry = entry
        self._encode = encode
        self.layout = entry.layout()
        self._fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        st = os.fstat(self._fd)
        plain = entry.size if encode is not None else self.layout.stored_size
        if st.st_size != plain or st.st_mtime_ns != entry.mtime_ns:
            os.close(self._fd)
            raise SourceChanged(f"{path.name}: changed since the transfer was planned")
        self._stat = (st.st_size, st.st_mtime_ns)
        self.plain_digests: dict[int, bytes] = {}
        """Digests of plaintext blocks read through an encoding transform: the
        file's own checksum, which the stored envelope's digests cannot give."""

    def read_block(self, index: int) -> tuple[bytes | bytearray, bytes]:
        """(wire bytes, wire digest) of block ``index``."""
        if self._encode is not None:
            offset, length = self.layout.plain_range(index)
        else:
            offset, length = self.layout.stored_range(index)
        data: bytes | bytearray = os.pread(self._fd, length, offset)
        while len(data) < length:  # short reads are legal; EOF here means the file shrank
            more = os.pread(self._fd, length - len(data), offset + len(data))
            if not more:
                raise SourceChanged(f"{self.path.name}: shrank during the transfer")
            data += more
        if self._encode is not None:
            self.plain_digests[index] = block_digest(data)
            data = self._encode.encode(index, data)
        return data, block_digest(data)

    def plain_root(self) -> str:
        """Whole-file digest of the plaintext (reads blocks not read yet)."""
        for i in range(self.layout.count):
            if i not in self.plain_digests:
                offset, length = self.layout.plain_range(i)
                self.plain_digests[i] = block_digest(os.pread(self._fd, length, offset))
        return file_digest(self.entry.block_size, self.entry.size,
                           (self.plain_digests[i] for i in range(self.layout.count)))

    def check_unchanged(self) -> None:
        st = os.fstat(self._fd)
        if (st.st_size, st.st_mtime_ns) != self._stat:
            raise SourceChanged(f"{self.path.name}: modified during the transfer")

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
