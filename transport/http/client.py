"""Client side of the HTTP(S) data path: upload and download block streams.

Errors from aiohttp and the OS are translated here, at the boundary, into
``transport.errors`` (as httpcore does), so the engine above never sees an
aiohttp exception type.
"""

from __future__ import annotations

import asyncio
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
    ProtocolError,
    RemoteError,
    TransportError,
)
from transport.http.framing import CONTENT_TYPE, PieceHeader
from transport.http.pace import pace
from transport.http.server import receive_blocks

SSLArg = ssl_mod.SSLContext | aiohttp.Fingerprint | bool
Activity = Callable[[int], None]
"""Called with the bytes of each block a stream moved (the path's activity meter)."""

MAX_ERROR_BODY = 64 << 10
"""Bytes of a peer's error body the client reads (the rest is dropped): an error
text is one line; a hostile server's 800 MiB "error" must not fill memory."""

MAX_STREAM_ANSWER = 64 << 10
"""Largest answer to an upload stream (``{received: n}``) the client reads, in bytes."""


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
                          status=502)


async def _frames(sender: BlockSender, path: str, delivered: list[Lease],
                  on_block: Activity | None = None, version: int = 2,
                  pacer: Pacer | None = None) -> AsyncIterator[bytes | bytearray | memoryview]:
    """Frames for an upload body: the pieces ``path`` leases, reading one ahead of the
    socket; ends when nothing is left to lease. Leases taken and not delivered stay
    the path's: the caller gives them back (``drop_path``) if the stream failed."""
    lease = sender.lease(path)
    fut = asyncio.ensure_future(sender.read(lease)) if lease else None
    nxt: Lease | None = None
    nfut: asyncio.Future[tuple[bytes | bytearray | memoryview, bytes | None]] | None = None
    try:
        while lease is not None and fut is not None:
            data, digest = await fut
            nxt = sender.lease(path)
            nfut = asyncio.ensure_future(sender.read(nxt)) if nxt else None
            await pace(pacer, lease.length)
            yield PieceHeader(lease.file, lease.block, lease.offset, lease.length,
                              digest).pack(version)
            yield data
            sender.delivered(lease)
            delivered.append(lease)
            if on_block is not None:
                on_block(lease.length)
            lease, fut, nxt, nfut = nxt, nfut, None, None
    finally:
        # The body was cut short: the read-ahead never left; the path's failure gives
        # its leases back (drop_path), and the receiver's report tells what arrived.
        for f in (fut, nfut):
            if f is not None and not f.done():
                f.cancel()


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
) -> dict[str, Any]:
    """One upload stream of path ``path``: PUT a chunked body of frames (``version`` 2, or 1
    for a daemon that does not read version 2) until nothing is left to lease, each
    piece after the session's ``pacer`` lets it go (``--target-rate``).

    The daemon answers once it holds every block of the body: those leases are then
    acknowledged (``ack_lease``). Raises ``ConnectError`` when no connection could be
    made, ``ConnectionLost`` when it broke, ``RemoteError`` (with the daemon's status
    and ``Retry-After``) for an error answer."""
    delivered: list[Lease] = []
    hdrs = {**headers, "Content-Type": CONTENT_TYPE}
    try:
        async with http.put(url, data=_frames(sender, path, delivered, on_block, version, pacer),
                            headers=hdrs, ssl=ssl, allow_redirects=False) as resp:
            refuse_redirect(resp, _origin(url))
            if resp.status != 200:
                raise remote_error(resp, await read_error(resp))
            try:
                result: dict[str, Any] = json.loads(await read_bounded(resp, MAX_STREAM_ANSWER))
            except ValueError:
                raise ProtocolError(f"{_origin(url)}: the answer to an upload stream is not "
                                    "JSON") from None
    except TransportError:
        raise
    except (TimeoutError, aiohttp.ClientError, OSError, ValueError) as exc:
        raise lost("upload stream", exc) from exc
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
    try:
        async with http.get(url, headers=headers, ssl=ssl, allow_redirects=False) as resp:
            refuse_redirect(resp, _origin(url))
            if resp.status != 200:
                raise remote_error(resp, await read_error(resp))
            return await receive_blocks(resp.content, sink, on_block=on_block, pacer=pacer)
    except TransportError:
        raise
    except (TimeoutError, aiohttp.ClientError, OSError) as exc:
        raise lost("download stream", exc) from exc


def lost(what: str, exc: BaseException) -> ConnectionLost:
    """The error for a request that failed below HTTP: ``ConnectError`` when no connection
    was made (nothing was sent), ``ConnectionLost`` otherwise."""
    if isinstance(exc, aiohttp.ClientConnectorError) \
            and not isinstance(exc, aiohttp.ClientConnectorCertificateError):
        return ConnectError(f"{what} lost: {describe(exc)}")
    return ConnectionLost(f"{what} lost: {describe(exc)}")


def remote_error(resp: aiohttp.ClientResponse, body: bytes) -> RemoteError:
    """A daemon's error answer, with its status and ``Retry-After`` (seconds) if any."""
    retry = resp.headers.get("Retry-After", "")
    after = float(retry) if retry.isascii() and retry.isdigit() and len(retry) < 8 else None
    return RemoteError(error_text(body, resp.status), status=resp.status, retry_after=after)


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
    text = str(exc).split("\n")[0]
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
