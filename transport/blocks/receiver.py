"""Receiving one file: partial file, journal, verification, atomic commit.

Pieces of blocks reach a receiver through a session's ``BlockAssembler``
(``transport.blocks.session.BlockSink``): ``write_piece`` writes them in place
unverified, and only once the assembler reports the whole block verified does
``record_verified`` queue its journal record (a decrypting receiver gets the
whole verified block instead, ``write_verified``, and writes its plaintext).
``write_block`` verifies and writes a whole block in one call. Records reach the
journal only in ``flush``, after the partial file's data is durable, so the
journal never claims a block the disk may not have.

The file appears under its real name only in ``commit``: all blocks present,
whole-file digest equal to the sender's, data synced, mtime and mode set, then
one ``rename`` (or ``link`` when replacing is not allowed, which fails instead
of clobbering a file that appeared meanwhile).

The whole-file digest is built from the journal's block digests, so it is only
worth something if every digest describes the bytes in the partial. Blocks
written this run were hashed as they arrived; blocks *carried over* from an
earlier run were hashed by that run, and the partial may have changed since (a
disk error, a stray write, an edit). ``verify_carried`` reads those back and
re-hashes them before any digest is computed; a block that fails is dropped
from the journal and reported missing, so the sender sends it again and it is
never published.

The partial file and the journal live in the state folder of the tree being
written (``transport.blocks.statedir``), never beside the target: no user
file can be taken for ours, and none of ours is listed or sent as a user's.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transport.blocks.digest import block_digest, file_digest
from transport.blocks.journal import Journal
from transport.blocks.layout import BlockLayout
from transport.blocks.manifest import FileEntry, rebasable_identity
from transport.blocks.modes import file_mode
from transport.blocks.ranges import RangeSet
from transport.blocks.sparse import ensure_zero, is_hole, zero_digest
from transport.blocks.statedir import StateDir
from transport.blocks.transform import BlockTransform
from transport.errors import ConflictError, IntegrityError, ProtocolError


def partial_path(target: Path, state: StateDir | None = None) -> Path:
    """Where ``target``'s partial file is kept: in ``state`` (default: the state folder of
    ``target``'s own folder, as for a single-file download there)."""
    return (state or StateDir(target.parent)).partial(target)


def journal_path(target: Path, state: StateDir | None = None) -> Path:
    """Where ``target``'s journal is kept (see ``partial_path``)."""
    return (state or StateDir(target.parent)).journal(target)


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


def inspect_partial(target: Path, *, decoded: bool = False,
                    state: StateDir | None = None) -> PartialState:
    """Look at ``target``'s journal (in ``state``, see ``partial_path``) without taking its lock."""
    state = state or StateDir(target.parent)
    meta, have = Journal.peek(state.journal(target))
    if (meta is None or meta.get("decoded") != decoded or meta.get("path") != state.relpath(target)
            or not state.partial(target).exists()):
        return PartialState(None, {})
    identity = meta.get("identity")
    return PartialState(identity if isinstance(identity, list) else None, have)


def _meta(entry: FileEntry, decoded: bool, path: str) -> dict[str, object]:
    return {"v": 1, "identity": entry.identity(), "decoded": decoded, "path": path}


def _rebasable(meta: dict[str, object]) -> Callable[[dict[str, Any]], bool]:
    """A stored journal header that differs from ``meta`` in the source's mtime only
    (``plan.rebasable``: the caller compares every kept block with the source)."""
    def accept(old: dict[str, Any]) -> bool:
        ident, new = old.get("identity"), meta["identity"]
        return (isinstance(ident, list) and isinstance(new, list) and len(ident) == len(new)
                and {**old, "identity": None} == {**meta, "identity": None}
                and rebasable_identity(ident, new))
    return accept


class FileReceiver:
    """One target being received. ``write_block`` may be called from threads.

    ``state`` is the state folder of the tree ``target`` belongs to (default: that of
    ``target``'s own folder); the receiver creates it if needed.
    """

    def __init__(
        self,
        target: Path,
        entry: FileEntry,
        *,
        resume: bool = True,
        decode: BlockTransform | None = None,
        fsync: bool = True,
        state: StateDir | None = None,
        rebase: bool = False,
    ) -> None:
        self.target = target
        self.entry = entry
        self.layout = entry.layout()
        self._decode = decode
        self._fsync = fsync
        self.state = state or StateDir(target.parent)
        self.partial = self.state.partial(target)
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._active = 0
        self._flush_lock = threading.Lock()
        self._pending: list[tuple[int, bytes]] = []
        meta = _meta(entry, decode is not None, self.state.relpath(target))
        self._journal = self._open_journal(meta, keep=resume,
                                           accept=_rebasable(meta) if rebase else None)
        try:
            fd = -1
            if self._journal.have:
                try:
                    fd = os.open(self.partial, os.O_RDWR | os.O_CLOEXEC)
                except FileNotFoundError:
                    # Records without their partial (removed meanwhile) describe nothing:
                    # trusting them would publish a file of zeros that passes the checks.
                    self._journal.reset(self._journal.meta, sync=self._fsync)
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
        self._unverified: set[int] = set(self._journal.have)
        """Blocks carried over from an earlier run, not yet re-read (``verify_carried``)."""
        self._header_checked = not self._unverified
        self._verify_lock = threading.Lock()
        self.bytes_written = 0
        self.plain_digests: dict[int, bytes] = {}
        """Digests of decoded (plaintext) blocks written this run: the output
        file's own checksum without a second pass over it."""
        self.on_dropped: Callable[[list[int]], None] | None = None
        """Called (any thread) with blocks ``drop_blocks`` forgets, before they become
        missing: a session's assembler takes them back (they may be received again)."""

    def _open_journal(self, meta: dict[str, object], *, keep: bool,
                      accept: Callable[[dict[str, Any]], bool] | None = None) -> Journal:
        """Create the state folder if needed, then lock and open the journal in it. A client
        tidying the (empty) folder at that moment may remove it under us: make it again."""
        for attempt in range(3):
            self.state.ensure()
            try:
                return Journal.open(self.state.journal(self.target), meta, keep=keep,
                                    label=self.target.name, sync=self._fsync, accept=accept)
            except FileNotFoundError:
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    # -- state ----------------------------------------------------------------
    @property
    def decodes(self) -> bool:
        """It decodes what arrives (a decrypted download): whole verified blocks only."""
        return self._decode is not None

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
        """Verify and write one whole wire block; returns the bytes written (0 for a duplicate).

        The whole-block shortcut of ``BlockAssembler`` (which sessions use): checks the
        length and the digest here, then ``write_verified``."""
        self._check_index(index)
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
        return self.write_verified(index, data, digest)

    def write_verified(self, index: int, data: bytes | bytearray | memoryview, digest: bytes) -> int:
        """Write a whole block whose ``digest`` was checked by the caller (the assembler),
        decoding it first if the receiver decodes; then record it for the journal.
        Returns the wire bytes recorded (0 for a duplicate). ``IntegrityError`` when
        decoding fails (an envelope's tag)."""
        self._check_index(index)
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
        self._pwrite(out, offset)
        return self.record_verified(index, digest, len(data))

    def write_piece(self, index: int, offset: int, data: bytes | bytearray | memoryview) -> None:
        """Write bytes ``[offset, offset + len(data))`` of a block's stored form in place
        (the assembler's file sink; only for a receiver that does not decode). Unverified:
        the assembler journals nothing before the whole block matches its digest."""
        if self._decode is not None:
            raise ValueError("a decoding receiver takes whole verified blocks (write_verified)")
        start, length = self.layout.stored_range(index)
        if offset < 0 or offset + len(data) > length:
            raise ProtocolError(f"{self.entry.path or self.target.name}: piece outside block {index}")
        self._pwrite(data, start + offset)

    def zero_piece(self, index: int, offset: int, length: int) -> None:
        """Make bytes ``[offset, offset + length)`` of a block's stored form read as zeros,
        leaving them a hole of the partial file (``transport.blocks.sparse.ensure_zero``:
        only stale data there is overwritten). For a receiver that does not decode."""
        if self._decode is not None:
            raise ValueError("a decoding receiver takes whole verified blocks (write_verified)")
        start, size = self.layout.stored_range(index)
        if offset < 0 or offset + length > size:
            raise ProtocolError(f"{self.entry.path or self.target.name}: piece outside block {index}")
        with self._lock:
            if not self._open:
                raise ConflictError(f"{self.entry.path or self.target.name}: receiver closed")
            self._active += 1
        try:
            fd = os.open(self.partial, os.O_WRONLY | os.O_CLOEXEC)
            try:
                ensure_zero(fd, start + offset, length)
            finally:
                os.close(fd)
        finally:
            with self._lock:
                self._active -= 1
                self._idle.notify_all()

    def read_piece(self, index: int, offset: int, length: int) -> bytes:
        """Read back stored bytes of a block written by ``write_piece`` (for hashing)."""
        start, _ = self.layout.stored_range(index)
        fd = os.open(self.partial, os.O_RDONLY | os.O_CLOEXEC)
        try:
            return _pread_full(fd, length, start + offset)
        finally:
            os.close(fd)

    def record_verified(self, index: int, digest: bytes, length: int) -> int:
        """Record a block whose bytes are in the partial and match ``digest`` (checked by
        the caller) for the next journal ``flush``; returns ``length``, 0 for a duplicate."""
        with self._lock:
            if index in self._received:
                return 0
            self._received.add(index)
            self._pending.append((index, bytes(digest)))
            self.bytes_written += length
        return length

    def received(self) -> RangeSet:
        """Blocks written (journaled or pending), as ranges (a copy)."""
        with self._lock:
            return self._received.copy()

    def _check_index(self, index: int) -> None:
        if not 0 <= index < self.layout.count:
            raise ProtocolError(f"{self.entry.path or self.target.name}: block {index} out of range")

    def _pwrite(self, data: bytes | bytearray | memoryview, offset: int) -> None:
        with self._lock:
            if not self._open:
                raise ConflictError(f"{self.entry.path or self.target.name}: receiver closed")
            self._active += 1  # _close waits for writers to finish
        try:
            fd = os.open(self.partial, os.O_WRONLY | os.O_CLOEXEC)
            try:
                _pwrite_all(fd, data, offset)
            finally:
                os.close(fd)
        finally:
            with self._lock:
                self._active -= 1
                self._idle.notify_all()

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

    # -- re-verifying what an earlier run left ---------------------------------
    @property
    def unverified(self) -> int:
        """How many carried-over blocks are still to be re-read (0: every journaled
        digest describes the partial's bytes)."""
        with self._lock:
            return len(self._unverified)

    def verify_carried(self, max_bytes: int | None = None) -> list[int]:
        """Re-read blocks carried over from an earlier run and check them against the journal.

        Each block is read back from the partial (one block in memory at a time),
        hashed in its wire form and compared with its journal record. For a
        decoded partial (a decrypted download) the partial holds plaintext while
        the journal holds the digest of the ciphertext that arrived: the block is
        re-encoded with the receiver's transform, which is deterministic per
        (index, plaintext) (``BlockTransform``; the envelope derives its nonce from
        the plaintext), and the result hashed, so one changed plaintext byte
        changes the ciphertext and fails the check. The plaintext digest is kept
        for ``plain_root``. A stored header (an envelope kept as it is) is
        compared with the entry's and rewritten if it differs.

        A block that fails is dropped: its journal record is removed (the journal
        is rewritten durably without it) and it becomes missing, so the sender
        sends it again. Blocks written this run were hashed as they arrived and
        are never re-read. ``max_bytes`` bounds the bytes read by one call (None:
        all); call until ``unverified`` is 0. Returns the dropped block numbers.
        Thread-safe; a closed receiver returns ``[]``. Raises ``OSError`` when the
        partial cannot be read.
        """
        with self._verify_lock:
            with self._lock:
                if not self._open or not self._unverified:
                    return []
                todo = sorted(self._unverified)
                expected = {i: self._journal.have[i] for i in todo}
                self._active += 1  # _close waits for us: the journal stays open meanwhile
            try:
                checked: list[int] = []
                bad: list[int] = []
                budget = max_bytes
                fd = os.open(self.partial, os.O_RDWR | os.O_CLOEXEC)
                try:
                    if not self._header_checked:
                        self._check_header(fd)
                    for i in todo:
                        good, nbytes = self._check_block(fd, i, expected[i])
                        checked.append(i)
                        if not good:
                            bad.append(i)
                        if budget is not None:
                            budget -= nbytes
                            if budget <= 0:
                                break
                finally:
                    os.close(fd)
                if bad:
                    self.drop_blocks(bad)
                with self._lock:
                    self._unverified.difference_update(checked)
                return bad
            finally:
                with self._lock:
                    self._active -= 1
                    self._idle.notify_all()

    def _check_header(self, fd: int) -> None:
        header = self.entry.header if self._decode is None else b""
        if header and _pread_full(fd, len(header), 0) != header:
            _pwrite_all(fd, header, 0)
            if self._fsync:
                os.fdatasync(fd)
        self._header_checked = True

    def _check_block(self, fd: int, index: int, digest: bytes) -> tuple[bool, int]:
        """(block matches its journal digest, bytes read)."""
        if self._decode is None:
            offset, length = self.layout.stored_range(index)
        else:
            offset, length = self.out_layout.plain_range(index)
        if self._decode is None and digest == zero_digest(length) and is_hole(fd, offset, length):
            # No data there: a hole reads as zeros, and so does a range past the partial's
            # end once ``commit`` extends it to the file's size. Nothing to re-read.
            return True, 0
        data = _pread_full(fd, length, offset)
        if len(data) != length:  # the partial was cut short
            return False, len(data)
        if self._decode is None:
            return block_digest(data) == digest, length
        if block_digest(self._decode.encode(index, data)) != digest:
            return False, length
        self.plain_digests[index] = block_digest(data)
        return True, length

    def drop_blocks(self, bad: list[int]) -> None:
        """Forget journaled blocks (their bytes failed re-verification, or the
        source's differ): they become missing, to be received again.

        The journal is rewritten in place (its lock lives on this inode) with the
        records that remain; a crash in between leaves fewer records, never a
        record for bad bytes.
        """
        gone = set(bad)
        if not gone:
            return
        with self._flush_lock:
            kept = [(i, d) for i, d in self._journal.have.items() if i not in gone]
            self._journal.reset(self._journal.meta, sync=self._fsync)
            self._journal.append(kept, sync=self._fsync)
            with self._lock:
                self._pending = [(i, d) for i, d in self._pending if i not in gone]
                for i in gone:
                    self._received.discard(i)
                self._unverified.difference_update(gone)
                for i in gone:
                    self.plain_digests.pop(i, None)
        if self.on_dropped is not None:  # after: an assembler built meanwhile saw them held
            self.on_dropped(sorted(gone))

    # -- end ------------------------------------------------------------------
    def root(self) -> str:
        """Whole-file (wire) digest of what the partial holds, as ``algo:hex``.

        Built from the journal's digests after every carried-over block was
        re-read (``verify_carried``), so it describes the bytes on disk. Raises
        ``IntegrityError`` when blocks are missing (also when re-verification
        just dropped some: they must be sent again). Flush first: records still
        pending are not in the journal yet.
        """
        self._verify_or_fail()
        have = self.have()
        lost = self.layout.count - sum(1 for i in range(self.layout.count) if i in have)
        if lost:
            raise IntegrityError(f"{self.entry.path or self.target.name}: "
                                 f"{lost} blocks missing at commit")
        return file_digest(self.entry.block_size, self.entry.size, (have[i] for i in range(self.layout.count)))

    def plain_root(self) -> str:
        """Whole-file digest of the decoded output (``fallback checksum`` of the file written).

        Plaintext digests come from blocks written this run and from the
        re-verification of carried-over blocks, so normally nothing is read here.
        Call before ``commit``; raises like ``root``.
        """
        self._verify_or_fail()
        layout = self.out_layout
        with open(self.partial, "rb", buffering=0) as f:
            for i in range(layout.count):
                if i not in self.plain_digests:
                    offset, length = layout.plain_range(i)
                    self.plain_digests[i] = block_digest(_pread_full(f.fileno(), length, offset))
        return file_digest(self.entry.block_size, self.entry.size,
                           (self.plain_digests[i] for i in range(layout.count)))

    def _verify_or_fail(self) -> None:
        bad = self.verify_carried()
        if bad:
            raise IntegrityError(
                f"{self.entry.path or self.target.name}: {len(bad)} blocks kept from an earlier "
                f"run no longer match their digests (first: block {bad[0]}); they must be sent again"
            )

    def commit(self, expected_root: str | None, *, replace: bool = True) -> str:
        """Verify the whole file and publish it atomically; returns the wire root.

        Carried-over blocks are re-read first (``verify_carried``); any that fail
        are dropped and ``IntegrityError`` is raised with nothing published (the
        partial stays, minus those blocks, for the sender to fill). A whole-file
        digest different from ``expected_root`` discards the partial and raises
        ``IntegrityError``.
        """
        self.flush()
        self._verify_or_fail()
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
        os.chmod(self.partial, file_mode(self.entry.mode))  # no set-id bits; the umask applies
        os.utime(self.partial, ns=(self.entry.mtime_ns, self.entry.mtime_ns))
        if self.target.is_dir() and not self.target.is_symlink():
            raise ConflictError(f"{self.target.name}: a folder of that name exists")
        self.state.publish(self.partial, self.target, replace=replace)
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
            self._unverified.clear()  # nothing closed will be committed
            while self._active:
                self._idle.wait()
        self._journal.close(remove=remove_journal)


def _pwrite_all(fd: int, data: bytes | bytearray | memoryview, offset: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view = view[n:]
        offset += n


def _pread_full(fd: int, length: int, offset: int) -> bytes:
    """``length`` bytes at ``offset``, fewer only at end of file (short reads are legal)."""
    data = os.pread(fd, length, offset)
    while len(data) < length:
        more = os.pread(fd, length - len(data), offset + len(data))
        if not more:
            break
        data += more
    return data


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
