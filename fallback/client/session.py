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
import logging
import os
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path as LocalPath
from typing import Any, TypeVar

from fallback.client.control import ControlClient
from fallback.client.manager import PathManager, Work
from fallback.client.options import Options
from fallback.client.paths import HttpPath, Path
from fallback.control import Flow
from fallback.errors import TransferError, UsageError
from fallback.remote import PREFIX, Remote, is_url, parse_url
from fallback.result import ProgressCallback, TransferResult
from transport.blocks import envelope as env
from transport.blocks.manifest import FileEntry
from transport.blocks.pacing import Pacer
from transport.blocks.ranges import RangeSet
from transport.errors import ConnectionLost, RemoteError, TransportError
from transport.http.pace import BURST

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

    async def move(self, paths: list[Path], work: Work) -> None:
        """Run ``paths`` over ``work`` until the phase is done (``PathManager.run``)."""
        if self.manager is None:
            self.manager = PathManager(paths)
        await self.manager.run(work)
        for kind in self.manager.kinds_used():
            if kind not in self.result.transports:
                self.result.transports.append(kind)


# -- entry points -------------------------------------------------------------------------------------
async def transfer_async(src: str | os.PathLike[str], dst: str | os.PathLike[str],
                         options: Options | None = None,
                         progress: ProgressCallback | None = None) -> TransferResult:
    """Copy ``src`` to ``dst``; one of them is a daemon URL. Raises ``TransferError``."""
    from fallback.client.download import DownloadSession
    from fallback.client.upload import UploadSession

    opts = options or Options()
    opts.check()
    s, d = os.fspath(src), os.fspath(dst)
    if is_url(s) and is_url(d):
        raise UsageError("both ends are URLs: one end must be a local path")
    if not is_url(s) and not is_url(d):
        raise UsageError("neither end is a URL: one end must be http(s)://[user@]host[:port]/path")
    if opts.encrypt and is_url(s):
        raise UsageError("--encrypt applies to uploads; use --decrypt to download")
    url = parse_url(d if is_url(d) else s)
    result = TransferResult(direction="upload" if is_url(d) else "download")
    t0 = time.monotonic()
    executor = ThreadPoolExecutor(max(4, opts.streams + 2), "fb-client")
    remote: Remote | None = None
    session: TransferSession | None = None
    try:
        remote = await Remote.connect(
            url, transport=opts.transport, user=opts.user, password=opts.password,
            cacert=opts.cacert, fingerprint=opts.fingerprint, insecure=opts.insecure,
            streams=opts.streams)
        result.transports.append(remote.scheme)
        if result.direction == "upload":
            up = session = UploadSession(remote, opts, executor, result, progress)
            await up.run(LocalPath(s), url)
        else:
            down = session = DownloadSession(remote, opts, executor, result, progress)
            await down.run(url, LocalPath(d), d.endswith(("/", os.sep)))
        result.ok = True
    except TransportError as exc:
        result.error = exc.message
        raise TransferError(exc.message, status=exc.status, result=result) from None
    except (OSError, UsageError) as exc:
        if isinstance(exc, UsageError):
            raise
        result.error = f"{getattr(exc, 'filename', '') or ''}: {exc.strerror or exc}".lstrip(": ")
        raise TransferError(result.error, result=result) from None
    finally:
        result.seconds = time.monotonic() - t0
        if session is not None:
            await session.stop_keepalive()
            await session.stop_acks()
        if remote is not None:
            await remote.close(result.error)
        executor.shutdown(wait=False)
    return result


def transfer(src: str | os.PathLike[str], dst: str | os.PathLike[str],
             progress: ProgressCallback | None = None, **options: Any) -> TransferResult:
    """Blocking twin of ``transfer_async``; ``options`` are ``Options`` fields."""
    opts = Options(**options)
    try:
        import uvloop

        return uvloop.run(transfer_async(src, dst, opts, progress))
    except ImportError:  # pragma: no cover
        return asyncio.run(transfer_async(src, dst, opts, progress))


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
    return s.removesuffix(env.SUFFIX) if decrypted else s


def shown(name: str, relpath: str) -> str:
    return f"{name}/{relpath}" if relpath else name
