"""Daemon-side sessions: one per transfer, whatever path carries its blocks.

A ``Session`` owns the data-plane objects of ``transport.blocks`` (a
``BlockSink`` for uploads, a ``BlockSender`` for downloads) and the facts the
log line reports. It is deliberately not tied to HTTP: the UDP path (#4) will
attach to the same session id and feed the same sink, and a failover (#5)
only changes which path pulls from the feed.

This module holds the sessions, their paths and liveness, and the upload side
(receivers, verification, commit); the download side (the sources a session reads,
``/digests``) is ``fallback.sources``.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import os
import secrets
import time
from concurrent.futures import Executor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fallback import answers as A
from fallback.config import FlowConfig, UserConfig
from fallback.control import Flow, PlanItem
from fallback.errors import Busy
from fallback.paths import SERVER_FULL_NOTE, confine, relpath_in, server_name
from fallback.targets import prepare_targets
from transport.blocks.inline import InlineTarget, is_inline
from transport.blocks.manifest import FileEntry
from transport.blocks.modes import dir_mode
from transport.blocks.pacing import Pacer
from transport.blocks.ranges import RangeSet
from transport.blocks.receiver import FileReceiver
from transport.blocks.session import BlockSender, BlockSink
from transport.blocks.share import share_controller
from transport.blocks.statedir import StateDir
from transport.blocks.tree import target_for
from transport.errors import ConflictError, ErrorKind, IntegrityError, PathError, ProtocolError
from transport.http.governor import StreamGovernor
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
MAX_TRANSPORTS = 64
"""Entries kept in a session's ``transports`` (each switch of path kind appends one)."""


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
    governor: StreamGovernor | None = None  # fair/low: which download streams send, how fast
    udp: Any = None  # its UDP path (fallback.udpserver.SessionUdp), when it asked for one
    # What its UDP paths sent, summed over the paths it had (``SessionUdp.retire``):
    # the sender's figures the close answer gives a downloading client.
    udp_figures: dict[str, float] = field(default_factory=dict)
    stream_ids: int = 0  # download streams started: each leases under its own path id
    verifier: asyncio.Task[None] | None = None
    planning: bool = False  # a plan call is running or succeeded: there is one plan per session
    digesting: bool = False  # a /digests call is running: one at a time per session
    used: bool = False  # a call was made after the open (the reaper's shorter bound otherwise)
    committed: int = 0
    counted: set[int] = field(default_factory=set)  # one-block files counted in ``committed``
    skipped: int = 0
    error: str | None = None
    closed: bool = False

    def touch(self, transport: str | None = None) -> None:
        self.last_activity = time.monotonic()
        if transport and (not self.transports or self.transports[-1] != transport) \
                and len(self.transports) < MAX_TRANSPORTS:  # bounded: a flapping client
            if self.transports:  # the client moved to another path kind (issue 13)
                log.info("session %s: the client switched %s -> %s", self.id,
                         self.transports[-1], transport)
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
        # transports: the first kind heard (the control channel), then each change of the
        # kind carrying blocks, or of the control channel's scheme (a re-routed client);
        # a control call over HTTPS while UDP carries the blocks is no switch
        record = nbytes or not self.transports or "udp" not in (kind, self.transports[-1])
        self.touch(kind if record else None)

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
            raise ProtocolError("unknown or expired session", kind=ErrorKind.NOT_FOUND)
        if token is None or not secrets.compare_digest(s.token, token):
            raise PathError("session token refused", kind=ErrorKind.UNAUTHORIZED)
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
            raise Busy(f"user {user} is already opening {opening} sessions: try again "
                       "when they are open")
        n = opening + sum(1 for s in self.sessions.values() if s.user == user and not s.closed)
        if n >= limit:
            raise Busy(f"user {user} has {n} open sessions (sessions_per_user_max is "
                       f"{limit}): let some finish, or try again later")
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
        if s.udp is not None:
            s.udp.close()
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
    """The token bucket of a session's HTTP streams, None when nothing caps it: the
    target rate whatever the policy; ``fair`` and ``low`` also adapt beneath it
    (``governor_for``, docs/blocks.md "Pacing")."""
    if not flow.target_rate:
        return None
    return Pacer(float(flow.target_rate), BURST)


def governor_for(flow: Flow, streams_max: int) -> StreamGovernor | None:
    """The share controller of a session's download streams (``transport.blocks.share``):
    ``fair`` adapts the number of streams sending, ``low`` also their pacing; ``fixed``
    and ``high`` have none. Its sampler task starts with the first stream that joins."""
    ctl = share_controller(flow.policy, max(1, streams_max),
                           target_rate_bps=float(flow.target_rate) or math.inf,
                           min_rate_bps=float(flow.min_rate))
    return None if ctl is None else StreamGovernor(ctl)


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
async def open_receivers(
    table: SessionTable, session: Session, actions: dict[int, str],
    kept: dict[int, PlanItem] | None = None,
) -> dict[int, RangeSet]:
    """Create folders and open a receiver per file to transfer; returns missing blocks.
    ``kept``: resumes whose partial is rebased (``FileReceiver(rebase=True)``) or loses
    the blocks in ``drop`` (their source changed: sent again)."""
    loop = asyncio.get_running_loop()
    receivers: dict[int, FileReceiver] = {}
    inline: dict[int, InlineTarget] = {}
    targets = await loop.run_in_executor(session.executor, prepare_targets, session, actions)
    try:
        for i, action in actions.items():
            if action == "skip":
                session.skipped += 1
                continue
            target = targets[i]
            while (holder := table.writers.get(target)) is not None and holder is not session \
                    and not holder.closed:
                if not await _wait_idle(holder):
                    raise ConflictError(
                        f"{relpath_in(session.docroot, target)}: another transfer is writing this file"
                    )
                if not holder.closed:
                    await table.close(holder, "taken over by a newer session for the same target")
            if is_inline(session.entries[i]):
                # One block: it arrives whole in a bundle and is published with its group
                # (transport.blocks.inline): no receiver, journal or executor job per file.
                inline[i] = InlineTarget(target, session.entries[i])
                table.writers[target] = session
                continue
            item = (kept or {}).get(i)
            receivers[i] = await loop.run_in_executor(
                session.executor,
                functools.partial(_receiver, target, session.entries[i],
                                  resume=action == "resume", fsync=session.fsync,
                                  state=session.state, item=item),
            )
            table.writers[target] = session
    except BaseException:
        for rec in receivers.values():
            rec.close()
        raise
    docroot = session.docroot
    session.sink = BlockSink(receivers, session.executor, inline=inline, state=session.state,
                             fsync=session.fsync, replace=session.overwrite != "never",
                             serial_groups=True, full_note=SERVER_FULL_NOTE,
                             name_of=lambda target, _rel: server_name(docroot, target))
    session.sink.track_acks()  # the client polls them (POST .../acks)
    if any(r.unverified for r in receivers.values()):
        session.verifier = asyncio.ensure_future(_verify_in_background(session))
    missing = {i: r.missing() for i, r in receivers.items()}
    missing.update((i, RangeSet([(0, 1)])) for i in inline)
    return missing


def _receiver(target: Path, entry: FileEntry, *, resume: bool, fsync: bool, state: StateDir,
              item: PlanItem | None) -> FileReceiver:
    """Worker thread: open ``target``'s receiver; a resume ``item`` rebases the partial
    and drops the kept blocks it names (only blocks held: a range names no more work
    than the partial's journal holds, whatever its size)."""
    rec = FileReceiver(target, entry, resume=resume, fsync=fsync, state=state,
                       rebase=item is not None and item.rebase)
    if item is not None and item.drop:
        try:
            drop = RangeSet()
            drop.update(item.drop)
            rec.drop_blocks([b for b in rec.have() if b in drop])
        except BaseException:
            rec.close()
            raise
    return rec


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


def inline_result(session: Session, index: int, root: str | None
                  ) -> A.Committed | A.CommitMissing | A.CommitVerifying | None:
    """The commit answer for a one-block file (published with its bundle's group, or not
    received yet); None for a file with a receiver. Raises the ``TransportError`` of a file
    that could not be published, and ``IntegrityError`` for a ``root`` other than the one
    published. O(1), no I/O."""
    sink = session.sink
    assert sink is not None
    done = sink.inline_done.get(index)
    if done is not None:
        if root is not None and root != done.root:
            raise IntegrityError(f"{_name(session, index)}: whole-file digest mismatch (got "
                                 f"{done.root}, sender has {root})")
        if index not in session.counted:
            session.counted.add(index)
            session.committed += 1
        return A.Committed(done.root)
    err = sink.inline_errors.get(index)
    if err is not None:
        raise err
    if index in sink.inline:
        return A.CommitMissing(RangeSet([(0, 1)]))
    if sink.publishing(index):  # its group is committing now: ask again (it answered
        return A.CommitVerifying(1)  # "unknown file index 0" and the upload failed)
    return None


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
