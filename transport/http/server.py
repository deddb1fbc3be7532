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

from transport.blocks.pacing import Pacer
from transport.blocks.scheduler import Lease
from transport.blocks.sender import BlockSender
from transport.blocks.sink import BlockSink
from transport.errors import ProtocolError
from transport.http.framing import PIECE_SIZE, PieceHeader, header_rest, parse_piece
from transport.http.pace import pace

Writer = Callable[[bytes | bytearray | memoryview], Awaitable[None]]


async def receive_blocks(content: StreamReader, sink: BlockSink, *, inflight: int = 2,
                         on_block: Callable[[int], None] | None = None,
                         pacer: Pacer | None = None) -> int:
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
            await pace(pacer, h.length)  # reading slowly holds the client to the server's cap
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


LINGER = 1.0
"""Seconds a download stream with nothing to lease waits for work to come back while
another stream still holds leases it has not written (they come back if it dies)."""


async def send_blocks(write: Writer, sender: BlockSender, path: str, *,
                      stop: asyncio.Event | None = None,
                      on_block: Callable[[int], None] | None = None, version: int = 2,
                      acks: bool = True, pacer: Pacer | None = None) -> int:
    """Lease pieces for ``path`` and write them as frames (``version`` 2: each piece with
    the block's digest at offset 0; 1 for a client that does not read version 2);
    reads one ahead. Returns the frame count.

    With nothing to lease the stream ends, unless another path holds leases it has
    not delivered: then it waits (up to ``LINGER`` at a time) in case they come back.
    ``acks``: the client acknowledges journaled blocks (``POST .../acks``); a client
    that does not is taken to have what was written (acknowledged on delivery, as a
    stream of version 1 always was). A stream that fails (the client went away) gives
    its leases back at once (``drop_path``), delivered ones included.
    """
    count = 0
    lease = sender.lease(path)
    fut = asyncio.ensure_future(sender.read(lease)) if lease else None
    nxt: Lease | None = None
    nfut: asyncio.Future[tuple[bytes | bytearray | memoryview, bytes | None]] | None = None
    try:
        while True:
            if lease is None or fut is None:
                if sender.done or sender.closed or (stop is not None and stop.is_set()) \
                        or not sender.sched.undelivered_elsewhere(path):
                    break
                if not await sender.wait_for_work(LINGER) and not sender.pending:
                    break
                lease = sender.lease(path)
                fut = asyncio.ensure_future(sender.read(lease)) if lease else None
                continue
            data, digest = await fut
            nxt = None if stop is not None and stop.is_set() else sender.lease(path)
            nfut = asyncio.ensure_future(sender.read(nxt)) if nxt else None
            await pace(pacer, lease.length)
            await write(PieceHeader(lease.file, lease.block, lease.offset, lease.length,
                                    digest).pack(version))
            await write(data)
            sender.delivered(lease)
            if not acks:
                sender.ack_lease(lease)
            count += 1
            if on_block is not None:
                on_block(lease.length)
            lease, fut, nxt, nfut = nxt, nfut, None, None
    except BaseException:
        sender.drop_path(path)
        raise
    finally:
        for f in (fut, nfut):
            if f is not None and not f.done():
                f.cancel()
    if lease is not None or nxt is not None:  # stopped with leases in hand: give them back
        sender.drop_path(path)
    return count
