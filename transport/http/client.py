"""Client side of the HTTP(S) data path: upload and download block streams.

Errors from aiohttp and the OS are mapped here, once, at the boundary, into
``transport.errors`` (``AIOHTTP_ERRORS`` through ``map_exceptions``, as httpcore
does), so the engine above never sees an aiohttp exception type.
"""

from __future__ import annotations

import contextvars
import json
import ssl as ssl_mod
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

import aiohttp
import yarl

from transport.blocks.pacing import Pacer
from transport.blocks.scheduler import Lease
from transport.blocks.sender import BlockSender
from transport.blocks.sink import BlockSink
from transport.errors import (
    ConnectError,
    ConnectionLost,
    ExceptionMapping,
    ProtocolError,
    RemoteError,
    map_exceptions,
)
from transport.http.framing import CONTENT_TYPE
from transport.http.governor import StreamGovernor
from transport.http.pace import pace, wire_parts
from transport.http.server import LINGER, receive_blocks
from transport.http.tcpinfo import SockLike
from transport.http.units import Reads, Unit, no_unit, take_unit, unit_frame

SSLArg = ssl_mod.SSLContext | aiohttp.Fingerprint | bool
Activity = Callable[[int], None]
"""Called with the bytes of each block a stream moved (the path's activity meter)."""

MAX_ERROR_BODY = 64 << 10
"""Bytes of a peer's error body the client reads (the rest is dropped): an error
text is one line; a hostile server's 800 MiB "error" must not fill memory."""

MAX_STREAM_ANSWER = 64 << 10
"""Largest answer to an upload stream (``{received: n}``) the client reads, in bytes."""


_STREAM_SOCKET: contextvars.ContextVar[list[SockLike | None] | None] = \
    contextvars.ContextVar("fallback_stream_socket", default=None)


class StreamConnector(aiohttp.TCPConnector):
    """A ``TCPConnector`` that tells an upload stream which socket carries it: the stream
    sets a slot (a context variable) before its request; the connection made or reused
    for that request puts its socket there, and the body (which aiohttp writes in a task
    that inherits the context) reads it for ``TCP_INFO`` (``transport.http.governor``)."""

    async def connect(self, req: Any, traces: Any, timeout: Any) -> Any:
        conn = await super().connect(req, traces, timeout)
        slot = _STREAM_SOCKET.get()
        if slot is not None and conn.transport is not None:
            slot.append(self.stream_socket(conn))
        return conn

    def stream_socket(self, conn: Any) -> SockLike | None:
        """The TCP socket carrying ``conn`` (a subclass whose transports are not on the
        TCP socket itself says which is)."""
        sock: SockLike | None = conn.transport.get_extra_info("socket")
        return sock


async def read_bounded(resp: aiohttp.ClientResponse, limit: int) -> bytes:
    """A peer's whole body, refusing (``ProtocolError``) more than ``limit`` bytes:
    by its Content-Length at once, else as soon as more has arrived."""
    if resp.content_length is not None and resp.content_length > limit:
        raise ProtocolError(f"answer of {resp.content_length} bytes is larger than {limit} bytes")
    body = bytearray()
    while chunk := await resp.content.read(min(1 << 20, limit + 1)):
        body += chunk
        if len(body) > limit:
            raise ProtocolError(f"answer larger than {limit} bytes")
    return bytes(body)


async def read_error(resp: aiohttp.ClientResponse, limit: int = MAX_ERROR_BODY) -> bytes:
    """At most ``limit`` bytes of a peer's error body (the rest is not read; the
    connection is then closed rather than drained)."""
    body = bytearray()
    while len(body) < limit and (chunk := await resp.content.read(limit - len(body))):
        body += chunk
    if len(body) >= limit:
        resp.close()
    return bytes(body)


def refuse_redirect(resp: aiohttp.ClientResponse, base: str) -> None:
    """``RemoteError`` for any 3xx answer: the client never follows a redirect (to
    another host it would send the session's token and the user's data there), so
    every request is made with ``allow_redirects=False`` and a 3xx stops here."""
    if 300 <= resp.status < 400:
        where = resp.headers.get("Location", "")
        raise RemoteError(f"{base} answered HTTP {resp.status} redirecting to {where[:200] or '?'}; "
                          "fallback does not follow redirects: use the daemon's own address",
                          peer_status=resp.status)


async def _frames(sender: BlockSender, path: str, delivered: list[Lease],
                  on_block: Activity | None = None, version: int = 2,
                  pacer: Pacer | None = None, governor: StreamGovernor | None = None,
                  slot: list[SockLike | None] | None = None, holes: bool = False,
                  bundles: bool = False) -> AsyncIterator[bytes | bytearray | memoryview]:
    """Frames for an upload body: the pieces ``path`` leases (one-block files in bundles
    when ``bundles``: a daemon with the ``bundles`` feature), reading one unit ahead of
    the socket; ends when nothing is left to lease. Leases taken and not delivered stay
    the path's: the caller gives them back (``drop_path``) if the stream failed.
    ``holes``: blocks in holes of their file go as hole frames (a daemon with the
    ``holes`` feature). ``governor``: the stream joins it with the socket in ``slot``
    and leases only while admitted; not admitted, it waits holding no lease, and ends
    when nothing is left."""
    if governor is not None:
        governor.join(path, slot[0] if slot else None)

    async def next_unit() -> tuple[Unit, Reads | None]:
        while governor is not None and not governor.admit(path):
            if not sender.pending:
                return no_unit()
            await governor.wait(path, LINGER)
        return take_unit(sender, path, bundles)

    unit, fut = await next_unit()
    nfut: Reads | None = None
    try:
        while fut is not None:
            got = await fut
            leases, bundle = unit
            nxt, nfut = take_unit(sender, path, bundles) \
                if governor is None or governor.admit(path) else no_unit()
            frames = unit_frame(leases, bundle, got, version, holes)
            split = 0  # bytes reported part by part (a paced unit larger than a part)
            for cost, buf in wire_parts(frames.buffers, frames.payload, pacer):
                if cost:  # a hole costs a header, not a share of the rate
                    await pace(pacer, cost)
                yield buf
                if on_block is not None and cost and cost < frames.payload:
                    split += cost
                    on_block(cost)  # progress per part on a paced stream
            for lease, hole in zip(leases, frames.holes, strict=True):
                sender.delivered(lease, hole=hole)
            delivered.extend(leases)
            if on_block is not None and not split:
                on_block(frames.payload)
            unit, fut, nfut = nxt, nfut, None
            if fut is None and governor is not None:  # parked: wait for a turn
                unit, fut = await next_unit()
    finally:
        if governor is not None:
            governor.leave(path)
        # The body was cut short: the read-ahead never left; the path's failure gives
        # its leases back (drop_path), and the receiver's report tells what arrived.
        for f in (fut, nfut):
            if f is not None and not f.done():
                f.cancel()
            elif f is not None and not f.cancelled():
                f.exception()  # retrieved: a read that failed as the stream was cut is no news


async def upload_stream(
    http: aiohttp.ClientSession,
    url: str,
    sender: BlockSender,
    path: str,
    *,
    headers: Mapping[str, str],
    ssl: SSLArg,
    on_block: Activity | None = None,
    version: int = 2,
    pacer: Pacer | None = None,
    governor: StreamGovernor | None = None,
    holes: bool = False,
    bundles: bool = False,
) -> dict[str, Any]:
    """One upload stream of path ``path``: PUT a chunked body of frames (``version`` 2, or 1
    for a daemon that does not read version 2) until nothing is left to lease, each
    piece after the session's ``pacer`` lets it go (``--target-rate``); ``holes``: blocks
    in holes of their file go as hole frames (a daemon offering the ``holes`` feature);
    one-block files go in bundle frames when ``bundles`` (a daemon that announced them).

    The daemon answers once it holds every block of the body: those leases are then
    acknowledged (``ack_lease``). Raises ``ConnectError`` when no connection could be
    made, ``ConnectionLost`` when it broke, ``RemoteError`` (with the daemon's status
    and ``Retry-After``) for an error answer. ``governor`` (policies ``fair``, ``low``):
    which of the session's streams send and how fast, from their sockets' ``TCP_INFO``
    (the session's ``http`` must use a ``StreamConnector`` for it to see them)."""
    delivered: list[Lease] = []
    hdrs = {**headers, "Content-Type": CONTENT_TYPE}
    slot: list[SockLike | None] = []
    token = _STREAM_SOCKET.set(slot)
    body = _frames(sender, path, delivered, on_block, version, pacer, governor, slot, holes,
                   bundles)
    try:
        with map_exceptions(AIOHTTP_ERRORS, "upload stream lost", describe):
            async with http.put(url, data=body, headers=hdrs, ssl=ssl,
                                allow_redirects=False) as resp:
                refuse_redirect(resp, _origin(url))
                if resp.status != 200:
                    raise remote_error(resp, await read_error(resp))
                try:
                    result: dict[str, Any] = json.loads(await read_bounded(resp, MAX_STREAM_ANSWER))
                except ValueError:
                    raise ProtocolError(f"{_origin(url)}: the answer to an upload stream is not "
                                        "JSON") from None
    finally:
        _STREAM_SOCKET.reset(token)
    for lease in delivered:
        sender.ack_lease(lease)
    return result


async def download_stream(
    http: aiohttp.ClientSession,
    url: str,
    sink: BlockSink,
    *,
    headers: Mapping[str, str],
    ssl: SSLArg,
    on_block: Activity | None = None,
    pacer: Pacer | None = None,
) -> int:
    """One download stream: GET frames until the daemon has nothing left to lease; with a
    ``pacer``, read no faster than it allows (for a daemon that does not pace itself).
    Errors as ``upload_stream``."""
    with map_exceptions(AIOHTTP_ERRORS, "download stream lost", describe):
        async with http.get(url, headers=headers, ssl=ssl, allow_redirects=False) as resp:
            refuse_redirect(resp, _origin(url))
            if resp.status != 200:
                raise remote_error(resp, await read_error(resp))
            return await receive_blocks(resp.content, sink, on_block=on_block, pacer=pacer)


AIOHTTP_ERRORS: ExceptionMapping = {
    aiohttp.ClientConnectorCertificateError: ConnectionLost,
    aiohttp.ClientConnectorError: ConnectError,
    (TimeoutError, aiohttp.ClientError, OSError, ValueError): ConnectionLost,
}
"""How a request that failed below HTTP is reported (first match wins): ``ConnectError``
when no connection was made (nothing was sent; a certificate refusal is not that: the
handshake ran), ``ConnectionLost`` otherwise. ``ValueError`` is aiohttp's for a URL or
body it cannot use (``InvalidURL`` is one)."""


def remote_error(resp: aiohttp.ClientResponse, body: bytes) -> RemoteError:
    """A daemon's error answer, with its status and ``Retry-After`` (seconds) if any."""
    retry = resp.headers.get("Retry-After", "")
    after = float(retry) if retry.isascii() and retry.isdigit() and len(retry) < 8 else None
    return RemoteError(error_text(body, resp.status), peer_status=resp.status, retry_after=after)


def _origin(url: str) -> str:
    """``scheme://host:port`` of a URL, for messages."""
    return str(yarl.URL(url).origin())


def error_text(body: bytes, status: int) -> str:
    try:
        msg = json.loads(body).get("error")
        if isinstance(msg, str) and msg:
            return msg
    except (ValueError, AttributeError):
        pass
    return f"server answered HTTP {status}"


def describe(exc: BaseException) -> str:
    """One short line for users; aiohttp's own texts nest reprs of inner errors."""
    if isinstance(exc, aiohttp.ClientPayloadError):
        return "the connection closed in the middle of a stream"
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return "the daemon closed the connection"
    if isinstance(exc, aiohttp.ClientConnectorError):
        return f"cannot connect: {exc.os_error.strerror or exc.os_error}"
    if isinstance(exc, TimeoutError):
        return "timed out"
    if isinstance(exc, aiohttp.ClientOSError) and exc.strerror:  # "ClientOSError: [Errno 104]"
        return exc.strerror[0].lower() + exc.strerror[1:]  # "connection reset by peer"
    text = str(exc).split("\n")[0]
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
