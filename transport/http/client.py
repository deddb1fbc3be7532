"""Client side of the HTTP(S) data path: upload and download block streams.

Errors from aiohttp and the OS are translated here, at the boundary, into
``transport.errors`` (as httpcore does), so the engine above never sees an
aiohttp exception type.
"""

from __future__ import annotations

import asyncio
import json
import ssl as ssl_mod
from collections.abc import AsyncIterator, Mapping
from typing import Any

import aiohttp
import yarl

from transport.blocks.session import BlockFeed, BlockSink
from transport.errors import ConnectionLost, ProtocolError, RemoteError, TransportError
from transport.http.framing import CONTENT_TYPE, FrameHeader
from transport.http.server import receive_blocks

SSLArg = ssl_mod.SSLContext | aiohttp.Fingerprint | bool

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


async def _frames(feed: BlockFeed, taken: list[tuple[int, int]]) -> AsyncIterator[bytes | bytearray]:
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
            yield FrameHeader(item[0], item[1], len(data), digest).pack()
            yield data
            feed.delivered(item, len(data))
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
) -> dict[str, Any]:
    """One upload stream: PUT a chunked body of frames until the feed runs dry."""
    taken: list[tuple[int, int]] = []
    hdrs = {**headers, "Content-Type": CONTENT_TYPE}
    try:
        async with http.put(url, data=_frames(feed, taken), headers=hdrs, ssl=ssl,
                            allow_redirects=False) as resp:
            refuse_redirect(resp, _origin(url))
            if resp.status != 200:
                raise RemoteError(error_text(await read_error(resp), resp.status), status=resp.status)
            try:
                result: dict[str, Any] = json.loads(await read_bounded(resp, MAX_STREAM_ANSWER))
            except ValueError:
                raise ProtocolError(f"{_origin(url)}: the answer to an upload stream is not "
                                    "JSON") from None
            return result
    except TransportError:
        raise
    except (TimeoutError, aiohttp.ClientError, OSError) as exc:
        raise ConnectionLost(f"upload stream lost: {describe(exc)}") from exc


async def download_stream(
    http: aiohttp.ClientSession,
    url: str,
    sink: BlockSink,
    *,
    headers: Mapping[str, str],
    ssl: SSLArg,
) -> int:
    """One download stream: GET frames until the server's feed runs dry."""
    try:
        async with http.get(url, headers=headers, ssl=ssl, allow_redirects=False) as resp:
            refuse_redirect(resp, _origin(url))
            if resp.status != 200:
                raise RemoteError(error_text(await read_error(resp), resp.status), status=resp.status)
            return await receive_blocks(resp.content, sink)
    except TransportError:
        raise
    except (TimeoutError, aiohttp.ClientError, OSError) as exc:
        raise ConnectionLost(f"download stream lost: {describe(exc)}") from exc


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
