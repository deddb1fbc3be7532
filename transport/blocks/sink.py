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
import threading
import time
from collections.abc import Callable
from concurrent.futures import Executor

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
from transport.blocks.receiver import FileReceiver
from transport.errors import IntegrityError, ProtocolError

ProgressFn = Callable[[int, int], None]
"""Called with (file index, wire bytes) for every block verified."""

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
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.receivers = receivers
        self.executor = executor
        self.received_bytes = 0
        self.on_progress: ProgressFn | None = None
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
        self._lock = threading.Lock()
        self._assembler: BlockAssembler | None = None
        self._buffers: BufferSink | None = None
        self._flusher: asyncio.Task[None] | None = None

    def receiver(self, file_index: int) -> FileReceiver:
        try:
            return self.receivers[file_index]
        except KeyError:
            raise ProtocolError(f"unknown file index {file_index}") from None

    def max_block(self) -> int:
        return max((r.layout.max_stored_block for r in self.receivers.values()), default=0)

    # -- pieces in --------------------------------------------------------------------
    async def piece(self, file: int, block: int, offset: int, data: Buffer,
                    digest: bytes | None = None, *, whole: bool = False) -> int:
        """Take one piece (and the block's digest, when the piece announces it); returns
        the wire bytes of blocks it completed and verified (0 usually for small pieces).

        ``whole``: the piece must be the whole block (a version 1 frame). Raises
        ``ProtocolError`` for a malformed piece or digest, ``IntegrityError`` for a
        block failing ``MAX_BLOCK_FAILURES`` times or failing to decode.
        """
        loop = asyncio.get_running_loop()
        done = await loop.run_in_executor(self.executor, self._take, file, block, offset, data,
                                          digest, whole)
        self.last_activity = time.monotonic()
        total = 0
        for f, n in done:
            total += n
            self.received_bytes += n
            if self.on_progress is not None:
                self.on_progress(f, n)
        if done:
            self._ensure_flusher()
        return total

    async def write(self, file_index: int, block: int, data: Buffer, digest: bytes) -> int:
        """A whole block and its digest (the piece at offset 0 holding all of it)."""
        return await self.piece(file_index, block, 0, data, digest, whole=True)

    def _build(self) -> BlockAssembler:
        # Listen for dropped blocks first: one dropped while ``have`` is read is then
        # forgotten right after (its ``_forget`` waits for the lock held by our caller).
        for i, r in self.receivers.items():
            r.on_dropped = lambda blocks, i=i: self._forget(i, blocks)
        layouts = {i: r.layout for i, r in self.receivers.items()}
        self._buffers = BufferSink({i: r.layout for i, r in self.receivers.items() if r.decodes},
                                   pool=2)
        largest = max((lay.max_stored_block for lay in layouts.values()), default=0)
        asm = BlockAssembler(layouts, _Pieces(self, self._buffers),
                             have={i: r.received() for i, r in self.receivers.items()},
                             max_open_bytes=max(DEFAULT_MAX_OPEN_BYTES, largest))
        self._assembler = asm
        return asm

    def _take(self, file: int, block: int, offset: int, data: Buffer, digest: bytes | None,
              whole: bool) -> list[tuple[int, int]]:
        """Worker thread: the piece through the assembler; (file, bytes) of blocks verified."""
        with self._lock:
            asm = self._assembler or self._build()
            rec = self.receivers.get(file)  # None once committed: the assembler knows
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
            events += asm.receive(file, block, offset, data, now)
            done: list[tuple[int, int]] = []
            for ev in events:
                if isinstance(ev, BlockVerified):
                    n = self._journal(ev)
                    if n:
                        done.append((ev.file, n))
                elif isinstance(ev, LateDuplicate):
                    self.duplicates += 1
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
            self.verified.append((ev.file, ev.block))
        return n

    def _forget(self, file: int, blocks: list[int]) -> None:
        with self._lock:
            if self._assembler is not None:
                self._assembler.forget(file, blocks)

    def committed(self, file: int) -> None:
        """File ``file`` is published: its receiver leaves; later pieces are late duplicates."""
        with self._lock:
            if self._assembler is not None:
                self._assembler.commit(file)
            self.receivers.pop(file, None)

    # -- acknowledgements ---------------------------------------------------------------
    def track_acks(self) -> None:
        """Keep the blocks journaled (and rejected) for ``take_acks``, at most
        ``MAX_PENDING_ACKS`` of each between two takes (beyond, the sender's other
        means, a stream's success and the commit, still tell it)."""
        if self.verified is None:
            self.verified = []

    def take_acks(self) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
        """(journaled, rejected) ``(file, block)`` since the last take; both emptied."""
        with self._lock:
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
        loop = asyncio.get_running_loop()
        pending: list[tuple[int, int]] = []
        if self.verified is not None:
            with self._lock:
                pending, self.verified = self.verified, []
        for rec in list(self.receivers.values()):
            await loop.run_in_executor(self.executor, rec.flush)
        if pending:
            with self._lock:
                room = MAX_PENDING_ACKS - len(self.journaled)
                self.journaled.extend(pending[:max(0, room)])

    async def close(self) -> None:
        """Checkpoint every receiver, keeping partials for a later resume."""
        if self._flusher is not None:
            self._flusher.cancel()
        loop = asyncio.get_running_loop()
        for rec in list(self.receivers.values()):
            await loop.run_in_executor(self.executor, rec.close)
        self.receivers.clear()
