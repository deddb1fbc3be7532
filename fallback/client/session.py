"""One transfer, one daemon session: what both directions share, and the entry points.

``transfer_async`` connects (``fallback.remote``), then runs an
``UploadSession`` (``fallback.client.upload``) or a ``DownloadSession``
(``fallback.client.download``). Both are ``TransferSession``s: they own the
manifest, the plan, the sender's or receiver's block state, the commit and
the result; the typed control client (``fallback.client.control``) speaks to
the daemon, and a path manager (``fallback.client.manager``) runs the paths
that move the blocks. The session never imports a path's internals: it hands
the manager path objects (``fallback.client.paths``) and a ``Work`` to do.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import math
import os
import sys
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path as LocalPath
from typing import TYPE_CHECKING, Any, TypeVar

from fallback.client.control import ControlClient
from fallback.client.manager import GIVE_UP_AFTER as MANAGER_GIVE_UP
from fallback.client.manager import STALL_TIMEOUT, PathManager, Work
from fallback.client.options import Options
from fallback.client.paths import HttpPath, Path
from fallback.client.retry import Retry, retryable
from fallback.control import Flow
from fallback.errors import TransferError, UsageError
from fallback.remote import PREFIX, Remote, Url, is_url, parse_url
from fallback.result import Progress, ProgressCallback, ProgressEvent, Switch, TransferResult
from transport.blocks import envelope as env
from transport.blocks.manifest import FileEntry
from transport.blocks.pacing import Pacer
from transport.blocks.ranges import RangeSet
from transport.blocks.sender import BlockSender
from transport.blocks.share import share_controller
from transport.blocks.sink import BlockSink
from transport.blocks.statedir import STATE_DIR
from transport.errors import ConnectionLost, ErrorKind, ProtocolError, RemoteError, TransportError
from transport.http.governor import StreamGovernor
from transport.http.pace import BURST

if TYPE_CHECKING:
    from fallback.client.failover import Failover
    from fallback.client.udppath import UdpPath

log = logging.getLogger("fallback.client")  # -v: info, -vv: debug (fallback.cli)
T = TypeVar("T")

ACK_INTERVAL = 0.5
"""Seconds between acknowledgement exchanges (the receivers journal every 0.5 s)."""
GIVE_UP_AFTER = 10.0
"""Seconds of rounds without progress after which a transfer fails (the path manager
applies the same to its paths)."""
KEEPALIVE_INTERVAL = 0.5
"""Seconds of silence after which the client calls ``keepalive`` (the daemon's answer
may ask for less; ``fallback.sessions.KEEPALIVE_INTERVAL``)."""


class TransferSession:
    """What a transfer in either direction holds: the daemon, the paths, the result."""

    def __init__(self, remote: Remote, opts: Options, executor: ThreadPoolExecutor,
                 result: TransferResult, progress_cb: ProgressCallback | None) -> None:
        self.remote = remote
        self.control = ControlClient(remote)
        self.opts = opts
        self.executor = executor
        self.result = result
        self.progress_cb = progress_cb
        self.manager: PathManager | None = None
        self.udp: UdpPath | None = None  # the UDP path of --transport udp
        self.failover: Failover | None = None  # --transport auto: HTTP(S) and UDP
        self.progress: Progress | None = None
        self._keepalive: asyncio.Task[None] | None = None
        self._acks: asyncio.Task[None] | None = None

    # -- liveness -----------------------------------------------------------------------
    def start_keepalive(self) -> None:
        """Once the session is open: keep it alive while the client makes no other call
        (a long local phase: planning many files, re-reading a partial), so the daemon
        never takes it for a killed client's (``fallback.sessions.IDLE_TAKEOVER``).
        Only with a daemon that offers it (``/info`` features)."""
        if "keepalive" in self.remote.features and self._keepalive is None:
            self._keepalive = asyncio.ensure_future(self._keep_alive())

    async def stop_keepalive(self) -> None:
        if self._keepalive is not None:
            self._keepalive.cancel()
            await asyncio.gather(self._keepalive, return_exceptions=True)
            self._keepalive = None

    async def _keep_alive(self) -> None:
        interval = KEEPALIVE_INTERVAL
        while True:
            await asyncio.sleep(max(0.05, interval - (time.monotonic() - self.remote.last_call)))
            if time.monotonic() - self.remote.last_call < interval:
                continue  # another call went out meanwhile: the daemon heard us
            try:
                interval = min(KEEPALIVE_INTERVAL, (await self.control.keepalive()).interval)
            except TransportError as exc:  # never fatal by itself: the next call will tell
                log.debug("keepalive: %s", exc.message)

    async def io(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` in the session's worker threads (disk work off the event loop)."""
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    def pacer(self, applies: Flow | None) -> Pacer | None:
        """The token bucket every stream of this transfer waits for: the rate the daemon
        says applies (its caps won), else the one asked (``--target-rate``); None: no cap.
        ``--policy`` does not change it on HTTP (docs/blocks.md, "Pacing")."""
        target = applies.target_rate if applies is not None else self.opts.target_bps
        if not target:
            return None
        log.info("rate capped at %g Mbit/s%s", target / 1e6,
                 f" (policy {applies.policy})" if applies is not None else "")
        return Pacer(float(target), BURST)

    def governor(self, applies: Flow | None, streams: int) -> StreamGovernor | None:
        """Which of this transfer's upload streams send and how fast, by the policy that
        applies (the daemon's answer, else ``--policy``): ``fair`` and ``low`` adapt from
        the streams' ``TCP_INFO`` (``transport.blocks.share``); ``fixed``, ``high``: None."""
        policy = applies.policy if applies is not None else self.opts.policy
        target = applies.target_rate if applies is not None else self.opts.target_bps
        floor = applies.min_rate if applies is not None else 0
        ctl = share_controller(policy, streams, target_rate_bps=float(target) or math.inf,
                               min_rate_bps=float(min(floor, target) if target else floor))
        return None if ctl is None else StreamGovernor(ctl)

    def streams_for(self, cap: int | None) -> int:
        """Parallel streams: what was asked, within the daemon's ``streams_max``."""
        n = max(1, min(self.opts.streams, cap or self.opts.streams))
        log.info("%d streams (asked %d, the daemon allows %s)", n, self.opts.streams,
                 cap or "any")
        return n

    def http_paths(self, n: int,
                   stream: Callable[[str, Callable[[int], None]], Awaitable[object]]
                   ) -> list[Path]:
        """``n`` HTTP(S) stream paths of this session, ``http-0`` ... (or ``https-``)."""
        kind = self.remote.scheme

        async def probe() -> object:
            return await self.remote.call("GET", f"{self.remote.base}{PREFIX}/info")

        return [HttpPath(f"{kind}-{k}", kind, stream, probe) for k in range(n)]

    def start_acks(self, exchange: Callable[[], Awaitable[None]]) -> None:
        """Run ``exchange`` (one acknowledgement call) every ``ACK_INTERVAL`` seconds until
        the session ends. A connection error is retried at the next tick (the streams'
        own successes and the commit tell the same, later); any other error is kept and
        raised by ``check_acks``."""
        async def loop() -> None:
            while True:
                await asyncio.sleep(ACK_INTERVAL)
                try:
                    await exchange()
                except (ConnectionLost, RemoteError) as exc:
                    log.debug("acks: %s", exc.message)

        self._acks = asyncio.ensure_future(loop())

    def check_acks(self) -> None:
        """Raise what ended the acknowledgement exchange, if anything did (a hostile answer)."""
        if self._acks is not None and self._acks.done() and not self._acks.cancelled():
            exc = self._acks.exception()
            if exc is not None:
                raise exc

    async def stop_acks(self) -> None:
        if self._acks is not None:
            self._acks.cancel()
            await asyncio.gather(self._acks, return_exceptions=True)
            self._acks = None

    # -- the UDP path (fallback.client.udppath) and failover (fallback.client.failover) ----
    async def choose_paths(self, http: list[Path], busy: Callable[[], bool], *,
                           sender: BlockSender | None = None, sink: BlockSink | None = None,
                           complete: Callable[[], bool] | None = None, block: int = 4 << 20,
                           bundled: tuple[int, int] = (0, 0)) -> list[Path]:
        """The phase's paths. ``--transport udp``: the session's UDP path alone, or
        ``ConnectError``; ``http``/``https``: ``http``; ``auto``: ``http`` at once, with
        a ``Failover`` (``move`` runs it) that probes UDP beside them and moves the blocks
        to it, and back, as it answers or not. ``busy``: the path has work to do.

        ``bundled``: (bytes, files) of the session that HTTP(S) carries in bundle frames
        (one-block files, when the daemon offers ``bundles``). Under ``auto``, a session
        whose bytes are mostly such files stays on HTTP(S): the UDP path moves them one
        block (one receiver and journal) per file, at a fraction of the rate."""
        from fallback.client.failover import Failover
        from fallback.client.udppath import UdpPath, open_udp
        from fallback.udpcontrol import FEATURE

        o = self.opts
        if o.transport == "udp":
            self.udp = await open_udp(self.remote, o.transport, datagram_size=o.datagram_size,
                                      flow=o.flow(), port=o.udp_port, sender=sender, sink=sink,
                                      complete=complete, block=block)
            assert self.udp is not None
            self.use_transport("udp", "--transport udp")
            return [self.udp]
        if o.transport != "auto":
            return http
        remote = self.remote

        def make_udp() -> UdpPath:
            return UdpPath(remote, datagram_size=o.datagram_size, flow=o.flow(),
                           port=o.udp_port, sender=sender, sink=sink, complete=complete,
                           block=block, probe_timeout=o.udp_probe_timeout, probes=3)

        why_not = ""
        if remote.no_udp is not None:
            why_not = remote.no_udp  # a proxy: no probe that cannot pass
        elif FEATURE not in remote.features:
            why_not = "refused by server config: the daemon offers no UDP path"
        elif prefer_bundles(*bundled, self.result.bytes):
            why_not = "mostly small files: HTTP(S) carries them many per bundle frame"
        if why_not:
            log.info("UDP not tried: %s", why_not)
        self.failover = Failover(self, http, None if why_not else make_udp, busy,
                                 o.failover_config(), why_not)
        return http

    def new_manager(self, paths: list[Path]) -> PathManager:
        """A path manager for ``paths``, bounded by the retry budget (``--retry-timeout``):
        a stream that holds work and moves nothing (a silently cut network) is a stall
        within it, and the manager gives up on paths that are all down within half of it,
        leaving the rest to the transfer's re-connections (fallback.client.retry), which
        may re-route."""
        budget = self.opts.retry_timeout
        return PathManager(paths, give_up_after=min(MANAGER_GIVE_UP, budget / 2),
                           stall_timeout=min(STALL_TIMEOUT, max(3.0, budget)))

    async def close_udp(self) -> None:
        """The UDP path's figures into the result, then close it."""
        if self.failover is not None:
            await self.failover.close()
            self.failover = None
        if self.udp is not None:
            self.udp.report(self.result)
            await self.udp.close()
            self.udp = None

    def use_transport(self, kind: str, reason: str) -> None:
        """The blocks go over ``kind`` from now on, because of ``reason``: a change of kind
        is a switch (``TransferResult.use``), logged and shown on the progress bar. Any
        path kind (``https``, ``http``, ``udp``) goes through here."""
        if self.progress is not None:
            self.progress.transport = kind
        if isinstance(self.progress_cb, _Reporter):
            self.progress_cb.use(self.result, kind, reason)
        else:
            self.result.use(kind, reason, self.result.seconds)

    async def move(self, paths: list[Path], work: Work) -> None:
        """Run ``paths`` over ``work`` until the phase is done (``PathManager.run``), or
        the failover's paths (``choose_paths``)."""
        if self.failover is not None:
            await self.failover.run(work)
            return
        if self.manager is None:
            self.manager = self.new_manager(paths)
        await self.manager.run(work)
        for kind in self.manager.kinds_used():  # the scheme is recorded at the start
            self.use_transport(kind, f"--transport {self.opts.transport}")


BUNDLED_FILES_MIN = 64
"""One-block files in a session from which ``auto`` may keep it on HTTP(S) for bundles."""


def prefer_bundles(nbytes: int, files: int, total: int) -> bool:
    """Whether a session moving ``total`` bytes, ``nbytes`` of them in ``files`` one-block
    files that would travel in bundles, is better off on HTTP(S) than on UDP: at least
    ``BUNDLED_FILES_MIN`` such files holding at least half the bytes (a folder of small
    files; one large file or a few small ones beside large ones go on UDP)."""
    return files >= BUNDLED_FILES_MIN and 2 * nbytes >= total


# -- entry points -------------------------------------------------------------------------------------
async def transfer_async(src: str | os.PathLike[str], dst: str | os.PathLike[str],
                         options: Options | ProgressCallback | None = None,
                         progress: ProgressCallback | None = None,
                         **keywords: Any) -> TransferResult:
    """Copy ``src`` to ``dst``; one of them is a daemon URL.

    Options come as an ``Options`` object or as keywords (its fields), not both; a
    callable in ``options``' place is taken as ``progress`` (the older call form).
    Raises ``UsageError`` before any connection for bad arguments (an unknown keyword,
    ``block_size="4Q"``), ``TransferError`` when the transfer fails.

    When every path is down the transfer re-connects and resumes, within
    ``opts.retries`` and ``opts.retry_timeout`` (``fallback.client.retry``);
    ``sent_bytes`` then counts what every attempt carried.
    """
    s, d, opts, progress = _arguments(src, dst, options, progress, keywords)
    return await _transfer_into(TransferResult(), s, d, opts, progress)


async def _transfer_into(result: TransferResult, s: str, d: str, opts: Options,
                         progress: ProgressCallback | None) -> TransferResult:
    """``transfer_async`` filling ``result`` as it goes: when a Ctrl-C or SIGTERM cancels
    it, ``transfer`` still holds what was done (``Interrupted.result``). ``s`` and ``d``
    are checked already (``_arguments``)."""
    if is_url(s) and is_url(d):
        raise UsageError("both ends are URLs: one end must be a local path")
    if not is_url(s) and not is_url(d):
        raise UsageError("neither end is a URL: one end must be http(s)://[user@]host[:port]/path")
    if opts.encrypt and is_url(s):
        raise UsageError("--encrypt applies to uploads; use --decrypt to download")
    url = parse_url(d if is_url(d) else s)
    result.direction = "upload" if is_url(d) else "download"
    result.dry_run = opts.dry_run
    t0 = time.monotonic()
    executor = ThreadPoolExecutor(max(4, opts.streams + 2), "fb-client")
    retry = Retry(opts.retries, opts.retry_timeout)
    report = _Reporter(progress, t0)
    sent_before = 0  # bytes carried by earlier attempts of this run
    earlier = _Earlier()
    try:
        while True:
            down_since = None
            result.sent_bytes = 0
            try:
                await _attempt(s, d, url, opts, executor, result, report,
                               min(opts.connect_timeout, max(0.5, retry.left())), earlier)
                result.ok = True
                break
            except TransportError as exc:
                moved = result.sent_bytes > 0
                if isinstance(exc, _Failed):
                    down_since, moved, exc = exc.down_since, exc.moved, exc.error
                # Only a transfer that got under way retries: a daemon that cannot be reached
                # at all at the start (a wrong host or port) fails at once, as before.
                delay = retry.after(exc, down_since=down_since, moved=moved) \
                    if earlier.opened else None
                if delay is None:
                    if result.retries and retryable(exc):
                        exc = TransportError(f"{exc.message} (gave up after {result.retries} "
                                             f"retr{'y' if result.retries == 1 else 'ies'})",
                                             kind=exc.kind)
                    raise exc from None
                log.warning("%s; retrying in %.1f s (%d of at most %d, %.0f s left)",
                            exc.message, delay, retry.attempts, retry.retries, retry.left())
                sent_before += result.sent_bytes
                await asyncio.sleep(delay)
                result.retries += 1
        result.sent_bytes += sent_before
        result.skipped_bytes = max(0, result.skipped_bytes - sent_before)
        if not result.sent_bytes and all(k in result.skipped_files for k in result.checksums):
            result.transports.clear()  # nothing moved (an empty file that was written did)
    except TransportError as exc:
        result.sent_bytes += sent_before
        if not result.sent_bytes and not result.switches:
            result.transports.clear()  # nothing moved (README: transports)
        result.error = _remote_message(exc, result, url.path)
        status = exc.peer_status if isinstance(exc, RemoteError) else None
        kind = STATUS_KIND.get(status, exc.kind) if status is not None else exc.kind
        if throttled_login(exc):  # the daemon refused the login: exit 3, as a wrong password
            kind, result.error = ErrorKind.UNAUTHORIZED, _throttled_message(exc)
        raise TransferError(result.error, kind=kind, status=status, result=result) from None
    except (OSError, UsageError) as exc:
        if isinstance(exc, UsageError):
            raise
        result.error = os_message(exc, s if result.direction == "upload" else d)
        raise TransferError(result.error, result=result) from None
    except asyncio.CancelledError:  # Ctrl-C, SIGTERM: what was done so far stays in result
        result.sent_bytes += sent_before
        result.ok = False
        raise
    finally:
        result.seconds = time.monotonic() - t0
        executor.shutdown(wait=False)
    return result


STATUS_KIND = {400: ErrorKind.BAD_REQUEST, 401: ErrorKind.UNAUTHORIZED, 403: ErrorKind.FORBIDDEN,
               404: ErrorKind.NOT_FOUND, 407: ErrorKind.UNAUTHORIZED, 409: ErrorKind.CONFLICT,
               412: ErrorKind.CONFLICT, 413: ErrorKind.TOO_LARGE, 422: ErrorKind.INTEGRITY,
               429: ErrorKind.UNAVAILABLE, 503: ErrorKind.UNAVAILABLE}
"""What a daemon's (or a proxy's) error answer means, by its status: the kind a
``TransferError`` ending on it carries (the daemon's own table,
``fallback.daemonctx.HTTP_STATUS``, read backwards; 407 is the proxy refusing the
credentials). Other statuses stay ``ErrorKind.REMOTE``."""


class _Earlier:
    """What an attempt leaves the next: the daemon's ``/info`` and the session it may
    have to end (``Remote.end_earlier``)."""

    def __init__(self) -> None:
        self.info: dict[str, Any] | None = None
        self.session: tuple[str, str] | None = None  # (id, token)
        self.error = ""
        self.opened = False  # some attempt opened a session: the transfer got under way


class _Failed(TransportError):
    """An attempt's error, with when its paths were all first seen down and whether it
    moved data (``Retry.after``)."""

    def __init__(self, error: TransportError, down_since: float | None, moved: bool) -> None:
        super().__init__(error.message, kind=error.kind)
        self.error, self.down_since, self.moved = error, down_since, moved


class _Reporter:
    """The caller's progress callback, also told of each switch of transport
    (``ProgressEvent.switch``: the progress bar prints a line)."""

    def __init__(self, callback: ProgressCallback | None, t0: float) -> None:
        self.callback = callback
        self.t0 = t0  # time.monotonic() when the transfer started
        self.last: ProgressEvent | None = None

    def use(self, result: TransferResult, kind: str, reason: str) -> None:
        sw = result.use(kind, reason, time.monotonic() - self.t0)
        if sw is not None:
            self.switched(sw, result)

    def __call__(self, ev: ProgressEvent) -> None:
        self.last = ev
        if self.callback is not None:
            self.callback(ev)

    def switched(self, sw: Switch, result: TransferResult | None = None) -> None:
        log.info("switched %s", sw)
        last = self.last
        if last is None:  # before the first event (UDP chosen at the start): the planned total
            total, files = (result.bytes, result.files) if result is not None else (0, 0)
            self(ProgressEvent(0, total, 0.0, "", sw.to, files_total=files, switch=str(sw)))
            return
        self(ProgressEvent(last.bytes_done, last.bytes_total, 0.0, last.file, sw.to,
                           files_done=last.files_done, files_total=last.files_total,
                           bytes_resumed=last.bytes_resumed, switch=str(sw)))


async def _attempt(s: str, d: str, url: Url, opts: Options, executor: ThreadPoolExecutor,
                   result: TransferResult, report: _Reporter, connect_timeout: float,
                   earlier: _Earlier) -> None:
    """One connection and session of a transfer, from ``/info`` to the commit. A
    retryable error (``fallback.client.retry``) comes out as ``_Failed``."""
    from fallback.client.download import DownloadSession
    from fallback.client.upload import UploadSession

    remote: Remote | None = None
    session: TransferSession | None = None
    error: str | None = None
    try:
        remote = await Remote.connect(
            url, transport=opts.transport, user=opts.user, password=opts.password,
            cacert=opts.cacert, fingerprint=opts.fingerprint, insecure=opts.insecure,
            streams=opts.streams, proxy=opts.proxy, fallback=opts.fallback,
            fallback_port=opts.fallback_port, connect_timeout=connect_timeout,
            known_info=earlier.info)
        earlier.info = remote.info
        if earlier.session is not None:
            await remote.end_earlier(*earlier.session, f"cut off: {earlier.error}",
                                     connect_timeout)
            earlier.session = None
        report.use(result, remote.scheme, remote.reason)
        result.proxy = remote.proxy.address if remote.proxy is not None else None
        if result.direction == "upload":
            up = session = UploadSession(remote, opts, executor, result, report)
            await up.run(LocalPath(s), url)
        else:
            down = session = DownloadSession(remote, opts, executor, result, report)
            await down.run(url, LocalPath(d), d.endswith(("/", os.sep)))
    except TransportError as exc:
        error = exc.message
        if not retryable(exc):
            raise
        if remote is not None and remote.sid and remote.token:
            earlier.session, earlier.error = (remote.sid, remote.token), exc.message
            earlier.opened = True
        manager = session.manager if session is not None else None
        raise _Failed(exc, manager.down_since if manager is not None else None,
                      result.sent_bytes > 0) from None
    finally:
        if session is not None:
            await session.close_udp()
            await session.stop_keepalive()
            await session.stop_acks()
        if remote is not None:
            answer = await remote.close(error, timeout=connect_timeout + 1)
            if result.direction == "download" and answer and answer.get("udp") is not None:
                _daemon_udp_figures(result, answer["udp"])
            if answer and isinstance(session, UploadSession):
                session.published(answer.get("published"))


def transfer(src: str | os.PathLike[str], dst: str | os.PathLike[str],
             options: Options | ProgressCallback | None = None,
             progress: ProgressCallback | None = None, **keywords: Any) -> TransferResult:
    """Blocking twin of ``transfer_async``, with the same arguments. Called where an
    event loop runs (in a coroutine), it raises ``UsageError``: await ``transfer_async``."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        pass
    else:
        raise UsageError("transfer() cannot run inside a running event loop: "
                         "use 'await transfer_async(...)' there")
    s, d, opts, progress = _arguments(src, dst, options, progress, keywords)  # before any loop
    from fallback.client.interrupt import Interrupted, Terminated, run_interruptible

    # Ctrl-C (SIGINT) ends it with KeyboardInterrupt, even where one cancellation is lost;
    # the exception carries what was done so far (``Interrupted.result``).
    result = TransferResult()
    try:
        return run_interruptible(lambda: _transfer_into(result, s, d, opts, progress))
    except KeyboardInterrupt as exc:
        result.ok = False
        result.error = "terminated" if isinstance(exc, Terminated) else "interrupted"
        if isinstance(exc, Interrupted):
            exc.result = result
            raise
        raise Interrupted(result) from None


def _arguments(src: Any, dst: Any, options: Any, progress: Any,
               keywords: dict[str, Any]) -> tuple[str, str, Options, ProgressCallback | None]:
    """A ``transfer()`` call's arguments, checked: ``src`` and ``dst`` as strings, the
    options, the progress callback. ``UsageError`` naming the argument for a wrong type or
    an empty path (``""`` would be the current folder: ``cp ''`` refuses it too)."""
    if callable(options) and not isinstance(options, Options):
        options, progress = None, progress or options
    opts = Options.from_keywords(options, keywords)
    ends = []
    for what, value in (("src", src), ("dst", dst)):
        path = os.fspath(value) if isinstance(value, os.PathLike) else value
        if not isinstance(path, str):
            raise UsageError(f"{what} must be a path or URL string (str or os.PathLike[str]), "
                             f"not {type(path).__name__}")
        if not path:
            raise UsageError(f"{what} is empty: name a file, a folder or a URL")
        ends.append(path)
    if progress is not None and not callable(progress):
        raise UsageError(f"progress must be a callable taking a ProgressEvent, or None, not "
                         f"{type(progress).__name__}")
    return ends[0], ends[1], opts, progress


def _daemon_udp_figures(result: TransferResult, raw: Any) -> None:
    """A download's UDP figures are the sender's, the daemon's (``UdpFigures`` in its
    close answer): bytes it sent again, loss and RTT replace the receiving end's."""
    from fallback.udpcontrol import UdpFigures

    try:
        f = UdpFigures.from_json(raw)
    except ProtocolError as exc:
        log.debug("close answer: %s", exc.message)
        return
    result.retransmitted_bytes += f.retransmitted_bytes
    result.loss_pct = f.loss_pct
    if f.rtt_ms:
        result.rtt_ms = f.rtt_ms
    if f.datagram_size:
        result.datagram_size = f.datagram_size


THROTTLED = "too many failed logins"
"""How the daemon's 429 for a throttled login begins (``fallback.throttle.check_login``)."""


def throttled_login(exc: TransportError) -> bool:
    """The daemon refused the login because of earlier failed ones (429): a refusal of the
    credentials (exit 3), not a failed transfer."""
    return isinstance(exc, RemoteError) and exc.peer_status == 429 \
        and exc.message.startswith(THROTTLED)


def _throttled_message(exc: TransportError) -> str:
    wait = getattr(exc, "retry_after", None)
    after = f"retry in {wait:.0f} s" if wait is not None else "retry later"
    return f"login throttled by the daemon: {THROTTLED}, {after}"


def _remote_message(exc: TransportError, result: TransferResult, path: str) -> str:
    """The daemon's refusal as the user should read it: a download whose source the daemon
    does not have is ``remote PATH: not found``; a daemon path is marked ``remote``."""
    if isinstance(exc, RemoteError) and exc.peer_status == 404 and result.direction == "download" \
            and not result.files:
        return f"remote {path}: not found"
    if isinstance(exc, RemoteError) and exc.message.startswith("/"):
        return f"remote {exc.message}"  # the daemon names its paths from the docroot's top
    return exc.message


INTERNAL_NAMES = (f"/{STATE_DIR}/", ".fallback-journal", ".fallback-partial")
"""Path parts that are fallback's own files (the state folder, journals, partials)."""


def os_message(exc: OSError, user_path: str) -> str:
    """One line for an OS error, naming the user's path, never one of fallback's own files
    (a journal or a partial in the state folder): those are named by ``user_path``, the
    local end the user gave."""
    name = os.fsdecode(exc.filename) if getattr(exc, "filename", None) else ""
    if name and any(part in name for part in INTERNAL_NAMES):
        name = user_path
    why = {errno.ENOTDIR: "not a folder (a file is in the way)",
           errno.EISDIR: "a folder, not a file"}.get(exc.errno or 0, exc.strerror or str(exc))
    return f"{name}: {why}" if name else why


# -- sizes and names ------------------------------------------------------------------------------------
def plain_bytes(entry: FileEntry, blocks: RangeSet) -> int:
    """File bytes in ``blocks`` (only the last block of a file may be short)."""
    count = -(-entry.size // entry.block_size)
    total = 0
    for a, b in blocks:
        total += (b - a) * entry.block_size
        if b == count:
            total -= count * entry.block_size - entry.size
    return total


def plain_len(entry: FileEntry, block: int) -> int:
    return min(entry.block_size, entry.size - block * entry.block_size)


def plain_share(entry: FileEntry, wire_bytes: int) -> int:
    """File bytes carried by a wire block (its overhead is not file data)."""
    return max(0, wire_bytes - entry.overhead) if entry.overhead else wire_bytes


def display(name: str, entry: FileEntry, decrypted: bool) -> str:
    """The name a downloaded file gets locally (a decrypted envelope loses its suffix)."""
    s = shown(name, entry.path)
    return sys.intern(s.removesuffix(env.SUFFIX)) if decrypted else s


def shown(name: str, relpath: str) -> str:
    """``name/relpath``, one str object per name however often it is asked for: the result's
    and the progress's dicts of 100,000 files held four copies of each (issue 11)."""
    return sys.intern(f"{name}/{relpath}") if relpath else name
