"""The daemon's side of a download session: the sources it reads blocks from, and the
``/digests`` calls answered from them (block digests and whole-file roots, each call
reading at most ``MAX_DIGEST_BYTES``).

``open_sources`` gives a download ``Session`` (``fallback.sessions``) its
``BlockSender``; ``source_digests`` and ``source_roots`` answer the client's checks
before it publishes what it downloaded. Blocking reads run on the session's executor.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from fallback import answers as A
from fallback.control import MAX_DIGEST_READ
from fallback.sessions import Session
from transport.blocks.digest import file_digest
from transport.blocks.manifest import FileEntry
from transport.blocks.session import BlockSender
from transport.blocks.source import FileSource, SourceWindow
from transport.blocks.sparse import Hole
from transport.errors import ProtocolError, SourceChanged

MAX_DIGEST_BLOCKS = 4096
"""Most block digests (or file roots) one ``/digests`` call may ask for; the
client batches far below this."""

MAX_DIGEST_BYTES = MAX_DIGEST_READ  # see fallback.control

SOURCE_WINDOW = 8
"""Files a download session keeps open at once (least recently read closed first): a
session holds at most this many descriptors for its files, plus one per read in flight
(the daemon's I/O pool has 4 threads), whatever the number of files. Eight covers the
files that a session's streams read in parallel (they take blocks in manifest order);
more would only hold descriptors that an abandoned session keeps until its timeout."""


class SentSource(FileSource):
    """A daemon-side source that remembers the digest of every block it read this session.

    The client asks for the whole-file digest over the source's current bytes
    before it publishes a download (``source_roots``); with these digests the
    daemon reads only blocks it has not read this session (none, when the
    client fetched or compared every block). They stay valid while the file is
    unchanged, which ``FileSource`` checks after every read (size, mtime, and
    the inode's ctime: an edit whose mtime was set back still moves the ctime).
    Memory: one 32-byte digest per block *read* (a dict filled as blocks go out),
    so a session costs nothing for blocks it never sends.
    """

    __slots__ = ("index", "_digests")

    def __init__(self, path: Path, entry: FileEntry, index: int = -1, **kw: Any) -> None:
        super().__init__(path, entry, **kw)
        self.index = index  # the file's index in the session's manifest
        self._digests: dict[int, bytes] = {}

    def read_block(self, index: int) -> tuple[bytes | bytearray, bytes]:
        data, digest = super().read_block(index)
        self._digests[index] = digest
        return data, digest

    def read_wire(self, index: int) -> tuple[bytes | bytearray | Hole, bytes]:
        data, digest = super().read_wire(index)
        self._digests[index] = digest
        return data, digest

    def digest_of(self, index: int) -> bytes:
        """The digest recorded when block ``index`` was last read (KeyError if never)."""
        return self._digests[index]

    def unread(self) -> list[int]:
        """Blocks whose digest this session has not recorded yet (``root`` reads them)."""
        return [b for b in range(self.layout.count) if b not in self._digests]

    def root(self) -> str:
        """Whole-file digest of the current bytes: recorded digests, reading only the rest.
        Raises ``SourceChanged`` when the file changed since the session opened."""
        self.check_unchanged()
        count = self.layout.count
        for b in range(count):
            if b not in self._digests:
                self.read_wire(b)  # a hole's digest without reading it
        self.check_unchanged()
        return file_digest(self.entry.block_size, self.entry.size,
                           (self._digests[b] for b in range(count)))


def open_sources(session: Session) -> BlockSender:
    """The feed of a download session (worker thread): one lazily opened source per file.

    Each file's size and mtime are checked against the manifest here (``SourceChanged``,
    409, if it changed since the walk); no descriptor is opened until a block is read.
    """
    window = SourceWindow(SOURCE_WINDOW)
    sources: dict[int, FileSource] = {}
    for i in session.file_indices():
        sources[i] = SentSource(session.target(i), session.entries[i], i, window=window,
                                where="on the server")
    feed = BlockSender(sources, session.executor)
    session.feed = feed
    return feed


def _source(session: Session, index: int) -> SentSource:
    assert session.feed is not None
    src = session.feed.sources.get(index)
    if not isinstance(src, SentSource):
        raise ProtocolError(f"unknown file index {index}")
    return src


async def _read_digests(session: Session, src: SentSource, blocks: Iterable[int],
                        budget: list[int]) -> bool:
    """Read ``blocks`` (one executor job each, so other requests interleave FIFO on the
    I/O pool) while ``budget[0]`` (bytes, ``MAX_DIGEST_BYTES`` per call) lasts; every
    read is recorded. Returns False when the budget ran out first."""
    loop = asyncio.get_running_loop()
    for b in blocks:
        if budget[0] <= 0:
            return False
        await loop.run_in_executor(session.executor, src.read_wire, b)  # holes unread
        budget[0] -= src.layout.stored_range(b)[1]  # what was read, not the block size
    return True


async def source_digests(session: Session, index: int, blocks: list[int],
                         root: bool) -> A.DigestsAnswer:
    """``{digests: {block: hex}, root?: hex, pending?: true}``: digests of some source
    blocks and optionally the whole-file digest, reading at most ``MAX_DIGEST_BYTES``.

    Blocks beyond the budget are left out (the client asks for them again); a root not
    reached within it is answered ``pending: true`` (the blocks read stay recorded, so
    the next call goes on from there). At most ``MAX_DIGEST_BLOCKS`` blocks per call.
    """
    src = _source(session, index)
    if len(blocks) > MAX_DIGEST_BLOCKS:
        raise ProtocolError(f"at most {MAX_DIGEST_BLOCKS} blocks per digests call")
    count = src.layout.count
    for b in blocks:
        if not 0 <= b < count:
            raise ProtocolError(f"block {b} out of range")
    budget = [MAX_DIGEST_BYTES]
    done: list[int] = []
    for b in blocks:
        if not await _read_digests(session, src, [b], budget):
            break
        done.append(b)
    whole: str | None = None
    pending = False
    if root:
        if len(done) == len(blocks) and await _read_digests(session, src, src.unread(), budget):
            whole = await asyncio.get_running_loop().run_in_executor(session.executor, src.root)
        else:
            pending = True
    return A.DigestsAnswer({b: src.digest_of(b) for b in done}, whole, pending)


async def source_roots(session: Session, files: list[int]) -> A.RootsAnswer:
    """Whole-file digests over the current bytes of some files, for the client's check
    before it publishes them: ``{roots: {file: root}, errors: {file: message},
    pending: [file, ...]}``. At most ``MAX_DIGEST_BYTES`` are read per call; files not
    finished within it are ``pending`` (ask again: blocks read stay recorded). A file
    changed since the session opened is an error for that file only."""
    if len(files) > MAX_DIGEST_BLOCKS:
        raise ProtocolError(f"at most {MAX_DIGEST_BLOCKS} files per digests call")
    out = A.RootsAnswer({}, {}, [])
    budget = [MAX_DIGEST_BYTES]
    loop = asyncio.get_running_loop()
    todo = [_source(session, i) for i in files]
    k = 0
    while k < len(todo) and budget[0] > 0:
        # Many files per executor job (a folder of small files is one job per batch, not
        # two per file), each job bounded in bytes so other requests interleave on the pool.
        k = await loop.run_in_executor(session.executor, _roots_job, todo, k, budget, out)
    out.pending.extend(files[k:])
    return out


ROOTS_JOB_BYTES = 64 << 20
"""Bytes of sources one executor job of ``source_roots`` reads at most."""
ROOTS_JOB_FILES = 512
"""Files one executor job of ``source_roots`` handles at most."""


def _roots_job(todo: list[SentSource], k: int, budget: list[int], out: A.RootsAnswer) -> int:
    """Worker thread: roots of ``todo[k:]`` into ``out`` until the job's bounds or the call's
    ``budget`` (bytes) run out; returns the index of the first file not done."""
    job = ROOTS_JOB_BYTES
    stop = min(len(todo), k + ROOTS_JOB_FILES)
    while k < stop and job > 0 and budget[0] > 0:
        src = todo[k]
        try:
            for b in src.unread():
                if budget[0] <= 0 or job <= 0:
                    break
                src.read_wire(b)  # recorded (a hole unread): a later call goes on from here
                n = src.layout.stored_range(b)[1]
                budget[0] -= n
                job -= n
            if src.unread():
                break  # the rest of this file in the next job or call
            out.roots[src.index] = src.root()
        except SourceChanged as exc:
            out.errors[src.index] = exc.message
        k += 1
    return k
