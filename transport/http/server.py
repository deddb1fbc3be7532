"""Server side of the HTTP(S) data path: block streams in and out.

Uploads arrive as chunked request bodies read with aiohttp's ``StreamReader``
(which pauses the socket when its buffer is full: backpressure reaches the
client's TCP window). Downloads leave as chunked ``StreamResponse`` bodies
whose ``write`` awaits the transport draining. A stream holds at most
``inflight`` blocks in memory, so memory stays flat whatever the file size.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable

from aiohttp import StreamReader

from transport.blocks.session import BlockFeed, BlockSink
from transport.errors import ProtocolError
from transport.http.framing import PIECE_SIZE, PieceHeader, header_rest, parse_piece

Writer = Callable[[bytes | bytearray], Awaitable[None]]


async def receive_blocks(content: StreamReader, sink: BlockSink, *, inflight: int = 2,
                         on_block: Callable[[int], None] | None = None) -> int:
    """Read frames (version 1 or 2) until the body ends, each piece into ``sink``; returns
    the frame count.
    ``on_block`` is called with each frame's length as it arrives (activity)."""
    max_len = sink.max_block()
    pending: deque[asyncio.Task[int]] = deque()
    count = 0
    try:
        while True:
            try:
                head = await content.readexactly(PIECE_SIZE)
            except asyncio.IncompleteReadError as exc:
                if not exc.partial:
                    break
                raise ProtocolError("stream ended inside a frame header") from None
            try:
                rest = header_rest(head)
                if rest:
                    head += await content.readexactly(rest)
            except asyncio.IncompleteReadError:
                raise ProtocolError("stream ended inside a frame header") from None
            h = parse_piece(head, max_len)
            try:
                data = await content.readexactly(h.length)
            except asyncio.IncompleteReadError:
                raise ProtocolError(f"stream ended inside block {h.block}") from None
            pending.append(asyncio.ensure_future(
                sink.piece(h.file, h.block, h.offset, data, h.digest, whole=h.whole)))
            count += 1
            if on_block is not None:
                on_block(h.length)
            while len(pending) >= inflight:
                await pending.popleft()
        while pending:
            await pending.popleft()
    finally:
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)
    return count


async def send_blocks(write: Writer, feed: BlockFeed, *, stop: asyncio.Event | None = None,
                      on_block: Callable[[int], None] | None = None, version: int = 2) -> int:
    """Pull blocks from ``feed`` and write them as frames (``version`` 2: each block one
    piece with its digest; 1 for a client that does not read version 2); reads one
    block ahead.

    Blocks taken but not written (the client went away, ``stop`` was set) are
    put back so another stream, or a later request, carries them.
    """
    count = 0
    item = feed.take()
    fut = asyncio.ensure_future(feed.read(item)) if item else None
    nxt: tuple[int, int] | None = None
    nfut: asyncio.Future[tuple[bytes | bytearray, bytes]] | None = None
    try:
        while item is not None and fut is not None:
            data, digest = await fut
            nxt = None if stop is not None and stop.is_set() else feed.take()
            nfut = asyncio.ensure_future(feed.read(nxt)) if nxt else None
            await write(PieceHeader(item[0], item[1], 0, len(data), digest).pack(version))
            await write(data)
            feed.delivered(item, len(data))
            count += 1
            if on_block is not None:
                on_block(len(data))
            item, fut, nxt, nfut = nxt, nfut, None, None
    finally:
        leftovers = [i for i in (item, nxt) if i is not None]
        for f in (fut, nfut):
            if f is not None and not f.done():
                f.cancel()
        if leftovers:
            feed.put_back(leftovers)
    return count
