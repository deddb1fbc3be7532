"""Receiving one file: partial file, journal, verification, atomic commit.

Both data paths hand verified-or-not blocks to ``FileReceiver.write_block``;
it checks the digest, applies the inverse transform if asked (decrypting a
download), writes at the block's offset and queues a journal record. Records
reach the journal only in ``flush``, after the partial file's data is durable,
so the journal never claims a block the disk may not have.

The file appears under its real name only in ``commit``: all blocks present,
whole-file digest equal to the sender's, data synced, mtime and mode set, then
one ``rename`` (or ``link`` when replacing is not allowed, which fails instead
of clobbering a file that appeared meanwhile).
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from pathlib import Path

from transport.blocks.digest import block_digest, file_digest
from transport.blocks.journal import Journal
from transport.blocks.layout import BlockLayout
from transport.blocks.manifest import FileEntry
from transport.blocks.ranges import RangeSet
from transport.blocks.transform import BlockTransform
from transport.errors import ConflictError, IntegrityError, ProtocolError

PARTIAL_SUFFIX = ".fallback-partial"
JOURNAL_SUFFIX = ".fallback-journal"


def partial_path(target: Path, suffix: str = PARTIAL_SUFFIX) -> Path:
    return target.with_name(f".{target.name}{suffix}")


def journal_path(target: Path) -> Path:
    return target.with_name(f".{target.name}{JOURNAL_SUFFIX}")


@dataclass(frozen=True, slots=True)
class PartialState:
    """What a receiver already holds for a target, for the resume check.

    ``identity`` is the source identity the partial was started from (see
    ``FileEntry.identity``); the sender compares it with its own, and for an
    envelope it carries the header, so a resumed encrypted upload reuses the
    salt and re-encrypts blocks identically.
    """

    identity: list[object] | None
    have: dict[int, bytes]  # block index -> wire digest


def inspect_partial(target: Path, *, decoded: bool = False, suffix: str = PARTIAL_SUFFIX) -> PartialState:
    """Look at the journal beside ``target`` without taking its lock."""
    meta, have = Journal.peek(journal_path(target))
    if meta is None or meta.get("decoded") != decoded or not partial_path(target, suffix).exists():
        return PartialState(None, {})
    identity = meta.get("identity")
    return PartialState(identity if isinstance(identity, list) else None, have)


def _meta(entry: FileEntry, decoded: bool) -> dict[str, object]:
    return {"v": 1, "identity": entry.identity(), "decoded": decoded}


class FileReceiver:
    """One target being received. ``write_block`` may be called from threads."""

    def __init__(
        self,
        target: Path,
        entry: FileEntry,
        *,
        resume: bool = True,
        decode: BlockTransform | None = None,
        fsync: bool = True,
        suffix: str = PARTIAL_SUFFIX,
    ) -> None:
        self.target = target
        self.entry = entry
        self.layout = entry.layout()
        self._decode = decode
        self._fsync = fsync
        self.partial = partial_path(target, suffix)
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._active = 0
        self._flush_lock = threading.Lock()
        self._pending: list[tuple[int, bytes]] = []
        self._journal = Journal.open(journal_path(target), _meta(entry, decode is not None), keep=resume)
        try:
            fd = -1
            if self._journal.have:
                try:
                    fd = os.open(self.partial, os.O_RDWR | os.O_CLOEXEC)
                except FileNotFoundError:
                    # Records without their partial (removed meanwhile) describe nothing:
                    # trusting them would publish a file of zeros that passes the checks.
                    self._journal.reset(self._journal.meta)
            if fd < 0:  # a fresh start never inherits stale bytes
                fd = os.open(self.partial, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            try:
                if decode is None and entry.header and not self._journal.have:
                    os.pwrite(fd, entry.header, 0)
            finally:
                # The partial is opened per operation, not held: a folder of 10,000 files
                # would otherwise hold 20,000 descriptors (the journal's fd keeps the lock).
                os.close(fd)
        except BaseException:
            self._journal.close()
            raise
        self._open = True
        self._received = RangeSet()
        """Blocks written (journaled or pending), as ranges: one range for a file
        received in order, however many blocks it has."""
        for i in sorted(self._journal.have):
            self._received.add(i)
        self.bytes_written = 0
        self.plain_digests: dict[int, bytes] = {}
        """Digests of decoded (plaintext) blocks written this run: the output
        file's own checksum without a second pass over it."""

    # -- state ----------------------------------------------------------------
    @property
    def out_layout(self) -> BlockLayout:
        if self._decode is None:
            return self.layout
        return BlockLayout(self.entry.size, self.entry.block_size)

    def have(self) -> dict[int, bytes]:
        with self._lock:
            return dict(self._journal.have)

    def missing(self) -> RangeSet:
        """Blocks not written yet, as half-open ranges (never a list of every block)."""
        with self._lock:
            return self._received.complement(0, self.layout.count)

    @property
    def complete(self) -> bool:
        with self._lock:
            return self._received.covers(0, self.layout.count)

    # -- data -----------------------------------------------------------------
    def write_block(self, index: int, data: bytes | bytearray | memoryview, digest: bytes) -> int:
        """Verify and write one wire block; returns the bytes written (0 for a duplicate)."""
        if not 0 <= index < self.layout.count:
            raise ProtocolError(f"{self.entry.path or self.target.name}: block {index} out of range")
        _, length = self.layout.stored_range(index)
        if len(data) != length:
            raise ProtocolError(
                f"{self.entry.path or self.target.name}: block {index} has {len(data)} bytes, "
                f"expected {length}"
            )
        with self._lock:
            if index in self._received:
                return 0
        if block_digest(data) != digest:
            raise IntegrityError(f"{self.entry.path or self.target.name}: block {index} digest mismatch")
        if self._decode is not None:
            try:
                out: bytes | bytearray | memoryview = self._decode.decode(index, data)
            except IntegrityError as exc:
                raise IntegrityError(f"{self.entry.path or self.target.name}: {exc.message}") from None
            offset, _ = self.out_layout.plain_range(index)
            self.plain_digests[index] = block_digest(out)
        else:
            out = data
            offset, _ = self.layout.stored_range(index)
        with self._lock:
            if not self._open:
                raise ConflictError(f"{self.entry.path or self.target.name}: receiver closed")
            self._active += 1  # _close waits for writers to finish
        try:
            fd = os.open(self.partial, os.O_WRONLY | os.O_CLOEXEC)
            try:
                _pwrite_all(fd, out, offset)
            finally:
                os.close(fd)
        finally:
            with self._lock:
                self._active -= 1
                self._idle.notify_all()
        with self._lock:
            if index in self._received:
                return 0
            self._received.add(index)
            self._pending.append((index, digest))
            self.bytes_written += len(data)
        return len(data)

    def flush(self) -> None:
        """Make written blocks durable, then journal them (in that order)."""
        with self._flush_lock:
            with self._lock:
                records, self._pending = self._pending, []
            if not records:
                return
            if self._fsync:
                _sync(self.partial, data_only=True)
            self._journal.append(records, sync=self._fsync)

    # -- end ------------------------------------------------------------------
    def root(self) -> str:
        have = self.have()
        return file_digest(self.entry.block_size, self.entry.size, (have[i] for i in range(self.layout.count)))

    def plain_root(self) -> str:
        """Whole-file digest of the decoded output; reads only blocks resumed from a
        previous run (their plaintext digests are not journaled). Call before ``commit``."""
        layout = self.out_layout
        with open(self.partial, "rb", buffering=0) as f:
            for i in range(layout.count):
                if i not in self.plain_digests:
                    offset, length = layout.plain_range(i)
                    self.plain_digests[i] = block_digest(os.pread(f.fileno(), length, offset))
        return file_digest(self.entry.block_size, self.entry.size,
                           (self.plain_digests[i] for i in range(layout.count)))

    def commit(self, expected_root: str | None, *, replace: bool = True) -> str:
        """Verify the whole file and publish it atomically; returns the wire root."""
        self.flush()
        missing = self.missing()
        if missing:
            raise IntegrityError(
                f"{self.entry.path or self.target.name}: {missing.count} blocks missing at commit"
            )
        root = self.root()
        if expected_root is not None and root != expected_root:
            self.discard()
            raise IntegrityError(
                f"{self.entry.path or self.target.name}: whole-file digest mismatch "
                f"(got {root}, sender has {expected_root})"
            )
        size = self.out_layout.stored_size
        fd = os.open(self.partial, os.O_RDWR | os.O_CLOEXEC)
        try:
            if os.fstat(fd).st_size != size:
                os.ftruncate(fd, size)
            if self._fsync:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.chmod(self.partial, self.entry.mode & 0o7777)
        os.utime(self.partial, ns=(self.entry.mtime_ns, self.entry.mtime_ns))
        if self.target.is_dir() and not self.target.is_symlink():
            raise ConflictError(f"{self.target.name}: a folder of that name exists")
        if replace:
            os.replace(self.partial, self.target)
        else:
            try:
                os.link(self.partial, self.target)
            except FileExistsError:
                raise ConflictError(f"{self.target.name}: exists and overwrite is not allowed") from None
            os.unlink(self.partial)
        if self._fsync:
            _fsync_dir(self.target.parent)
        self._close(remove_journal=True)
        return root

    def close(self) -> None:
        """Stop receiving but keep the partial file and journal for a resume."""
        try:
            self.flush()
        finally:
            self._close(remove_journal=False)

    def discard(self) -> None:
        """Drop the partial file and its journal (fresh start next time)."""
        try:
            self.partial.unlink()
        except FileNotFoundError:
            pass
        self._close(remove_journal=True)

    def _close(self, *, remove_journal: bool) -> None:
        with self._lock:
            self._open = False
            while self._active:
                self._idle.wait()
        self._journal.close(remove=remove_journal)


def _pwrite_all(fd: int, data: bytes | bytearray | memoryview, offset: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view = view[n:]
        offset += n


def _sync(path: Path, *, data_only: bool) -> None:
    """fsync a file by path (syncing is per inode, so a fresh descriptor will do)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        (os.fdatasync if data_only else os.fsync)(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
