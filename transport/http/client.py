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

from transport.blocks.session import BlockFeed, BlockSink
from transport.errors import ConnectError, ConnectionLost, RemoteError, TransportError
from transport.http.framing import CONTENT_TYPE, PieceHeader
from transport.http.server import receive_blocks

SSLArg = ssl_mod.SSLContext | aiohttp.Fingerprint | bool
Activity = Callable[[int], None]
"""Called with the bytes of each block a stream moved (the path's activity meter)."""


async def _frames(feed: BlockFeed, taken: list[tuple[int, int]], on_block: Activity | None = None,
                  version: int = 2) -> AsyncIterator[bytes | bytearray]:
    """Frames for an upload body, reading one block ahead of the socket."""
    item = feed.take()
    fut = asyncio.ensure_future(feed.read(item)) if item else None
    nxt: tuple[int, int] | None = None
    nfut: asyncio.Future[tuple[bytes | bytearray, bytes]] | None = None
    try:
        while item is not None and fut is not None:
            taken.append(item)
            data, digest = await fut
            nxt = feed.take()
            nfut = asyncio.ensure_future(feed.read(nxt)) if nxt else None
            yield PieceHeader(item[0], item[1], 0, len(data), digest).pack(version)
            yield data
            feed.delivered(item, len(data))
            if on_block is not None:
                on_block(len(data))
            item, fut, nxt, nfut = nxt, nfut, None, None
    finally:
        # The body was cut short: the read-ahead's block never left, so another
        # stream (or the next round) must carry it; the current one is in
        # ``taken`` and the commit round re-asks for it if it did not arrive.
        for f in (fut, nfut):
            if f is not None and not f.done():
                f.cancel()
        if nxt is not None:
            feed.put_back([nxt])
        if item is not None and item not in taken:
            feed.put_back([item])


async def upload_stream(
    http: aiohttp.ClientSession,
    url: str,
    feed: BlockFeed,
    *,
    headers: Mapping[str, str],
    ssl: SSLArg,
    on_block: Activity | None = None,
    version: int = 2,
) -> dict[str, Any]:
    """One upload stream: PUT a chunked body of frames (``version`` 2, or 1 for a daemon
    that does not read version 2) until the feed runs dry.

    Raises ``ConnectError`` when no connection could be made, ``ConnectionLost``
    when it broke, ``RemoteError`` (with the daemon's status and ``Retry-After``)
    for an error answer."""
    taken: list[tuple[int, int]] = []
    hdrs = {**headers, "Content-Type": CONTENT_TYPE}
    try:
        async with http.put(url, data=_frames(feed, taken, on_block, version), headers=hdrs,
                            ssl=ssl) as resp:
            body = await resp.read()
            if resp.status != 200:
                raise remote_error(resp, body)
            result: dict[str, Any] = json.loads(body)
            return result
    except TransportError:
        raise
    except (TimeoutError, aiohttp.ClientError, OSError, ValueError) as exc:
        raise lost("upload stream", exc) from exc


async def download_stream(
    http: aiohttp.ClientSession,
    url: str,
    sink: BlockSink,
    *,
    headers: Mapping[str, str],
    ssl: SSLArg,
    on_block: Activity | None = None,
) -> int:
    """One download stream: GET frames until the server's feed runs dry. Errors as
    ``upload_stream``."""
    try:
        async with http.get(url, headers=headers, ssl=ssl) as resp:
            if resp.status != 200:
                raise remote_error(resp, await resp.read())
            return await receive_blocks(resp.content, sink, on_block=on_block)
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
