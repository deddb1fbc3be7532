"""The receiving half of a session: pieces in, whole verified blocks journaled.

Every path hands the pieces it receives (``(file, block, offset, data)``, the
block's digest when the piece announces it) to the session's one ``BlockSink``,
which feeds one ``BlockAssembler`` (``transport.blocks.assembly``): HTTP frames
now, UDP datagrams next, so both share one assembly and one verification.
The assembler writes each new byte through ``_Pieces``:

* a receiver that stores what arrives (an upload on the daemon, a download kept
  as it is) gets the piece written in place in its partial file
  (``FileReceiver.write_piece``), and a block is journaled
  (``record_verified``) only once the assembler has checked the whole of it;
* a receiver that decodes (a decrypted download) cannot write ciphertext in
  place: its pieces are held in a ``BufferSink`` and the verified block is
  decoded and written whole (``write_verified``).

A late duplicate (a block verified already, a file committed) is counted and
dropped; a block failing its digest is discarded whole, counted, and left
missing so the sender is asked for it again, never journaled. A block that
fails ``MAX_BLOCK_FAILURES`` times in one session is an ``IntegrityError``
(something corrupts it every time: no use asking again). ``verified`` keeps
the blocks verified since the sender's last acknowledgement report, and
``rejected`` the blocks to ask for again.

Thread-safety: pieces are taken in worker threads, one at a time (a lock),
since the assembler is not thread-safe; progress callbacks run on the event
loop.
"""

from __future__ import annotations

import asyncio
import errno
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from pathlib import Path
from typing import Any, TypeVar

from transport.blocks.assembly import (
    DEFAULT_MAX_OPEN_BYTES,
    BlockAssembler,
    BlockEvicted,
    BlockFailed,
    BlockVerified,
    BufferSink,
    LateDuplicate,
    PieceRefused,
)
from transport.blocks.inline import GroupResult, InlineDone, InlineTarget, commit_group
from transport.blocks.ranges import RangeSet
from transport.blocks.receiver import FileReceiver
from transport.blocks.sparse import Hole, zeros
from transport.blocks.statedir import StateDir
from transport.errors import IntegrityError, ProtocolError, TransportError, from_os_error

ProgressFn = Callable[[int, int], None]
_T = TypeVar("_T")
"""Called with (file index, wire bytes) for every block verified (``on_hole``: for every
block verified that arrived as a hole)."""

Buffer = bytes | bytearray | memoryview

MAX_BLOCK_FAILURES = 3
"""Digest failures of one block in one session after which the session fails."""

MAX_PENDING_ACKS = 1 << 16
"""Acknowledgements (journaled or rejected blocks) kept between two ``take_acks``."""


class _Pieces:
    """The assembler's ``PieceSink`` over a session's receivers (see the module docstring)."""

    def __init__(self, sink: BlockSink, buffers: BufferSink) -> None:
        self._sink = sink
        self._buffers = buffers

    def _decodes(self, file: int) -> bool:
        return self._sink.receiver(file).decodes

    def write(self, file: int, block: int, offset: int, data: memoryview) -> None:
        if self._decodes(file):
            self._buffers.write(file, block, offset, data)
        else:
            self._sink.receiver(file).write_piece(block, offset, data)

    def zero(self, file: int, block: int, offset: int, length: int) -> None:
        """A hole: the range reads as zeros, left unallocated in a partial file."""
        if self._decodes(file):
            self._buffers.write(file, block, offset, zeros(length))
        else:
            self._sink.receiver(file).zero_piece(block, offset, length)

    def read(self, file: int, block: int, offset: int, length: int) -> Buffer:
        if self._decodes(file):
            return self._buffers.read(file, block, offset, length)
        return self._sink.receiver(file).read_piece(block, offset, length)

    def discard(self, file: int, block: int) -> None:
        self._buffers.discard(file, block)  # in place: the bytes are overwritten when resent


class BlockSink:
    """Receivers of a session, fed with pieces, with periodic durable journal flushes.

    ``receivers`` (file index -> ``FileReceiver``) must all be in place before the
    first piece arrives: the assembler is built then, from their layouts and the
    blocks they already hold.
    """

    FLUSH_INTERVAL = 0.5

    def __init__(self, receivers: dict[int, FileReceiver], executor: Executor, *,
                 clock: Callable[[], float] = time.monotonic,
                 inline: dict[int, InlineTarget] | None = None, state: StateDir | None = None,
                 fsync: bool = True, replace: bool = True, serial_groups: bool = False,
                 name_of: Callable[[Path, str], str] | None = None,
                 full_note: str = "") -> None:
        self.receivers = receivers
        self._full_note = full_note
        """Appended to a receiver's "No space left on device" (or quota) error: what
        happens to its partial (the daemon keeps it for a resume and says so)."""
        self._name_of = name_of or (lambda target, rel: rel or target.name)
        """How a file is named in an error: ``(target, its manifest path)`` to text. The
        default, the manifest path, is what a daemon may say to its client (never its own
        folders); a client names the local target."""
        self.inline: dict[int, InlineTarget] = inline if inline is not None else {}
        """One-block files not received yet (``transport.blocks.inline``): they arrive in
        bundles (``bundle``) and are committed in groups, with no receiver and no journal.
        One arriving as ordinary pieces (a peer without bundles) gets a receiver then."""
        self.inline_done: dict[int, InlineDone] = {}
        """One-block files published this session."""
        self.inline_errors: dict[int, TransportError] = {}
        """One-block files that could not be published (a folder in the way, ...)."""
        self._claimed: set[int] = set()
        """One-block files whose bundle's group is being committed (out of ``inline``,
        not yet in ``inline_done``): their pieces meanwhile are dropped as late
        duplicates; a group that fails puts its files back in ``inline``."""
        self._gone = RangeSet()
        """File indices whose receiver left (committed): with ``inline_done`` and
        ``inline_errors``, what a piece may still name as a late duplicate when the
        assembler was built after it left (one int range per run of indices)."""
        self._state = state
        self._fsync = fsync
        self._replace = replace
        self._inline_failures: dict[int, int] = {}
        self._max_key = -1
        self._max_block = 0
        self._serial_groups = serial_groups
        self._groups: asyncio.Lock | None = None
        """With ``serial_groups`` (the daemon's upload sinks), held while a bundle's group
        is committed: the session commits its groups one at a time, in one worker thread,
        however many streams bring bundles. Groups create
        their partials in one folder (its lock serialises them in the kernel anyway) and
        every system call of a group gives up the GIL and takes it back: four groups at
        once made four threads and the event loop pass it around per call (measured: the
        first 7,680 files of a 10,000-file upload spent 16-24 s in commits, summed over the
        threads, one group at a time 9-12 s, interleaved runs at load 6-8). The download
        client's sink keeps groups in parallel: four interleaved pairs of downloads
        were not faster one group at a time (medians 8.2 s against 4.2 s, noisy)."""
        self.executor = executor
        self.received_bytes = 0
        self.hole_bytes = 0
        """Bytes of blocks verified that arrived as holes (no payload; not in ``received_bytes``)."""
        self.on_progress: ProgressFn | None = None
        self.on_hole: ProgressFn | None = None
        self.last_activity = time.monotonic()
        self.duplicates = 0  # late duplicate pieces dropped
        self.failed = 0  # blocks that failed their digest (discarded, asked again)
        self.verified: list[tuple[int, int]] | None = None
        """(file, block) verified and not journaled yet, when acknowledgements are tracked
        (``track_acks``); ``flush`` moves them to ``journaled``."""
        self.journaled: list[tuple[int, int]] = []
        """(file, block) journaled since ``take_acks``: what the receiver acknowledges."""
        self.rejected: list[tuple[int, int]] = []  # (file, block) to ask for again
        self._clock = clock
        self._lock = threading.Lock()  # the assembler and receivers: held while a piece is taken
        self._acks_lock = threading.Lock()
        """Only the lists ``verified``, ``journaled`` and ``rejected``, for a moment: the
        event loop takes them (``flush``, ``take_acks``) without waiting behind a worker
        that holds ``_lock`` while it hashes and writes a 4 MiB block (it did: 1.8 s of
        a 512 MiB download's event loop was spent blocked there, cProfile)."""
        self._assembler: BlockAssembler | None = None
        self._buffers: BufferSink | None = None
        self._flusher: asyncio.Task[None] | None = None

    def receiver(self, file_index: int) -> FileReceiver:
        """The receiver of ``file_index``; a one-block file still waiting for its bundle
        gets one now (its block came as ordinary pieces). ``ProtocolError`` if unknown."""
        try:
            return self.receivers[file_index]
        except KeyError:
            pass
        t = self.inline.get(file_index)
        if t is None:
            raise ProtocolError(f"unknown file index {file_index}")
        rec = FileReceiver(t.target, t.entry, resume=False, decode=t.decode, fsync=self._fsync,
                           state=self._state)
        rec.on_dropped = lambda blocks, i=file_index: self._forget(i, blocks)
        self.receivers[file_index] = rec
        del self.inline[file_index]
        return rec

    def max_block(self) -> int:
        """The largest stored block of any file of the sink (a frame's size bound), computed
        once per set of files. It never shrinks: a file that leaves (published) keeps its
        block in the bound, so a late duplicate of it (a stream that started after the
        publication) is dropped, not refused as too large (a 1.2 kB upload failed one run
        in 16 with "bundle of 1274 bytes exceeds the limit")."""
        with self._lock:
            key = len(self.receivers) + len(self.inline) + len(self.inline_done)
            if key != self._max_key:
                self._max_key = key
                self._max_block = max(
                    self._max_block,
                    max((r.layout.max_stored_block for r in self.receivers.values()),
                        default=0),
                    max((t.entry.layout().max_stored_block for t in self.inline.values()),
                        default=0))
            return self._max_block

    def missing(self) -> list[tuple[int, int, int]]:
        """``(file, start, stop)`` block ranges not received yet, every file of the sink."""
        with self._lock:
            recs = list(self.receivers.items())
            out = [(i, 0, 1) for i in self.inline]
        out[:0] = [(i, a, b) for i, r in recs for a, b in r.missing()]
        return out

    def complete(self) -> bool:
        """Every file's blocks are here (one-block files: published)."""
        with self._lock:
            if self.inline:
                return False
            recs = list(self.receivers.values())
        return all(not r.missing() for r in recs)

    # -- bundles of one-block files ------------------------------------------------------
    async def bundle(self, items: list[tuple[int, Buffer, bytes]]) -> int:
        """Take a bundle's ``(file, stored bytes, digest)`` items: one executor job verifies,
        writes and publishes them as a group (``inline.commit_group``). Returns the wire
        bytes published. A file published already is a late duplicate (counted); a digest
        mismatch leaves the file missing (asked again, ``MAX_BLOCK_FAILURES`` at most); a
        file that is not a one-block file of this sink is a ``ProtocolError``."""
        first = items[0][0] if items else None
        if not self._serial_groups:
            return await self._job(first, self._take_bundle, items, then=self._account_bundle)
        if self._groups is None:
            self._groups = asyncio.Lock()
        async with self._groups:  # one group at a time (see ``_groups``)
            return await self._job(first, self._take_bundle, items, then=self._account_bundle)

    def _account_bundle(self, done: list[InlineDone]) -> int:
        """On the event loop: count and report the files a group published."""
        self.last_activity = time.monotonic()
        total = 0
        for d in done:
            total += d.nbytes
            self.received_bytes += d.nbytes
            if self.on_progress is not None:
                self.on_progress(d.file, d.nbytes)
        return total

    def _take_bundle(self, items: list[tuple[int, Buffer, bytes]]) -> list[InlineDone]:
        claimed: list[tuple[int, InlineTarget, Buffer, bytes]] = []
        seen: set[int] = set()
        with self._lock:
            for file, data, digest in items:
                t = self.inline.pop(file, None)
                if t is not None:  # it leaves: its block stays in the frame size bound
                    self._max_block = max(self._max_block, len(data))
                    claimed.append((file, t, data, digest))
                    seen.add(file)
                    self._claimed.add(file)
                elif file in self.inline_done or file in self.inline_errors or file in seen:
                    self.duplicates += 1
                elif file in self.receivers:
                    raise ProtocolError(f"file {file} is not a one-block file: not in a bundle")
                else:
                    raise ProtocolError(f"unknown file index {file}")
        result = GroupResult()
        try:
            result = commit_group(claimed, self._state or StateDir(Path(".")),
                                  fsync=self._fsync, replace=self._replace,
                                  name_of=self._name_of)
        finally:
            with self._lock:
                handled = {d.file for d in result.done} | set(result.errors)
                for file, t, _, _ in claimed:
                    self._claimed.discard(file)
                    if file not in handled:
                        self.inline[file] = t  # failed digest, or the group raised: missing
                self._conclude_bundle(result)
        return result.done

    def _conclude_bundle(self, result: GroupResult) -> None:
        """With the lock held: record a group's outcome (acks, rejections, failures)."""
        for d in result.done:
            self.inline_done[d.file] = d
            if self._assembler is not None:
                try:
                    self._assembler.commit(d.file)
                except ProtocolError:
                    pass  # the assembler was built after this file was published
            if self.verified is not None:
                with self._acks_lock:
                    if len(self.journaled) < MAX_PENDING_ACKS:
                        self.journaled.append((d.file, 0))
        self.inline_errors.update(result.errors)
        for file in result.failed:
            self.failed += 1
            self._reject(file, 0)
            n = self._inline_failures[file] = self._inline_failures.get(file, 0) + 1
            if n >= MAX_BLOCK_FAILURES:
                t = self.inline[file]
                raise IntegrityError(f"{t.entry.path or t.target.name}: block 0 failed its "
                                     f"digest {n} times")

    # -- local I/O errors -------------------------------------------------------------------
    async def _job(self, file: int | None, fn: Callable[..., _T], *args: Any,
                   then: Callable[[_T], int] | None = None) -> int:
        """``fn(*args)`` in the executor, then ``then(result)`` on the event loop; returns
        what ``then`` returned (0 without one).

        ``then`` (the counting: bytes received, progress) runs when the worker finishes,
        even when the caller was cancelled meanwhile: the blocks were written and
        journaled all the same (a download stream cut by the switch to UDP had published
        a bundle and not counted it: "1.2 kB already there, nothing sent" for a fresh
        download, one run in four). An ``OSError`` (the disk full, EIO, a permission)
        comes out as this end's own error naming ``file`` (``from_os_error``): never as
        an ``OSError``, which a stream's caller would take for its connection breaking
        (a download to a full disk was retried, stream after stream, while memory grew
        at the link's rate until the OOM killer came)."""
        fut = asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)
        counted: list[int] = []

        def settle(f: asyncio.Future[_T]) -> None:  # before the caller resumes
            if f.cancelled() or f.exception() is not None:  # (retrieved: no warning later)
                return
            if then is not None:
                counted.append(then(f.result()))

        fut.add_done_callback(settle)
        try:
            await asyncio.shield(fut)
        except OSError as exc:
            err = from_os_error(exc, self._name(file))
            if self._full_note and exc.errno in (errno.ENOSPC, errno.EDQUOT) \
                    and file in self.receivers:
                err.args = (f"{err.message} ({self._full_note})",)
            raise err from exc
        return counted[0] if counted else 0

    def _name(self, file: int | None) -> str:
        rec = self.receivers.get(file) if file is not None else None
        if rec is not None:
            return self._name_of(rec.target, rec.entry.path)
        t = self.inline.get(file) if file is not None else None
        if t is not None:
            return self._name_of(t.target, t.entry.path)
        return "a received file"

    # -- pieces in --------------------------------------------------------------------
    async def piece(self, file: int, block: int, offset: int, data: Buffer | Hole,
                    digest: bytes | None = None, *, whole: bool = False) -> int:
        """Take one piece (and the block's digest, when the piece announces it); returns
        the wire bytes of blocks it completed and verified (0 usually for small pieces).
        A ``Hole`` is a piece that reads as zeros and was not sent (a hole of a sparse
        file): the partial keeps it a hole.

        ``whole``: the piece must be the whole block (a version 1 frame). Raises
        ``ProtocolError`` for a malformed piece or digest, ``IntegrityError`` for a
        block failing ``MAX_BLOCK_FAILURES`` times or failing to decode.
        """
        return await self._job(file, self._take, file, block, offset, data, digest, whole,
                               then=self._account)

    async def pieces(self, file: int, block: int, parts: Sequence[tuple[int, Buffer]],
                     digest: bytes | None = None, *, first: bool = True) -> int:
        """Several parts of one sender's piece, ``(offset, data)`` in order, in one worker
        job (an HTTP stream hands over the chunks the socket gave, about 1 MiB at a time,
        without joining them into one block first); ``digest`` as for ``piece``.

        ``first``: these parts begin the sender's piece. A late duplicate counts once per
        piece the sender sent (its first part), however the socket split it. Returns and
        raises as ``piece``."""
        return await self._job(file, self._take_parts, file, block, parts, digest, first,
                               then=self._account)

    def _take_parts(self, file: int, block: int, parts: Sequence[tuple[int, Buffer]],
                    digest: bytes | None, first: bool) -> list[tuple[int, int, bool]]:
        done: list[tuple[int, int, bool]] = []
        for offset, data in parts:
            done += self._take(file, block, offset, data, digest, False, count_late=first)
            digest, first = None, False  # announced once; counted once
        return done

    def _account(self, done: list[tuple[int, int, bool]]) -> int:
        """On the event loop: count and report the blocks a worker job verified."""
        self.last_activity = time.monotonic()
        total = 0
        for f, n, hole in done:
            total += n
            if hole:
                self.hole_bytes += n
                if self.on_hole is not None:
                    self.on_hole(f, n)
                continue
            self.received_bytes += n
            if self.on_progress is not None:
                self.on_progress(f, n)
        if done:
            self._ensure_flusher()
        return total

    async def batch(self, batch: Sequence[tuple[int, int, int, Buffer | Hole, bytes | None]]
                    ) -> int:
        """Take many ``(file, block, offset, data, digest)`` pieces in one worker job (a
        datagram path's batch; ``data`` may be empty when only the digest comes, or a
        ``Hole``: a hole piece, kept a hole as in ``piece``). Returns
        the wire bytes of blocks verified; raises as ``piece`` does (the pieces before the
        bad one are taken)."""
        return await self._job(batch[0][0] if batch else None, self._take_many, batch,
                               then=self._account)

    def _take_many(self, batch: Sequence[tuple[int, int, int, Buffer | Hole, bytes | None]]
                   ) -> list[tuple[int, int, bool]]:
        done: list[tuple[int, int, bool]] = []
        for file, block, offset, data, digest in batch:
            done += self._take(file, block, offset, data, digest, False)
        return done

    async def write(self, file_index: int, block: int, data: Buffer, digest: bytes) -> int:
        """A whole block and its digest (the piece at offset 0 holding all of it)."""
        return await self.piece(file_index, block, 0, data, digest, whole=True)

    def _build(self) -> BlockAssembler:
        # Listen for dropped blocks first: one dropped while ``have`` is read is then
        # forgotten right after (its ``_forget`` waits for the lock held by our caller).
        for i, r in self.receivers.items():
            r.on_dropped = lambda blocks, i=i: self._forget(i, blocks)
        layouts = {i: r.layout for i, r in self.receivers.items()}
        layouts.update((i, t.entry.layout()) for i, t in self.inline.items())
        have: dict[int, RangeSet] = {i: r.received() for i, r in self.receivers.items()}
        have.update((i, RangeSet()) for i in self.inline)
        decoding = {i: r.layout for i, r in self.receivers.items() if r.decodes}
        decoding.update((i, t.entry.layout()) for i, t in self.inline.items()
                        if t.decode is not None)
        self._buffers = BufferSink(decoding, pool=2)
        largest = max((lay.max_stored_block for lay in layouts.values()), default=0)
        asm = BlockAssembler(layouts, _Pieces(self, self._buffers),
                             have=have,
                             max_open_bytes=max(DEFAULT_MAX_OPEN_BYTES, largest))
        self._assembler = asm
        return asm

    def _take(self, file: int, block: int, offset: int, data: Buffer | Hole,
              digest: bytes | None, whole: bool, *, count_late: bool = True
              ) -> list[tuple[int, int, bool]]:
        """Worker thread: the piece through the assembler; (file, bytes, arrived as a hole)
        of blocks verified. ``count_late``: a late duplicate here counts in
        ``duplicates`` (False for the later parts of one sender's piece)."""
        with self._lock:
            asm = self._assembler or self._build()
            rec = self.receivers.get(file)  # None once committed: the assembler knows
            if rec is None and file not in self.inline:
                if self._finished(file):
                    # Published, or being published by a bundle's group, with its pieces
                    # still coming (a one-block file's bundle on an HTTP stream, then its
                    # pieces over UDP): a late duplicate, not an unknown index ("UDP path
                    # closed: unknown file index 0", then the HTTPS stream refused too
                    # and a 1 MB upload failed; one small upload in 15-25, trial).
                    self.duplicates += count_late
                    return []
            elif rec is None and not asm.knows(file):  # back from a group that failed
                asm.add(file, self.inline[file].entry.layout())
            if whole and rec is not None and 0 <= block < rec.layout.count \
                    and len(data) != rec.layout.stored_range(block)[1]:
                raise ProtocolError(f"{rec.entry.path or rec.target.name}: block {block} has "
                                    f"{len(data)} bytes, expected "
                                    f"{rec.layout.stored_range(block)[1]}")
            now = self._clock()
            events = asm.expect(file, block, digest) if digest is not None else ()
            # A digest for a block verified already is dropped quietly: the piece with
            # it is the late duplicate, counted once below.
            events = tuple(e for e in events if not isinstance(e, LateDuplicate))
            hole = isinstance(data, Hole)
            if isinstance(data, Hole):
                events += asm.receive_hole(file, block, offset, data.length, now)
            elif len(data) or digest is None:  # a digest alone (a datagram path's) is no piece
                events += asm.receive(file, block, offset, data, now)
            done: list[tuple[int, int, bool]] = []
            for ev in events:
                if isinstance(ev, BlockVerified):
                    n = self._journal(ev)
                    if n:
                        done.append((ev.file, n, hole and ev.block == block and ev.file == file))
                elif isinstance(ev, LateDuplicate):
                    self.duplicates += count_late
                elif isinstance(ev, BlockFailed):
                    self.failed += 1
                    self._reject(ev.file, ev.block)
                    if ev.attempt >= MAX_BLOCK_FAILURES:
                        r = self.receiver(ev.file)
                        raise IntegrityError(f"{r.entry.path or r.target.name}: block {ev.block} "
                                             f"failed its digest {ev.attempt} times")
                elif isinstance(ev, PieceRefused | BlockEvicted):
                    self._reject(ev.file, ev.block)
            return done

    def _reject(self, file: int, block: int) -> None:
        with self._acks_lock:
            if len(self.rejected) < MAX_PENDING_ACKS:
                self.rejected.append((file, block))

    def _journal(self, ev: BlockVerified) -> int:
        rec = self.receivers.get(ev.file)
        if rec is None:  # committed meanwhile
            return 0
        if rec.decodes:
            assert self._buffers is not None
            try:
                n = rec.write_verified(ev.block, self._buffers.block(ev.file, ev.block), ev.digest)
            finally:
                self._buffers.discard(ev.file, ev.block)
        else:
            n = rec.record_verified(ev.block, ev.digest, ev.length)
        if n and self.verified is not None:
            with self._acks_lock:
                if self.verified is not None:
                    self.verified.append((ev.file, ev.block))
        return n

    def _forget(self, file: int, blocks: list[int]) -> None:
        with self._lock:
            if self._assembler is not None:
                self._assembler.forget(file, blocks)

    def publishing(self, file: int) -> bool:
        """``file``'s bundle group is being committed now (it is neither inline nor done)."""
        return file in self._claimed

    def _finished(self, file: int) -> bool:
        """``file`` was published (or failed for good) this session: it has left."""
        return (file in self.inline_done or file in self.inline_errors or file in self._gone
                or file in self._claimed)

    def committed(self, file: int) -> None:
        """File ``file`` is published: its receiver leaves; later pieces are late duplicates."""
        with self._lock:
            if self._assembler is not None:
                self._assembler.commit(file)
            rec = self.receivers.pop(file, None)
            if rec is not None:
                self._gone.add(file, file + 1)
            if rec is not None:  # it leaves: its blocks stay in the frame size bound
                self._max_block = max(self._max_block, rec.layout.max_stored_block)

    # -- acknowledgements ---------------------------------------------------------------
    def track_acks(self) -> None:
        """Keep the blocks journaled (and rejected) for ``take_acks``, at most
        ``MAX_PENDING_ACKS`` of each between two takes (beyond, the sender's other
        means, a stream's success and the commit, still tell it)."""
        if self.verified is None:
            self.verified = []

    def take_acks(self) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
        """(journaled, rejected) ``(file, block)`` since the last take; both emptied."""
        with self._acks_lock:
            journaled, self.journaled = self.journaled, []
            rejected, self.rejected = self.rejected, []
        return journaled, rejected

    # -- durability -------------------------------------------------------------------
    def _ensure_flusher(self) -> None:
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.get_running_loop().create_task(self._flush_soon())

    async def _flush_soon(self) -> None:
        await asyncio.sleep(self.FLUSH_INTERVAL)
        await self.flush()

    async def flush(self) -> None:
        """Make every verified block durable and journaled (``FileReceiver.flush``)."""
        pending: list[tuple[int, int]] = []
        if self.verified is not None:
            with self._acks_lock:
                pending, self.verified = self.verified, []
        recs = list(self.receivers.values())
        if recs:  # one executor job for every receiver (each flushes only what it holds)
            await self._job(None, _flush_all, recs)
        if pending:
            with self._acks_lock:
                room = MAX_PENDING_ACKS - len(self.journaled)
                self.journaled.extend(pending[:max(0, room)])

    async def close(self) -> None:
        """Checkpoint every receiver, keeping partials for a later resume."""
        if self._flusher is not None:
            self._flusher.cancel()
        loop = asyncio.get_running_loop()
        recs = list(self.receivers.values())
        if recs:
            await loop.run_in_executor(self.executor, _close_all, recs)
        self.receivers.clear()


def _flush_all(recs: list[FileReceiver]) -> None:
    for rec in recs:
        rec.flush()


def _close_all(recs: list[FileReceiver]) -> None:
    """Close every receiver (keeping partials); the first error is raised after all closed."""
    first: BaseException | None = None
    for rec in recs:
        try:
            rec.close()
        except Exception as exc:  # noqa: BLE001 - the others must still be closed
            first = first or exc
    if first is not None:
        raise first
