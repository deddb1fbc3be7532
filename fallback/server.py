"""The daemon's HTTP(S) application: session control, block streams, plain files.

Routes (the control API lives under one reserved prefix, ``/.fallback/v1``;
everything else is the user's docroot as plain HTTP):

* ``POST   /.fallback/v1/session``               open (Basic auth) -> id, token, states or manifest
* ``POST   /.fallback/v1/session/{id}/plan``     upload: skip/fresh/resume per file -> missing blocks
* ``PUT    /.fallback/v1/session/{id}/blocks``   upload stream (chunked body of frames)
* ``POST   /.fallback/v1/session/{id}/commit``   upload: verify and publish files
* ``POST   /.fallback/v1/session/{id}/digests``  download: source digests (resume check, final check)
* ``POST   /.fallback/v1/session/{id}/want``     download: queue blocks
* ``GET    /.fallback/v1/session/{id}/blocks``   download stream (``?frames=2``: pieces, v2)
* ``POST   /.fallback/v1/session/{id}/keepalive`` the client is alive (a long local phase)
* ``POST   /.fallback/v1/session/{id}/acks``     journaled blocks: the client's (download),
  the daemon's (upload)
* ``DELETE /.fallback/v1/session/{id}``          close (logs the session line)
* ``GET|HEAD /path`` (with ``Range``), ``PUT /path``: plain clients (curl, aria2c) with Basic auth.

The name ``.fallback`` at the top of a docroot is the daemon's own: it holds the
partial files and journals (``transport.blocks.statedir``). It is never listed,
served, walked or written through any route (403 "that name is reserved").
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import os
import stat
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from aiohttp import web

from fallback import answers as A
from fallback import control, plainhttp
from fallback import sessions as S
from fallback.auth import PasswordChecker, parse_basic
from fallback.config import Config, UserConfig
from fallback.paths import confine, relpath_in, resolve, split_urlpath, urlpath_of
from fallback.ratelog import RateLimitedLog
from fallback.throttle import LoginRefused, LoginThrottle, check_login
from transport.blocks.envelope import SUFFIX as ENVELOPE_SUFFIX
from transport.blocks.manifest import MAX_ENTRIES, FileEntry, check_relpath
from transport.blocks.modes import file_mode
from transport.blocks.plan import TargetState
from transport.blocks.receiver import FileReceiver
from transport.blocks.statedir import STATE_DIR, StateDir, crosses_state_dir, is_state_dir
from transport.blocks.tree import describe_envelopes, walk_source
from transport.errors import (
    RESOURCE_ERRNOS,
    ConflictError,
    PathError,
    ProtocolError,
    ResourceExhausted,
    TransportError,
    from_os_error,
)
from transport.http.framing import CONTENT_TYPE
from transport.http.server import receive_blocks, send_blocks

log = logging.getLogger("fallback.daemon")
resource_log = RateLimitedLog(log)
PREFIX = "/.fallback/v1"
MAX_CONTROL_BODY = 64 << 20
FEATURES = ("keepalive", "frames2", "acks")
"""What this daemon offers beyond API 1, listed in ``/info`` (docs/protocol.md): a
client uses a newer call only with a daemon that lists it."""
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass(slots=True)
class DaemonState:
    config: Config
    executor: ThreadPoolExecutor = field(default_factory=lambda: ThreadPoolExecutor(4, "fb-io"))
    table: S.SessionTable = field(default_factory=S.SessionTable)
    checker: PasswordChecker = field(default_factory=PasswordChecker)  # own pool, not executor
    throttle: LoginThrottle = field(default_factory=LoginThrottle)
    stopping: asyncio.Event = field(default_factory=asyncio.Event)


STATE = web.AppKey("state", DaemonState)


def error_response(status: int, message: str) -> web.Response:
    headers = {"WWW-Authenticate": 'Basic realm="fallback"'} if status == 401 else None
    return web.json_response({"error": message}, status=status, headers=headers)


@web.middleware
async def errors_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Translate errors into JSON with their status hint, and one log line each."""
    try:
        return await handler(request)
    except web.HTTPException:
        raise
    except ResourceExhausted as exc:
        return _exhausted(request, exc)
    except TransportError as exc:
        log.warning("%s %s %s: %s", request.remote, request.method, request.path, exc.message)
        return error_response(exc.status, exc.message)
    except ConnectionResetError:
        # The client went away mid-request (a cut-off PUT, a killed client): say so once.
        log.warning("%s %s %s: client disconnected", request.remote, request.method, request.path)
        raise
    except asyncio.CancelledError:
        raise
    except OSError as exc:
        if exc.errno in RESOURCE_ERRNOS:
            return _exhausted(request, from_os_error(exc, request.path))
        log.warning("%s %s %s: %s", request.remote, request.method, request.path, exc)
        return error_response(500, f"server I/O error: {exc.strerror or exc}")
    except Exception as exc:  # noqa: BLE001 - the daemon must outlive any one request
        log.error("%s %s %s: internal error %s: %s", request.remote, request.method, request.path,
                  type(exc).__name__, exc)
        return error_response(500, f"internal error: {type(exc).__name__}")


def _exhausted(request: web.Request, exc: TransportError) -> web.Response:
    """503 for a request the system had no resources for; one log line per kind per minute
    (a descriptor shortage fails every request at once: a line each would flood the log)."""
    kind = getattr(exc, "kind", "resource")
    resource_log.warning(kind, "%s %s %s: server %s (%s)", request.remote, request.method,
                         request.path, exc.message, kind)
    return error_response(503, f"server {exc.message}")


def _state(request: web.Request) -> DaemonState:
    return request.app[STATE]


def _scheme(request: web.Request) -> str:
    return "https" if request.transport and request.transport.get_extra_info("sslcontext") else "http"


async def authenticate(request: web.Request) -> UserConfig:
    """Check HTTP Basic credentials: 401 if wrong, 429 while throttled or when the address
    has checks pending, 503 if checks back up (fallback.throttle.check_login).

    Throttled attempts are refused before any password hash runs (fallback.throttle);
    an unknown user costs the same hash as a known one (PasswordChecker's dummy).
    """
    st = _state(request)
    creds = parse_basic(request.headers.get("Authorization", ""))
    if creds is None:
        raise PathError("authentication required", status=401)
    name, password = creds
    user = st.config.user(name)
    try:
        ok = await check_login(st.checker, st.throttle, request.remote, name, password,
                               user.password_hash if user else None)
    except LoginRefused as exc:
        cls = web.HTTPTooManyRequests if exc.status == 429 else web.HTTPServiceUnavailable
        raise _refusal(cls, str(exc), exc.retry_after) from None
    if not ok or user is None:
        raise PathError("wrong user name or password", status=401)
    return user


def _refusal(cls: type[web.HTTPException], message: str, retry_after: int) -> web.HTTPException:
    # An HTTPException passes errors_middleware unlogged: throttle.py logs once per period.
    return cls(text=json.dumps({"error": message}), content_type="application/json",
               headers={"Retry-After": str(retry_after)})


M = TypeVar("M")


async def _json(request: web.Request, parse: Callable[[dict[str, Any]], M]) -> M:
    """The body as a typed message: ``parse`` (a ``control`` ``from_json``) applied to its
    JSON object (``{}`` when empty). Raises ``ProtocolError`` (400, 413 when too large).

    A large body (a manifest of many files) is parsed in a worker thread: decoding it
    holds the GIL, but checking its entries is Python code that lets the event loop run
    between slices, so other clients are served meanwhile.
    """
    if request.content_length is not None and request.content_length > MAX_CONTROL_BODY:
        raise ProtocolError("control request too large", status=413)
    try:
        # request.read() reads to the end of the body (and enforces client_max_size);
        # content.read(n) would return only what happened to be buffered already.
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise ProtocolError("control request too large", status=413) from None
    if len(raw) > _INLINE_BODY:
        return await _run(request, lambda: parse(control.loads(raw)))  # type: ignore[no-any-return]
    return parse(control.loads(raw))


STATE_BATCH = 512
"""Entries whose target state one executor job inspects when an upload opens: one job
per entry made a 300,000-entry open cost over a minute of pool hand-offs."""

_INLINE_BODY = 64 << 10
"""Bodies up to this size are parsed on the event loop (about a millisecond at most)."""


def _session(request: web.Request, direction: str | None, call: str) -> S.Session:
    """The session named in the URL, if the Bearer token is its own (401 otherwise),
    the call applies to its direction (409 otherwise) and its user may still make it
    under the current configuration (403 otherwise). ``direction=None`` (close)
    checks the token only: ending a session is always allowed."""
    auth = request.headers.get("Authorization", "")
    token = auth[7:] if auth.startswith("Bearer ") else None
    st = _state(request)
    s = st.table.get(request.match_info["sid"], token)
    if direction is not None:
        S.check_access(s, st.config.user(s.user), direction, call)
    s.heard(_scheme(request), _peer(request))
    s.used = True
    return s


def _peer(request: web.Request) -> str:
    """The client's address as an HTTP path of a session sees it."""
    return str(request.remote or "-")


def _heard(request: web.Request, session: S.Session) -> Callable[[int], None]:
    """Counts each block a stream carries on the session's HTTP path (and keeps it alive)."""
    kind, peer = _scheme(request), _peer(request)
    return lambda n: session.heard(kind, peer, n)


def _run(request: web.Request, fn: Callable[..., Any], *args: Any) -> Awaitable[Any]:
    return asyncio.get_running_loop().run_in_executor(_state(request).executor, fn, *args)


def _docroot_state(request: web.Request, docroot: Path) -> StateDir:
    return StateDir(docroot, _state(request).config.partial_file_suffix, adopt=True)


def _refuse_reserved(request: web.Request, docroot: Path, path: Path) -> None:
    """403 for the docroot's state folder and anything in it (by name or through a symlink),
    and for any path through a marked state folder below the docroot (a nested user's)."""
    if _docroot_state(request, docroot).holds(path) or crosses_state_dir(docroot, path):
        raise PathError("that name is reserved", status=403)


# -- session control -------------------------------------------------------------------------------
async def open_session(request: web.Request) -> web.Response:
    st = _state(request)
    if st.stopping.is_set():
        raise ProtocolError("daemon is shutting down", status=503)
    user = await authenticate(request)
    st.table.admit(user.name, st.config.sessions_per_user_max)  # reserves the slot at once
    try:
        msg = await _json(request, control.parse_open)
        Path(user.docroot).mkdir(parents=True, exist_ok=True)  # before paths are confined to it
        if isinstance(msg, control.OpenUpload):
            return await _open_upload(request, st, user, msg)
        return await _open_download(request, st, user, msg)
    finally:
        st.table.release(user.name)


def _common(request: web.Request, st: DaemonState, user: UserConfig, overwrite: str) -> dict[str, Any]:
    return dict(user=user.name, peer=str(request.remote), docroot=Path(user.docroot),
                executor=st.executor, overwrite=overwrite, fsync=st.config.fsync,
                partial_suffix=st.config.partial_file_suffix)


async def _open_upload(request: web.Request, st: DaemonState, user: UserConfig,
                       msg: control.OpenUpload) -> web.Response:
    if not user.write_allowed:
        raise PathError(f"user {user.name} may not write")
    entries = list(msg.entries)
    if st.config.content_protection_required:
        plain = [e.path or "(root)" for e in entries if not e.is_dir and e.transform == "identity"]
        if plain:
            raise PathError("Server requires content protection", status=403)
    if st.config.content_protection_strong_pass_required and not msg.strong_pass:
        if any(e.transform != "identity" for e in entries):
            raise PathError("Server requires a strong passphrase for content protection "
                            "(at least 12 characters, 3 of: lower case, upper case, digits, symbols)",
                            status=403)
    name = msg.name
    if name:
        check_relpath(name)
        if "/" in name:
            raise ProtocolError("name must be a single path component")
    dest = resolve(Path(user.docroot), msg.path)
    into = msg.into_dir or dest.is_dir() and not (entries[0].is_dir and not name)
    root = dest / name if into and name else dest
    if entries[0].transform != "identity" and not root.name.endswith(ENVELOPE_SUFFIX):
        root = root.with_name(root.name + ENVELOPE_SUFFIX)  # an envelope is always named so
    confine(Path(user.docroot), root)
    _refuse_reserved(request, Path(user.docroot), root)
    if root == Path(user.docroot) and any(e.path.split("/")[0] == STATE_DIR for e in entries):
        raise PathError("that name is reserved", status=403)  # (symlinks: in target_state)
    if root == Path(user.docroot) and not entries[0].is_dir:
        raise PathError("cannot write a file over the docroot", status=400)
    # The server's overwrite=deny wins over the client's policy: commits never replace
    # (a link that fails on an existing name), and plan refuses existing targets.
    overwrite = "never" if st.config.overwrite == "deny" else msg.overwrite
    session = st.table.new(direction="upload", root=root, entries=entries,
                           **_common(request, st, user, overwrite))
    session.heard(_scheme(request), _peer(request))
    flow = S.effective_flow(st.config.flow_in, msg.flow)
    session.pacer = S.pacer_for(flow)
    want_root = msg.overwrite == "diff"

    def batch(k: int) -> list[TargetState]:  # one executor job per STATE_BATCH entries
        return [S.target_state(session, i, want_root=want_root)
                for i in range(k, min(k + STATE_BATCH, len(entries)))]

    states: list[TargetState] = []
    try:
        for k in range(0, len(entries), STATE_BATCH):
            states += await _run(request, batch, k)
    except BaseException as exc:  # a refused target: do not leave the session open
        await st.table.close(session, getattr(exc, "message", None) or type(exc).__name__)
        raise
    log.info("session %s opened: user=%s peer=%s upload to %s (%d entries)", session.id[:8],
             user.name, request.remote, relpath_in(Path(user.docroot), root), len(entries))
    return web.json_response(A.UploadOpened(
        session.id, session.token, states, relpath_in(Path(user.docroot), root),
        st.config.streams_max, _policy(st.config), flow).to_json())


def _policy(c: Config) -> dict[str, Any]:
    """Server rules the client must apply itself (it alone sees the passphrase), and the
    overwrite rule the daemon applies whatever the client asks (``allow`` | ``deny``)."""
    return {"content_protection_required": c.content_protection_required,
            "content_protection_strong_pass_required": c.content_protection_strong_pass_required,
            "overwrite": c.overwrite}


async def _open_download(request: web.Request, st: DaemonState, user: UserConfig,
                         msg: control.OpenDownload) -> web.Response:
    if not user.read_allowed:
        raise PathError(f"user {user.name} may not read")
    docroot = Path(user.docroot)
    src = resolve(docroot, msg.path)
    _refuse_reserved(request, docroot, src)
    tree = await _run(request, lambda: walk_source(src, st.config.block_size, within=docroot))
    if len(tree.entries) > MAX_ENTRIES:
        raise PathError(f"{relpath_in(docroot, src)}: {len(tree.entries)} files and folders, "
                        f"more than one session carries ({MAX_ENTRIES})", status=413)
    await _run(request, describe_envelopes, tree)
    session = st.table.new(direction="download", root=src, entries=tree.entries,
                           **_common(request, st, user, "diff"))
    session.heard(_scheme(request), _peer(request))
    flow = S.effective_flow(st.config.flow_out, msg.flow)
    session.pacer = S.pacer_for(flow)
    try:
        await _run(request, S.open_sources, session)
    except BaseException as exc:  # a file changed since the walk: do not leave the session open
        await st.table.close(session, getattr(exc, "message", None) or type(exc).__name__)
        raise
    log.info("session %s opened: user=%s peer=%s download of %s (%d entries)", session.id[:8],
             user.name, request.remote, relpath_in(docroot, src), len(tree.entries))
    return web.json_response(A.DownloadOpened(
        src.name, list(tree.entries), list(tree.skipped), st.config.streams_max,
        session.id, session.token, flow).to_json())


async def plan(request: web.Request) -> web.Response:
    """Open receivers for the files to send; answers ``{missing: {file: [[start, stop], ...]},
    refused: {file: reason}}``. With ``file_system/overwrite=deny`` a file whose target
    exists is refused (planned as skipped) whatever the client's overwrite policy."""
    session = _session(request, "upload", "plan")
    msg = await _json(request, control.PlanRequest.from_json)
    st = _state(request)
    actions: dict[int, str] = {}
    final: dict[int, FileEntry] = {}
    for item in msg.files:  # all checked before the session changes
        opened = S.file_entry(session, item.file)
        if item.entry is not None:
            final[item.file] = _final_entry(opened, item.entry)
        actions[item.file] = item.action
    S.begin_plan(session)
    session.streams += 1  # busy: opening 100,000 receivers must not look idle to a takeover
    try:
        for i, entry in final.items():
            session.entries[i] = entry
        refused: dict[int, str] = {}
        if st.config.overwrite == "deny":
            session.overwrite = "never"  # a SIGHUP may have set deny since the open
            refused = await _run(request, S.refuse_existing, session, actions)
            for i in refused:
                actions[i] = "skip"
        missing = await S.open_receivers(st.table, session, actions)
    except BaseException:
        session.planning = False  # nothing was opened: the client may plan again
        raise
    finally:
        session.streams -= 1
        session.touch()
    return web.json_response(A.PlanAnswer(missing, refused).to_json())


def _final_entry(opened: FileEntry, final: FileEntry) -> FileEntry:
    """The entry as planned may only add what the sender could not know at open: the header."""
    if (final.path, final.kind, final.size, final.mtime_ns, final.block_size, final.transform) != (
        opened.path, opened.kind, opened.size, opened.mtime_ns, opened.block_size, opened.transform
    ):
        raise ProtocolError(f"{opened.path or '(root)'}: entry changed between open and plan")
    return final


async def upload_blocks(request: web.Request) -> web.Response:
    session = _session(request, "upload", "PUT blocks")
    if session.sink is None:
        raise ProtocolError("plan the upload before sending blocks", status=409)
    _admit_stream(request, session)
    session.streams += 1
    try:
        n = await _unless_stopping(request, receive_blocks(request.content, session.sink,
                                                           on_block=_heard(request, session),
                                                           pacer=session.pacer))
    finally:
        session.streams -= 1
        session.touch()
    return web.json_response({"received": n})


async def _unless_stopping(request: web.Request, receiving: Awaitable[int]) -> int:
    """Receive until the body ends or the daemon stops. On SIGTERM aiohttp stops reading
    request bodies, so an upload stream would only stall until the shutdown timeout:
    end it now instead; the blocks already written are checkpointed by the close."""
    recv = asyncio.ensure_future(receiving)
    stop = asyncio.ensure_future(_state(request).stopping.wait())
    try:
        await asyncio.wait({recv, stop}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stop.cancel()
        if not recv.done():
            recv.cancel()
            await asyncio.gather(recv, return_exceptions=True)
    if recv.cancelled():
        raise ProtocolError("daemon is shutting down", status=503)
    return recv.result()


async def commit(request: web.Request) -> web.Response:
    session = _session(request, "upload", "commit")
    msg = await _json(request, control.CommitRequest.from_json)
    if session.sink is None:
        raise ProtocolError("nothing to commit", status=409)
    for item in msg.files:
        S.file_entry(session, item.file)
    if _state(request).config.overwrite == "deny":
        session.overwrite = "never"  # the commit links instead of replacing
    session.streams += 1  # busy: a slow commit (fsync) must not look idle to a takeover
    try:
        return await _commit(request, session, msg)
    finally:
        session.streams -= 1
        session.touch()


async def _commit(request: web.Request, session: S.Session, msg: control.CommitRequest) -> web.Response:
    """Per file: ``{ok, root}``, ``{missing}`` (send these again), ``{verifying: n}`` (carried-over
    blocks still being re-read: call again) or ``{error, status}``."""
    assert session.sink is not None
    await session.sink.flush()
    deadline = time.monotonic() + S.COMMIT_WAIT
    results: dict[int, A.CommitResult] = {}
    for item in msg.files:
        i = item.file
        try:
            left = await S.verify_for_commit(session, i, deadline)
            if left:
                results[i] = A.CommitVerifying(left)
                continue
            results[i] = await _run(request, S.commit_file, session, i, item.root)
        except TransportError as exc:
            results[i] = A.CommitFailed(exc.message, exc.status)
        except OSError as exc:  # e.g. the partial cannot be read back
            name = session.entries[i].path or session.root.name
            results[i] = A.CommitFailed(f"{name}: {exc.strerror or exc}", 500)
    if not session.sink.receivers:
        await _run(request, S.finish_dirs, session)
    return web.json_response(A.CommitAnswer(results).to_json())


async def digests(request: web.Request) -> web.Response:
    """``{file, blocks, root}``: digests of source blocks (and the file's root); or
    ``{roots: [file, ...]}``: whole-file digests over current bytes, for the client's
    check before it publishes downloaded files."""
    session = _session(request, "download", "digests")
    if session.feed is None:
        raise ProtocolError("not a download session", status=409)
    msg = await _json(request, control.parse_digests)
    if session.digesting:
        raise ProtocolError("a digests call is already running in this session", status=429)
    session.digesting = True
    session.streams += 1  # busy while it reads: not idle to a takeover
    try:
        if isinstance(msg, control.RootsRequest):
            return web.json_response((await S.source_roots(session, list(msg.files))).to_json())
        count = S.file_entry(session, msg.file).layout().count
        if msg.blocks and msg.blocks[-1] >= count:
            raise ProtocolError(f"digests: block {msg.blocks[-1]} out of range for file {msg.file} "
                                f"({count} blocks)")
        out = await S.source_digests(session, msg.file, list(msg.blocks), msg.root)
        return web.json_response(out.to_json())
    finally:
        session.digesting = False
        session.streams -= 1
        session.touch()


async def want(request: web.Request) -> web.Response:
    """Queue block ranges; each is checked against its file's block count before any is
    queued, and the queue holds ranges, so ``[0, 10**10)`` costs what ``[0, 1)`` does."""
    session = _session(request, "download", "want")
    if session.feed is None:
        raise ProtocolError("not a download session", status=409)
    msg = await _json(request, control.WantRequest.from_json)
    return web.json_response(A.WantAnswer(session.feed.add_ranges(msg.ranges)).to_json())


def _admit_stream(request: web.Request, session: S.Session) -> None:
    """Enforce ``streams_max``: a stream beyond it is refused (429); the others go on."""
    limit = _state(request).config.streams_max
    if session.streams >= limit:
        raise ProtocolError(f"too many parallel streams for this session: {session.streams} "
                            f"open, streams_max is {limit}", status=429)


async def download_blocks(request: web.Request) -> web.StreamResponse:
    """Stream blocks until the feed is empty.

    The response starts with its first block, so a source that fails on that read is
    this request's error (409 changed, 503 out of descriptors). A source failing later
    fails the feed: the stream ends cleanly after its last whole frame, every later
    request of the session gets the error, and the session is logged as failed.
    """
    session = _session(request, "download", "GET blocks")
    feed = session.feed
    if feed is None:
        raise ProtocolError("not a download session", status=409)
    if feed.error is not None:
        raise feed.error
    _admit_stream(request, session)
    resp = web.StreamResponse(headers={"Content-Type": CONTENT_TYPE})
    resp.enable_chunked_encoding()

    async def write(data: bytes | bytearray | memoryview) -> None:
        if not resp.prepared:
            await resp.prepare(request)
        await resp.write(data)

    session.streams += 1
    session.stream_ids += 1
    path = f"{_scheme(request)}-{session.stream_ids}"
    try:
        try:
            await send_blocks(write, feed, path, stop=_state(request).stopping,
                              on_block=_heard(request, session),
                              version=2 if request.query.get("frames") == "2" else 1,
                              acks=request.query.get("acks") == "1", pacer=session.pacer)
        except TransportError as exc:
            session.error = session.error or exc.message
            if not resp.prepared:
                raise  # answered as this request's error (and logged) by the middleware
            if isinstance(exc, ResourceExhausted):
                resource_log.warning(exc.kind, "session %s: server %s (%s)", session.id[:8],
                                     exc.message, exc.kind)
            else:
                log.warning("session %s: %s", session.id[:8], exc.message)
        if not resp.prepared:
            await resp.prepare(request)
        await resp.write_eof()
    finally:
        session.streams -= 1
        session.touch()
    return resp


async def acks(request: web.Request) -> web.Response:
    """Acknowledgements, either direction (``control.Acks``): on a download the client
    reports the blocks it journaled (retired) and discarded (sent again) and gets ``{}``
    back; on an upload the client polls and the answer lists the blocks the daemon
    journaled and discarded since the last poll."""
    session = _session(request, None, "acks")
    msg = await _json(request, control.Acks.from_json)
    if session.direction == "download":
        if session.feed is None:
            raise ProtocolError("not a download session", status=409)
        session.feed.acks(msg.journaled, msg.failed)
        return web.json_response(control.Acks().to_json())
    if session.sink is None:
        return web.json_response(control.Acks().to_json())  # not planned yet: nothing
    journaled, rejected = session.sink.take_acks()
    return web.json_response(control.Acks.from_pairs(journaled, rejected).to_json())


async def keepalive(request: web.Request) -> web.Response:
    """``{}`` -> ``{idle_takeover, interval}``: the client is alive (a long local phase, a
    UDP-only phase); hearing it is all this call does. Either direction."""
    _session(request, None, "keepalive")
    await _json(request, control.KeepaliveRequest.from_json)
    return web.json_response(A.KeepaliveAnswer(S.IDLE_TAKEOVER, S.KEEPALIVE_INTERVAL).to_json())


async def close_session(request: web.Request) -> web.Response:
    session = _session(request, None, "close")
    msg = await _json(request, control.CloseRequest.from_json)
    await _state(request).table.close(session, msg.error)
    return web.json_response({"closed": True})




# -- plain HTTP: GET/HEAD with Range, PUT ----------------------------------------------------------
async def plain_get(request: web.Request) -> web.StreamResponse:
    user = await authenticate(request)
    if not user.read_allowed:
        raise PathError(f"user {user.name} may not read")
    docroot = Path(user.docroot)
    path = resolve(docroot, urlpath_of(request.rel_url.raw_path))
    _refuse_reserved(request, docroot, path)
    try:
        st = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):  # /file.txt/x: a file where a folder would be
        raise PathError(f"{relpath_in(docroot, path)}: no such file", status=404) from None
    if stat.S_ISDIR(st.st_mode):
        names = [n for n in sorted(os.listdir(path)) if not _hidden(request, docroot, path, n)]
        return web.json_response({"folder": relpath_in(docroot, path), "entries": names})
    return await plainhttp.serve_file(request, str(path), label=relpath_in(docroot, path),
                                      executor=_state(request).executor)


def _hidden(request: web.Request, docroot: Path, folder: Path, name: str) -> bool:
    """A listing leaves out the docroot's state folder, and any state folder of ours (the
    rule of ``walk_source``, so a listing shows what a download of the folder brings)."""
    if name != STATE_DIR:
        return False
    return is_state_dir(folder / name) or _docroot_state(request, docroot).holds(folder / name)


async def plain_put(request: web.Request) -> web.Response:
    """A whole-file upload (``curl -T``): streamed into a partial file, renamed when complete."""
    user = await authenticate(request)
    if not user.write_allowed:
        raise PathError(f"user {user.name} may not write")
    docroot = Path(user.docroot)
    parts = split_urlpath(urlpath_of(request.rel_url.raw_path))
    if not parts:
        raise PathError("PUT needs a file name", status=400)
    target = resolve(docroot, urlpath_of(request.rel_url.raw_path))
    if parts[0] == STATE_DIR:
        raise PathError("that name is reserved", status=403)
    _refuse_reserved(request, docroot, target)  # e.g. through a symlink to it
    if target.is_dir():
        raise ConflictError(f"{relpath_in(docroot, target)}: is a folder")
    existed = target.exists()
    if existed and _state(request).config.overwrite == "deny":
        raise ConflictError(f"{relpath_in(docroot, target)}: exists and the server does not overwrite")
    await plainhttp.check_put(request, str(target), label=relpath_in(docroot, target),
                              executor=_state(request).executor)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise ConflictError(f"{relpath_in(docroot, target)}: a file is in the way of its folder") from None
    await _receive_plain(request, target, _docroot_state(request, docroot))
    return web.json_response({"path": relpath_in(docroot, target)}, status=204 if existed else 201)


async def _receive_plain(request: web.Request, target: Path, state: StateDir) -> None:
    st = _state(request)
    size = request.content_length
    entry = FileEntry("", "file", size=size if size is not None else 0,
                      mtime_ns=time.time_ns(), mode=0o644, block_size=st.config.block_size)
    loop = asyncio.get_running_loop()
    # An unknown length (chunked PUT) is written sequentially; the receiver is
    # still used so the file appears atomically and a lock guards the target.
    rec = await loop.run_in_executor(st.executor, lambda: FileReceiver(
        target, entry, resume=False, fsync=st.config.fsync, state=state))
    try:
        fd = os.open(rec.partial, os.O_WRONLY | os.O_CLOEXEC)
        written = 0
        try:
            async for chunk in request.content.iter_any():
                await loop.run_in_executor(st.executor, os.pwrite, fd, chunk, written)
                written += len(chunk)
            await loop.run_in_executor(st.executor, os.fsync, fd) if st.config.fsync else None
        finally:
            os.close(fd)
        if size is not None and written != size:
            raise ProtocolError(f"body ended after {written} of {size} bytes")
        os.utime(rec.partial)
        os.chmod(rec.partial, file_mode(0o644))  # the daemon's umask applies
        await loop.run_in_executor(st.executor, functools.partial(
            state.publish, rec.partial, target, replace=True))  # a copy when cross-device
        rec.discard()
    except BaseException:
        rec.discard()
        raise


async def info(request: web.Request) -> web.Response:
    """Public facts a client needs to pick a transport; no secrets, no auth."""
    c = _state(request).config
    return web.json_response({
        "product": "fallback", "api": 1,
        "enable_http": c.enable_http, "http_port": c.http_port,
        "enable_https": c.enable_https, "https_port": c.https_port,
        "udp_port": c.bind_udp_port, "udp": False,
        "scheme": _scheme(request), "features": list(FEATURES),
    })


async def _expect_authenticated(request: web.Request) -> None:
    """Answer ``Expect: 100-continue`` only for good credentials, so ``curl -T`` with a
    wrong password is refused before it sends its body, not after."""
    if request.version == (1, 1) and request.headers.get("Expect", "").lower() == "100-continue":
        try:
            await authenticate(request)
        except TransportError as exc:
            raise web.HTTPUnauthorized(
                text=json.dumps({"error": exc.message}), content_type="application/json",
                headers={"WWW-Authenticate": 'Basic realm="fallback"'}) from None
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        request.writer.output_size = 0  # as aiohttp's own handler: the body has not started


def make_app(state: DaemonState) -> web.Application:
    app = web.Application(middlewares=[errors_middleware], client_max_size=MAX_CONTROL_BODY)
    app[STATE] = state
    app.router.add_get(f"{PREFIX}/info", info)
    app.router.add_post(f"{PREFIX}/session", open_session)
    app.router.add_post(f"{PREFIX}/session/{{sid}}/plan", plan)
    app.router.add_put(f"{PREFIX}/session/{{sid}}/blocks", upload_blocks)
    app.router.add_post(f"{PREFIX}/session/{{sid}}/commit", commit)
    app.router.add_post(f"{PREFIX}/session/{{sid}}/digests", digests)
    app.router.add_post(f"{PREFIX}/session/{{sid}}/want", want)
    app.router.add_get(f"{PREFIX}/session/{{sid}}/blocks", download_blocks, allow_head=False)
    app.router.add_post(f"{PREFIX}/session/{{sid}}/keepalive", keepalive)
    app.router.add_post(f"{PREFIX}/session/{{sid}}/acks", acks)
    app.router.add_delete(f"{PREFIX}/session/{{sid}}", close_session)
    # [\s\S], not '.': a file name may hold a newline (%0A), and '.' stops there.
    app.router.add_get("/{path:[\\s\\S]*}", plain_get)
    app.router.add_put("/{path:[\\s\\S]*}", plain_put, expect_handler=_expect_authenticated)
    return app
