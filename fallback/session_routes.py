"""The session control API under ``/.fallback/v1`` (routes listed in ``fallback.server``)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable
from pathlib import Path
from typing import Any

from aiohttp import web

from fallback import answers as A
from fallback import control, jsonbody, sources
from fallback import sessions as S
from fallback import targets as T
from fallback.config import Config, UserConfig
from fallback.daemonctx import (
    STATE_BATCH,
    DaemonState,
    authenticate,
    heard_by,
    http_status,
    log,
    peer_of,
    read_message,
    refuse_reserved,
    resource_log,
    run_io,
    scheme_of,
    session_of,
    state_of,
)
from fallback.errors import Busy
from fallback.paths import confine, relpath_in, resolve, server_name
from fallback.udpserver import udp_figures
from transport.blocks.envelope import SUFFIX as ENVELOPE_SUFFIX
from transport.blocks.manifest import MAX_ENTRIES, FileEntry, check_relpath
from transport.blocks.plan import TargetState
from transport.blocks.statedir import STATE_DIR
from transport.blocks.tree import describe_envelopes, walk_source
from transport.errors import (
    ErrorKind,
    PathError,
    ProtocolError,
    ResourceExhausted,
    TransportError,
)
from transport.http.framing import CONTENT_TYPE
from transport.http.server import receive_blocks, send_blocks
from transport.http.stall import write_progressing
from transport.http.tcpinfo import SockLike


# -- session control -------------------------------------------------------------------------------
async def open_session(request: web.Request) -> web.Response:
    st = state_of(request)
    if st.stopping.is_set():
        raise ProtocolError("daemon is shutting down", kind=ErrorKind.UNAVAILABLE)
    user = await authenticate(request)
    st.table.admit(user.name, st.config.sessions_per_user_max)  # reserves the slot at once
    try:
        msg = await read_message(request, control.parse_open)
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
            raise PathError("Server requires content protection", kind=ErrorKind.FORBIDDEN)
    if st.config.content_protection_strong_pass_required and not msg.strong_pass:
        if any(e.transform != "identity" for e in entries):
            raise PathError("Server requires a strong passphrase for content protection "
                            "(at least 12 characters, 3 of: lower case, upper case, digits, symbols)",
                            kind=ErrorKind.FORBIDDEN)
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
    refuse_reserved(request, Path(user.docroot), root)
    if root == Path(user.docroot) and any(e.path.split("/")[0] == STATE_DIR for e in entries):
        raise PathError("that name is reserved", kind=ErrorKind.FORBIDDEN)  # (symlinks: in T.target_state)
    if root == Path(user.docroot) and not entries[0].is_dir:
        raise PathError("cannot write a file over the docroot", kind=ErrorKind.BAD_REQUEST)
    # The server's overwrite=deny wins over the client's policy: commits never replace
    # (a link that fails on an existing name), and plan refuses existing targets.
    overwrite = "never" if st.config.overwrite == "deny" else msg.overwrite
    session = st.table.new(direction="upload", root=root, entries=entries,
                           **_common(request, st, user, overwrite))
    session.heard(scheme_of(request), peer_of(request))
    flow = S.effective_flow(st.config.flow_in, msg.flow)
    session.pacer = S.pacer_for(flow)
    want_root = msg.overwrite == "diff"

    checked: set[str] = set()  # folders resolved inside the docroot (T.target_state)

    def batch(k: int) -> list[TargetState]:  # one executor job per STATE_BATCH entries
        return [T.target_state(session, i, want_root=want_root, checked=checked)
                for i in range(k, min(k + STATE_BATCH, len(entries)))]

    states: list[TargetState] = []
    try:
        for k in range(0, len(entries), STATE_BATCH):
            states += await run_io(request, batch, k)
    except BaseException as exc:  # a refused target: do not leave the session open
        await st.table.close(session, getattr(exc, "message", None) or type(exc).__name__)
        raise
    log.info("session %s opened: user=%s peer=%s upload to %s (%d entries)", session.id[:8],
             user.name, request.remote, relpath_in(Path(user.docroot), root), len(entries))
    return _answer(A.UploadOpened(
        session.id, session.token, states, relpath_in(Path(user.docroot), root),
        st.config.streams_max, _policy(st.config), flow).to_json(lazy=True))


def _answer(body: dict[str, Any]) -> web.Response:
    """``web.json_response``, its long lists encoded a slice at a time (``fallback.jsonbody``)."""
    return web.Response(body=jsonbody.encode(body), content_type="application/json")


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
    refuse_reserved(request, docroot, src)
    tree = await run_io(request, lambda: walk_source(src, st.config.block_size, within=docroot))
    if len(tree.entries) > MAX_ENTRIES:
        raise PathError(f"{relpath_in(docroot, src)}: {len(tree.entries)} files and folders, "
                        f"more than one session carries ({MAX_ENTRIES})", kind=ErrorKind.TOO_LARGE)
    await run_io(request, describe_envelopes, tree)
    session = st.table.new(direction="download", root=src, entries=tree.entries,
                           **_common(request, st, user, "diff"))
    session.heard(scheme_of(request), peer_of(request))
    flow = S.effective_flow(st.config.flow_out, msg.flow)
    session.pacer = S.pacer_for(flow)
    session.governor = S.governor_for(flow, st.config.streams_max)
    try:
        await run_io(request, sources.open_sources, session)
    except BaseException as exc:  # a file changed since the walk: do not leave the session open
        await st.table.close(session, getattr(exc, "message", None) or type(exc).__name__)
        raise
    log.info("session %s opened: user=%s peer=%s download of %s (%d entries)", session.id[:8],
             user.name, request.remote, relpath_in(docroot, src), len(tree.entries))
    # The docroot itself goes by the user's name, never by the server's folder name (a
    # download of / showed "rw/...": the daemon's own layout, trial).
    name = user.name if src == docroot.resolve() or src == docroot else src.name
    return _answer(A.DownloadOpened(
        name, list(tree.entries), list(tree.skipped), st.config.streams_max,
        session.id, session.token, flow).to_json(lazy=True))


async def plan(request: web.Request) -> web.Response:
    """Open receivers for the files to send; answers ``{missing: {file: [[start, stop], ...]},
    refused: {file: reason}}``. With ``file_system/overwrite=deny`` a file whose target
    exists is refused (planned as skipped) whatever the client's overwrite policy."""
    session = session_of(request, "upload", "plan")
    msg = await read_message(request, control.PlanRequest.from_json)
    st = state_of(request)
    actions: dict[int, str] = {}
    final: dict[int, FileEntry] = {}
    kept: dict[int, control.PlanItem] = {}  # resumes that rebase or drop changed blocks
    for item in msg.files:  # all checked before the session changes
        opened = S.file_entry(session, item.file)
        if item.entry is not None:
            final[item.file] = _final_entry(opened, item.entry)
        actions[item.file] = item.action
        if item.rebase or item.drop:
            kept[item.file] = item
    S.begin_plan(session)
    session.streams += 1  # busy: opening 100,000 receivers must not look idle to a takeover
    try:
        for i, entry in final.items():
            session.entries[i] = entry
        refused: dict[int, str] = {}
        if st.config.overwrite == "deny":
            session.overwrite = "never"  # a SIGHUP may have set deny since the open
            refused = await run_io(request, S.refuse_existing, session, actions)
            for i in refused:
                actions[i] = "skip"
        missing = await S.open_receivers(st.table, session, actions, kept)
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
    session = session_of(request, "upload", "PUT blocks")
    if session.sink is None:
        raise ProtocolError("plan the upload before sending blocks", kind=ErrorKind.CONFLICT)
    _admit_stream(request, session)
    session.streams += 1
    try:
        n = await _unless_stopping(request, receive_blocks(request.content, session.sink,
                                                           on_block=heard_by(request, session),
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
    stop = asyncio.ensure_future(state_of(request).stopping.wait())
    try:
        await asyncio.wait({recv, stop}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stop.cancel()
        if not recv.done():
            recv.cancel()
            await asyncio.gather(recv, return_exceptions=True)
    if recv.cancelled():
        raise ProtocolError("daemon is shutting down", kind=ErrorKind.UNAVAILABLE)
    return recv.result()


async def commit(request: web.Request) -> web.Response:
    session = session_of(request, "upload", "commit")
    msg = await read_message(request, control.CommitRequest.from_json)
    if session.sink is None:
        raise ProtocolError("nothing to commit", kind=ErrorKind.CONFLICT)
    for item in msg.files:
        S.file_entry(session, item.file)
    if state_of(request).config.overwrite == "deny":
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
    sink = session.sink
    if session.udp is not None:
        await session.udp.drain()  # datagram pieces still on their way into the sink
    await sink.flush()
    deadline = time.monotonic() + S.COMMIT_WAIT
    results: dict[int, A.CommitResult] = {}
    for item in msg.files:
        i = item.file
        try:
            inline = S.inline_result(session, i, item.root)
            if inline is not None:  # a one-block file: published with its group, or not here yet
                results[i] = inline
                continue
            left = await S.verify_for_commit(session, i, deadline)
            if left:
                results[i] = A.CommitVerifying(left)
                continue
            results[i] = await run_io(request, S.commit_file, session, i, item.root)
        except TransportError as exc:
            results[i] = A.CommitFailed(exc.message, http_status(exc))
        except OSError as exc:  # e.g. the partial cannot be read back
            results[i] = A.CommitFailed(
                f"{server_name(session.docroot, session.target(i))}: {exc.strerror or exc}", 500)
    if not sink.receivers and not sink.inline:
        await run_io(request, S.finish_dirs, session)
    return web.json_response(A.CommitAnswer(results).to_json())


async def digests(request: web.Request) -> web.Response:
    """``{file, blocks, root}``: digests of source blocks (and the file's root); or
    ``{roots: [file, ...]}``: whole-file digests over current bytes, for the client's
    check before it publishes downloaded files."""
    session = session_of(request, "download", "digests")
    if session.feed is None:
        raise ProtocolError("not a download session", kind=ErrorKind.CONFLICT)
    msg = await read_message(request, control.parse_digests)
    if session.digesting:
        raise Busy("a digests call is already running in this session")
    session.digesting = True
    session.streams += 1  # busy while it reads: not idle to a takeover
    try:
        if isinstance(msg, control.RootsRequest):
            return web.json_response((await sources.source_roots(session, list(msg.files))).to_json())
        count = S.file_entry(session, msg.file).layout().count
        if msg.blocks and msg.blocks[-1] >= count:
            raise ProtocolError(f"digests: block {msg.blocks[-1]} out of range for file {msg.file} "
                                f"({count} blocks)")
        out = await sources.source_digests(session, msg.file, list(msg.blocks), msg.root)
        return web.json_response(out.to_json())
    finally:
        session.digesting = False
        session.streams -= 1
        session.touch()


async def want(request: web.Request) -> web.Response:
    """Queue block ranges; each is checked against its file's block count before any is
    queued, and the queue holds ranges, so ``[0, 10**10)`` costs what ``[0, 1)`` does."""
    session = session_of(request, "download", "want")
    if session.feed is None:
        raise ProtocolError("not a download session", kind=ErrorKind.CONFLICT)
    msg = await read_message(request, control.WantRequest.from_json)
    return web.json_response(A.WantAnswer(session.feed.add_ranges(msg.ranges)).to_json())


def _socket_of(request: web.Request) -> SockLike | None:
    """The stream's TCP socket (for ``TCP_INFO`` and pacing), None when it is gone."""
    t = request.transport
    sock: SockLike | None = t.get_extra_info("socket") if t is not None else None
    return sock


def _admit_stream(request: web.Request, session: S.Session) -> None:
    """Enforce ``streams_max``: a stream beyond it is refused (429); the others go on."""
    limit = state_of(request).config.streams_max
    if session.streams >= limit:
        raise Busy(f"too many parallel streams for this session: {session.streams} "
                   f"open, streams_max is {limit}")


async def download_blocks(request: web.Request) -> web.StreamResponse:
    """Stream blocks until the feed is empty.

    The response starts with its first block, so a source that fails on that read is
    this request's error (409 changed, 503 out of descriptors); a stream that must wait
    first (its turn under ``fair``/``low``, or blocks another stream holds) answers its
    head before it waits (``send_blocks``' ``on_wait``). A source failing later
    fails the feed: the stream ends cleanly after its last whole frame, every later
    request of the session gets the error, and the session is logged as failed.
    """
    session = session_of(request, "download", "GET blocks")
    feed = session.feed
    if feed is None:
        raise ProtocolError("not a download session", kind=ErrorKind.CONFLICT)
    if feed.error is not None:
        raise feed.error
    _admit_stream(request, session)
    resp = web.StreamResponse(headers={"Content-Type": CONTENT_TYPE})
    resp.enable_chunked_encoding()

    async def answer() -> None:  # the head: status 200, before any frame
        if not resp.prepared:
            await resp.prepare(request)

    async def write(data: bytes | bytearray | memoryview) -> None:
        await answer()
        await write_progressing(resp.write(data), request.transport)

    session.streams += 1
    session.stream_ids += 1
    path = f"{scheme_of(request)}-{session.stream_ids}"
    try:
        try:
            await send_blocks(write, feed, path, stop=state_of(request).stopping,
                              on_block=heard_by(request, session),
                              version=2 if request.query.get("frames") == "2" else 1,
                              acks=request.query.get("acks") == "1", pacer=session.pacer,
                              governor=session.governor,
                              sock=_socket_of(request),
                              holes=request.query.get("holes") == "1",
                              bundles=request.query.get("bundles") == "1",
                              on_wait=answer)
        except TransportError as exc:
            session.error = session.error or exc.message
            if not resp.prepared:
                raise  # answered as this request's error (and logged) by the middleware
            if isinstance(exc, ResourceExhausted):
                resource_log.warning(exc.resource, "session %s: server %s (%s)", session.id[:8],
                                     exc.message, exc.resource)
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
    session = session_of(request, None, "acks")
    msg = await read_message(request, control.Acks.from_json)
    if session.direction == "download":
        if session.feed is None:
            raise ProtocolError("not a download session", kind=ErrorKind.CONFLICT)
        session.feed.acks(msg.journaled, msg.failed)
        return web.json_response(control.Acks().to_json())
    if session.sink is None:
        return web.json_response(control.Acks().to_json())  # not planned yet: nothing
    journaled, rejected = session.sink.take_acks()
    return web.json_response(control.Acks.from_pairs(journaled, rejected).to_json())


async def keepalive(request: web.Request) -> web.Response:
    """``{}`` -> ``{idle_takeover, interval}``: the client is alive (a long local phase, a
    UDP-only phase); hearing it is all this call does. Either direction."""
    session_of(request, None, "keepalive")
    await read_message(request, control.KeepaliveRequest.from_json)
    return web.json_response(A.KeepaliveAnswer(S.IDLE_TAKEOVER, S.KEEPALIVE_INTERVAL).to_json())


async def close_session(request: web.Request) -> web.Response:
    session = session_of(request, None, "close")
    msg = await read_message(request, control.CloseRequest.from_json)
    await state_of(request).table.close(session, msg.error)
    answer: dict[str, Any] = {"closed": True}
    sink = session.sink if session.direction == "upload" else None
    if sink is not None and sink.inline_done:
        # One-block files published with their bundles' groups before the close: a client
        # cut off before its commit (Ctrl-C) reports their checksums all the same.
        answer["published"] = {str(i): d.root for i, d in sink.inline_done.items()}
    if session.direction == "download":  # the daemon sent: its UDP figures (UdpFigures)
        figures = udp_figures(session)
        if figures is not None:
            answer["udp"] = figures.to_json()
    return web.json_response(answer)


