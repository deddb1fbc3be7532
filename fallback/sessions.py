"""Daemon-side sessions: one per transfer, whatever path carries its blocks.

A ``Session`` owns the data-plane objects of ``transport.blocks`` (a
``BlockSink`` for uploads, a ``BlockSender`` for downloads) and the facts the
log line reports. It is deliberately not tied to HTTP: the UDP path (#4) will
attach to the same session id and feed the same sink, and a failover (#5)
only changes which path pulls from the feed.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import secrets
import time
from collections.abc import Iterable
from concurrent.futures import Executor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fallback import answers as A
from fallback.config import FlowConfig, UserConfig
from fallback.control import MAX_DIGEST_READ, Flow
from fallback.paths import confine, relpath_in
from transport.blocks.digest import digest_path, file_digest
from transport.blocks.manifest import FileEntry
from transport.blocks.modes import dir_mode
from transport.blocks.pacing import Pacer
from transport.blocks.plan import TargetState
from transport.blocks.ranges import RangeSet
from transport.blocks.receiver import FileReceiver, inspect_partial
from transport.blocks.session import BlockSender, BlockSink
from transport.blocks.source import FileSource, SourceWindow
from transport.blocks.statedir import StateDir, crosses_state_dir
from transport.blocks.tree import target_for
from transport.errors import ConflictError, PathError, ProtocolError, SourceChanged
from transport.http.pace import BURST

log = logging.getLogger("fallback.daemon")

VERIFY_BATCH = 64 << 20
"""Bytes of a partial re-read per executor job when carried-over blocks are
re-verified (``FileReceiver.verify_carried``): a long re-read never holds one of
the daemon's I/O threads for more than a fraction of a second."""

COMMIT_WAIT = 20.0
"""Seconds a commit call waits for re-verification before answering
``{"verifying": n}`` (the client calls again): well under the client's
120-second read timeout whatever the size of the partial."""

MAX_DIGEST_BLOCKS = 4096
"""Most block digests (or file roots) one ``/digests`` call may ask for; the
client batches far below this."""

MAX_DIGEST_BYTES = MAX_DIGEST_READ  # see fallback.control


MAX_OPENING = 2
"""Session opens one user may have under way at a time (``SessionTable.admit``): an
upload open inspects every target (up to 2^22 entries) on the daemon's shared I/O
pool, so one user cannot occupy it with many at once. Beyond it: 429."""

IDLE_TAKEOVER = 2.0
"""Seconds without hearing from the client on any path (a control call, a block,
a keepalive, a datagram) and without an open stream, after which a session's
write locks may be taken over by a new session for the same targets: this is
how a client killed with -9 and re-run resumes at once instead of waiting for
the old session to time out. A client in a long local phase (planning 100,000
files, a UDP-only phase) keeps its session alive with ``POST .../keepalive``
every ``KEEPALIVE_INTERVAL``."""

KEEPALIVE_INTERVAL = 0.5
"""Seconds between a client's keepalive calls while it makes no other (a quarter of
``IDLE_TAKEOVER``, so a loaded machine may delay three in a row)."""

MAX_PATHS = 16
"""Paths a session remembers (the least recently heard is forgotten beyond)."""


@dataclass(slots=True)
class SessionPath:
    """One way the client reaches a session: ``kind`` (``http``, ``https``, ``udp``),
    the client's ``address`` as that path sees it, when it was last heard from
    (``time.monotonic()``) and the bytes of blocks it carried (either direction)."""

    kind: str
    address: str
    last_heard: float
    bytes: int = 0

    def describe(self) -> str:
        """``kind/address/bytes``, as the session's log line lists it."""
        return f"{self.kind}/{self.address}/{self.bytes}"


@dataclass(slots=True)
class Session:
    id: str
    token: str
    user: str
    peer: str
    direction: str  # "upload" | "download"
    docroot: Path
    root: Path  # target root (upload) or source root (download)
    entries: list[FileEntry]
    executor: Executor
    overwrite: str = "diff"
    fsync: bool = True
    partial_suffix: str = ".fallback-partial"
    transports: list[str] = field(default_factory=list)
    created: float = field(default_factory=time.monotonic)
    last_activity: float = field(default_factory=time.monotonic)
    streams: int = 0  # open block streams and long calls (plan, commit): busy meanwhile
    paths: dict[tuple[str, str], SessionPath] = field(default_factory=dict)
    sink: BlockSink | None = None
    feed: BlockSender | None = None
    pacer: Pacer | None = None  # the session's rate cap (every stream of it waits for it)
    stream_ids: int = 0  # download streams started: each leases under its own path id
    verifier: asyncio.Task[None] | None = None
    planning: bool = False  # a plan call is running or succeeded: there is one plan per session
    digesting: bool = False  # a /digests call is running: one at a time per session
    used: bool = False  # a call was made after the open (the reaper's shorter bound otherwise)
    committed: int = 0
    skipped: int = 0
    error: str | None = None
    closed: bool = False

    def touch(self, transport: str | None = None) -> None:
        self.last_activity = time.monotonic()
        if transport and (not self.transports or self.transports[-1] != transport):
            self.transports.append(transport)

    def heard(self, kind: str, address: str, nbytes: int = 0) -> None:
        """The client was heard on path ``(kind, address)``, carrying ``nbytes`` of blocks.

        Any path keeps the session alive (``idle``): the HTTP control calls and
        streams call this, and so will the UDP path for its datagrams. O(1);
        at most ``MAX_PATHS`` paths are kept.
        """
        now = time.monotonic()
        path = self.paths.get((kind, address))
        if path is None:
            if len(self.paths) >= MAX_PATHS:
                oldest = min(self.paths, key=lambda k: self.paths[k].last_heard)
                del self.paths[oldest]
            path = self.paths[kind, address] = SessionPath(kind, address, now)
        path.last_heard = now
        path.bytes += nbytes
        self.touch(kind)

    @property
    def last_heard(self) -> float:
        """When the client was last heard on any path, or the session last did work
        (``heard`` and ``touch`` both move it)."""
        return self.last_activity

    @property
    def idle(self) -> bool:
        """No stream open, and nothing heard on any path for ``IDLE_TAKEOVER`` seconds."""
        return self.streams == 0 and time.monotonic() - self.last_heard > IDLE_TAKEOVER

    def target(self, index: int) -> Path:
        return target_for(self.root, self.entries[index].path)

    @property
    def state(self) -> StateDir:
        """Where partial files and journals are kept: the docroot's ``.fallback/``."""
        return StateDir(self.docroot, self.partial_suffix, adopt=True)

    def file_indices(self) -> list[int]:
        return [i for i, e in enumerate(self.entries) if not e.is_dir]

    @property
    def bytes_moved(self) -> int:
        if self.sink is not None:
            return self.sink.received_bytes
        return self.feed.sent_bytes if self.feed is not None else 0

    def summary(self) -> str:
        result = "ok" if self.error is None else f"error: {self.error}"
        return (
            f"session {self.id[:8]} user={self.user} peer={self.peer} direction={self.direction} "
            f"path={relpath_in(self.docroot, self.root)} files={len(self.file_indices())} "
            f"committed={self.committed} skipped={self.skipped} bytes={self.bytes_moved} "
            f"transport={','.join(self.transports) or '-'} "
            f"paths={','.join(p.describe() for p in self.paths.values()) or '-'}"
            f"{self._repairs()} result={result}"
        )


    def _repairs(self) -> str:
        """`` duplicates=N failed=N`` when pieces came twice or blocks failed their digest."""
        if self.sink is None or not (self.sink.duplicates or self.sink.failed):
            return ""
        return f" duplicates={self.sink.duplicates} failed={self.sink.failed}"


class SessionTable:
    """Live sessions, and which session holds the write lock of each target."""

    def __init__(self) -> None:
        self.sessions: dict[str, Session] = {}
        self.writers: dict[Path, Session] = {}
        self.opening: dict[str, int] = {}  # user -> opens admitted and not finished

    def new(self, **kw: object) -> Session:
        sid = secrets.token_hex(16)
        s = Session(id=sid, token=secrets.token_urlsafe(32), **kw)  # type: ignore[arg-type]
        self.sessions[sid] = s
        return s

    def get(self, sid: str, token: str | None) -> Session:
        s = self.sessions.get(sid)
        if s is None or s.closed:
            raise ProtocolError("unknown or expired session", status=404)
        if token is None or not secrets.compare_digest(s.token, token):
            raise PathError("session token refused", status=401)
        return s

    def admit(self, user: str, limit: int) -> None:
        """Reserve a session slot for ``user``, or refuse (429) when ``user`` already has
        ``limit`` sessions open or being opened (each holds memory and descriptors until
        it is closed or times out), or ``MAX_OPENING`` opens under way (an open walks or
        inspects up to 2^22 entries on the shared I/O pool). Counted at once, before any
        await, so concurrent opens cannot pass together; the caller ``release``s the
        reservation when its open ends, however it ends."""
        opening = self.opening.get(user, 0)
        if opening >= MAX_OPENING:
            raise ProtocolError(f"user {user} is already opening {opening} sessions: try again "
                                "when they are open", status=429)
        n = opening + sum(1 for s in self.sessions.values() if s.user == user and not s.closed)
        if n >= limit:
            raise ProtocolError(f"user {user} has {n} open sessions (sessions_per_user_max is "
                                f"{limit}): let some finish, or try again later", status=429)
        self.opening[user] = opening + 1

    def release(self, user: str) -> None:
        """End the reservation ``admit`` made (the session, if opened, now counts itself)."""
        left = self.opening.get(user, 0) - 1
        if left > 0:
            self.opening[user] = left
        else:
            self.opening.pop(user, None)

    async def close(self, s: Session, error: str | None = None) -> None:
        if s.closed:
            return
        s.closed = True
        if error and s.error is None:
            s.error = error
        if s.verifier is not None:
            s.verifier.cancel()
        if s.sink is not None:
            await s.sink.close()
        if s.feed is not None:
            s.feed.close()
        for path, holder in list(self.writers.items()):
            if holder is s:
                del self.writers[path]
        self.sessions.pop(s.id, None)
        log.info(s.summary())

    async def reap(self, timeout: float, unused: float | None = None) -> None:
        """Close sessions with no stream and no request for ``timeout`` seconds, or for
        ``unused`` seconds (default ``timeout``) when no call was made after the open."""
        now = time.monotonic()
        for s in list(self.sessions.values()):
            limit = timeout if s.used or unused is None else unused
            if s.streams == 0 and now - s.last_heard > limit:
                await self.close(s, "session activity timeout")

    async def close_all(self, reason: str) -> None:
        for s in list(self.sessions.values()):
            await self.close(s, reason)


# -- bandwidth ----------------------------------------------------------------------------------
def effective_flow(server: FlowConfig, asked: Flow | None) -> Flow:
    """What applies to a session: the server's ``<bandwidth><flow>`` for its direction
    wins over what the client asks. The target is the lower of the two that are set (0:
    neither); the floor the server's if set, else the client's, never above the target;
    the policy the server's unless it is the default ``fair``, else the client's."""
    asked = asked or Flow()
    server_target = server.target_rate_kbps * 1000
    targets = [t for t in (server_target, asked.target_rate) if t]
    target = min(targets) if targets else 0
    floor = server.min_rate_kbps * 1000 or asked.min_rate
    if target:
        floor = min(floor, target)
    policy = server.policy if server.policy != "fair" else asked.policy
    return Flow(target, floor, policy)


def pacer_for(flow: Flow) -> Pacer | None:
    """The token bucket of a session's HTTP streams, None when nothing caps it. HTTP paces
    at the target whatever the policy: TCP finds the fair share beneath it, and the
    delay-based ``low`` needs the RTT samples only the UDP path takes (docs/blocks.md)."""
    if not flow.target_rate:
        return None
    return Pacer(float(flow.target_rate), BURST)


# -- session-level checks -----------------------------------------------------------------------
DENY_REASON = "exists, and the server does not overwrite (file_system/overwrite=deny)"


def check_access(session: Session, user: UserConfig | None, direction: str, call: str) -> None:
    """Refuse a call that does not apply to ``session`` or that its user may no longer make.

    ``direction`` is the kind of session ``call`` is for: another kind gets a
    ``ConflictError`` (409) first. Then the user's rights are taken from the
    *current* configuration (a SIGHUP may have changed them since the session
    opened): a user who is gone, whose docroot moved, or who may no longer
    write (upload) or read (download) gets a ``PathError`` (403).
    """
    if session.direction != direction:
        raise ConflictError(f"{call} is for {direction} sessions; this is a {session.direction} session")
    if user is None:
        raise PathError(f"user {session.user} no longer exists")
    if Path(user.docroot) != session.docroot:
        raise PathError(f"user {session.user}'s docroot changed; open a new session")
    if direction == "upload" and not user.write_allowed:
        raise PathError(f"user {session.user} may not write")
    if direction == "download" and not user.read_allowed:
        raise PathError(f"user {session.user} may not read")


def file_entry(session: Session, index: int) -> FileEntry:
    """The manifest entry of file ``index``; ``ProtocolError`` when it is no file of the session."""
    if not 0 <= index < len(session.entries) or session.entries[index].is_dir:
        raise ProtocolError(f"unknown file index {index}")
    return session.entries[index]


def begin_plan(session: Session) -> None:
    """Mark ``session`` as planning; ``ConflictError`` when it was planned already (its
    receivers hold the journal locks: a second plan would only collide with them)."""
    if session.planning or session.sink is not None:
        raise ConflictError("the upload is planned already")
    session.planning = True


def refuse_existing(session: Session, actions: dict[int, str]) -> dict[int, str]:
    """The files ``overwrite=deny`` keeps (worker thread): those whose target exists.

    The caller plans them as skipped and reports ``DENY_REASON`` for each; the
    commit's non-replacing link refuses a target that appears after this check.
    """
    refused: dict[int, str] = {}
    for i, action in actions.items():
        if action == "skip":
            continue
        target = session.target(i)
        confine(session.docroot, target)
        if os.path.lexists(target):
            refused[i] = DENY_REASON
    return refused


# -- upload (the daemon receives) ---------------------------------------------------------------
def target_state(session: Session, index: int, *, want_root: bool) -> TargetState:
    """What the daemon holds for entry ``index``: runs in a worker thread (may read the target)."""
    entry = session.entries[index]
    target = session.target(index)
    confine(session.docroot, target)
    state = session.state
    if state.holds(target) or crosses_state_dir(session.docroot, target):
        raise PathError(f"{relpath_in(session.docroot, target)}: that name is reserved")
    try:
        st = os.lstat(target)
    except FileNotFoundError:
        st = None
    except NotADirectoryError:  # /file/x: a file where one of its folders would be
        raise ConflictError(f"{relpath_in(session.docroot, target)}: a file is in the way of "
                            "its folder") from None
    partial = inspect_partial(target, state=state) if not entry.is_dir else None
    exists = st is not None
    is_dir = bool(st) and os.path.isdir(target) and not os.path.islink(target)
    size = st.st_size if st else 0
    root = None
    if want_root and exists and not is_dir and not entry.is_dir and size == entry.stored_size():
        root = digest_path(target, entry.block_size) if entry.transform == "identity" else None
    return TargetState(
        exists=exists,
        is_dir=is_dir,
        size=size,
        mtime_ns=st.st_mtime_ns if st else 0,
        journal=partial.identity if partial else None,
        have=partial.have if partial else {},
        root=root,
    )


async def open_receivers(
    table: SessionTable, session: Session, actions: dict[int, str]
) -> dict[int, RangeSet]:
    """Create folders and open a receiver per file to transfer; returns missing blocks."""
    loop = asyncio.get_running_loop()
    receivers: dict[int, FileReceiver] = {}
    for i, entry in enumerate(session.entries):
        if entry.is_dir:
            path = session.target(i)
            confine(session.docroot, path)
            if path.exists() and not path.is_dir():
                raise ConflictError(f"{relpath_in(session.docroot, path)}: a file of that name exists")
            path.mkdir(parents=True, exist_ok=True)
    try:
        for i, action in actions.items():
            if action == "skip":
                session.skipped += 1
                continue
            target = session.target(i)
            confine(session.docroot, target)
            if os.path.islink(target):
                raise PathError(f"{relpath_in(session.docroot, target)}: refused, target is a symlink")
            target.parent.mkdir(parents=True, exist_ok=True)
            while (holder := table.writers.get(target)) is not None and holder is not session \
                    and not holder.closed:
                if not await _wait_idle(holder):
                    raise ConflictError(
                        f"{relpath_in(session.docroot, target)}: another transfer is writing this file"
                    )
                if not holder.closed:
                    await table.close(holder, "taken over by a newer session for the same target")
            receivers[i] = await loop.run_in_executor(
                session.executor,
                functools.partial(FileReceiver, target, session.entries[i],
                                  resume=action == "resume", fsync=session.fsync,
                                  state=session.state),
            )
            table.writers[target] = session
    except BaseException:
        for rec in receivers.values():
            rec.close()
        raise
    session.sink = BlockSink(receivers, session.executor)
    session.sink.track_acks()  # the client polls them (POST .../acks)
    if any(r.unverified for r in receivers.values()):
        session.verifier = asyncio.ensure_future(_verify_in_background(session))
    return {i: r.missing() for i, r in receivers.items()}


async def _verify_in_background(session: Session) -> None:
    """Re-read carried-over blocks while the new ones stream in, one file after another.

    Only a head start: the commit re-verifies whatever is left and reports
    errors; here a failure is logged and the rest left to the commit. Blocks
    that fail are dropped from their receiver and show up as missing at commit.
    """
    assert session.sink is not None
    for i, rec in list(session.sink.receivers.items()):
        try:
            while rec.unverified and not session.closed:
                await _verify_batch(session, i, rec)
        except OSError as exc:
            log.warning("session %s: re-verifying %s: %s", session.id[:8], _name(session, i),
                        exc.strerror or exc)


async def verify_for_commit(session: Session, index: int, deadline: float) -> int:
    """Re-verify file ``index``'s carried-over blocks until done or ``deadline``
    (``time.monotonic``); returns how many are still unverified."""
    assert session.sink is not None
    rec = session.sink.receiver(index)
    while rec.unverified and time.monotonic() < deadline:
        await _verify_batch(session, index, rec)
    return rec.unverified


async def _verify_batch(session: Session, index: int, rec: FileReceiver) -> None:
    loop = asyncio.get_running_loop()
    _report_dropped(session, index, await loop.run_in_executor(
        session.executor, rec.verify_carried, VERIFY_BATCH))


def _report_dropped(session: Session, index: int, bad: list[int]) -> None:
    if bad:
        log.warning("session %s: %s: %d blocks of the partial failed re-verification (first: "
                    "block %d); asking for them again", session.id[:8], _name(session, index),
                    len(bad), bad[0])


def _name(session: Session, index: int) -> str:
    return session.entries[index].path or session.root.name


async def _wait_idle(holder: Session) -> bool:
    """Give a lock holder up to ``IDLE_TAKEOVER`` (and a little) to show it is alive.

    A client killed with -9 and re-run at once finds its old session still
    holding the lock, idle for less than ``IDLE_TAKEOVER``: waiting for it to
    turn idle lets the re-run resume instead of failing. A holder that keeps
    streaming or calling stays busy, and the newcomer gets a conflict.
    """
    deadline = time.monotonic() + IDLE_TAKEOVER + 0.5
    while not holder.closed and not holder.idle:
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(0.05)
    return True


def commit_file(session: Session, index: int, root: str | None) -> A.CommitMissing | A.Committed:
    """Commit one received file (worker thread): ok, or what is missing.

    Blocks carried over from an earlier run are re-read first
    (``verify_for_commit`` normally did it already); any that fail are dropped
    and answered as missing, so the client's next round sends them again.
    """
    assert session.sink is not None
    rec = session.sink.receiver(index)
    _report_dropped(session, index, rec.verify_carried())
    missing = rec.missing()
    if missing:
        rec.flush()
        return A.CommitMissing(missing)
    digest = rec.commit(root, replace=session.overwrite != "never")
    session.sink.committed(index)
    session.committed += 1
    return A.Committed(digest)


def finish_dirs(session: Session) -> None:
    """Set folder modes and mtimes last, deepest first (writing files changes them)."""
    for i in reversed(range(len(session.entries))):
        e = session.entries[i]
        if e.is_dir:
            path = session.target(i)
            try:
                os.chmod(path, dir_mode(e.mode))  # no set-id/sticky bits; the umask applies
                os.utime(path, ns=(e.mtime_ns, e.mtime_ns))
            except OSError:
                pass


# -- download (the daemon sends) -----------------------------------------------------------------
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

    def __init__(self, path: Path, entry: FileEntry, **kw: Any) -> None:
        super().__init__(path, entry, **kw)
        self._digests: dict[int, bytes] = {}

    def read_block(self, index: int) -> tuple[bytes | bytearray, bytes]:
        data, digest = super().read_block(index)
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
                self.read_block(b)
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
        sources[i] = SentSource(session.target(i), session.entries[i], window=window,
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
        await loop.run_in_executor(session.executor, src.read_block, b)
        budget[0] -= src.entry.block_size
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
    roots: dict[int, str] = {}
    errors: dict[int, str] = {}
    pending: list[int] = []
    budget = [MAX_DIGEST_BYTES]
    loop = asyncio.get_running_loop()
    for i in files:
        src = _source(session, i)
        try:
            if pending or not await _read_digests(session, src, src.unread(), budget):
                pending.append(i)
                continue
            roots[i] = await loop.run_in_executor(session.executor, src.root)
        except SourceChanged as exc:
            errors[i] = exc.message
    return A.RootsAnswer(roots, errors, pending)
