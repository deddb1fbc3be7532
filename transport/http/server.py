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
from functools import partial

from aiohttp import StreamReader

from transport.blocks.assembly import INLINE_HASH_MIN
from transport.blocks.pacing import Pacer
from transport.blocks.sender import BlockSender
from transport.blocks.sink import BlockSink
from transport.blocks.sparse import Hole
from transport.errors import ProtocolError
from transport.http.framing import (
    MAGIC_BUNDLE,
    PIECE_SIZE,
    PieceHeader,
    header_rest,
    parse_bundle,
    parse_bundle_header,
    parse_piece,
)
from transport.http.governor import StreamGovernor
from transport.http.pace import pace, wire_parts
from transport.http.tcpinfo import SockLike
from transport.http.units import Reads, Unit, no_unit, take_unit, unit_frame
from transport.http.zerocopy import read_part

Writer = Callable[[bytes | bytearray | memoryview], Awaitable[None]]


PART_BYTES = 1 << 20
"""Bytes of a frame's payload handed to the sink per worker job: the chunks the socket
gave, as they are (no 4 MiB join per block: that copy and its fresh buffer's page faults
took about a quarter of the event loop's time, perf on a 512 MiB HTTPS upload)."""

SMALL_PIECE = INLINE_HASH_MIN
"""Chunks shorter than this are joined with the ones after them before they reach the
sink, so every piece extends the block's hashed prefix by at least ``INLINE_HASH_MIN``
and the block is hashed on arrival, never read back."""


Job = Callable[[], Awaitable[int]]
"""A sink call not made yet (``partial(sink.piece, ...)``): a coroutine made early and
then cancelled before it ran would be "never awaited"."""


async def receive_blocks(content: StreamReader, sink: BlockSink, *, inflight: int = 2,
                         on_block: Callable[[int], None] | None = None,
                         pacer: Pacer | None = None) -> int:
    """Read frames (version 1 or 2, and bundles) until the body ends, each piece into
    ``sink`` (a bundle's files into ``sink.bundle``); returns the frame count. A version 2
    payload goes to the sink in parts of about ``PART_BYTES`` as the socket delivers them
    (``BlockSink.pieces``), in order, while the next part is read; at most ``inflight``
    worker jobs are pending.
    ``on_block`` is called with the payload bytes as they arrive (activity: per part of
    a version 2 payload, per frame otherwise)."""
    max_len = sink.max_block()
    pending: deque[asyncio.Future[int]] = deque()
    count = 0
    last: asyncio.Future[int] | None = None  # the stream's latest piece job

    async def submit(job: Job, *, ordered: bool = True) -> asyncio.Future[int]:
        """Start ``job()``; ``ordered`` (a piece): only once the stream's previous piece
        job is done, so the stream's pieces reach the assembler in the order they were
        sent (two worker threads took them in either order: a late duplicate of a block
        whose last part was still queued overlapped it as an open block, uncounted,
        one run in six under load). Bundles need no order."""
        nonlocal last
        fut = asyncio.ensure_future(_after(last, job) if ordered else job())
        if ordered:
            last = fut
        pending.append(fut)
        while len(pending) > inflight:
            await pending.popleft()
        return fut

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
            if head[:4] == MAGIC_BUNDLE:
                n, length = parse_bundle_header(head, max_len)
                await pace(pacer, length)
                try:
                    body = await content.readexactly(length)
                except asyncio.IncompleteReadError:
                    raise ProtocolError("stream ended inside a bundle") from None
                items = [(it.file, it.data, it.digest) for it in parse_bundle(body, n, max_len)]
                await submit(partial(sink.bundle, items), ordered=False)
                count += 1
                if on_block is not None:
                    on_block(length)
                continue
            h = parse_piece(head, max_len)
            if h.hole:  # no payload: the block reads as zeros
                await submit(partial(sink.piece, h.file, h.block, h.offset, Hole(h.length),
                                     h.digest))
            elif h.whole:  # version 1: the whole block in one piece
                await pace(pacer, h.length)  # reading slowly holds the client to the cap
                try:
                    data = await content.readexactly(h.length)
                except asyncio.IncompleteReadError:
                    raise ProtocolError(f"stream ended inside block {h.block}") from None
                await submit(partial(sink.piece, h.file, h.block, h.offset, data, h.digest,
                                     whole=True))
            else:
                await pace(pacer, h.length)
                await _receive_parts(content, sink, h, submit, on_block)
            count += 1
            if on_block is not None and (h.hole or h.whole):
                on_block(h.payload)
        while pending:
            await pending.popleft()
    finally:
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)
    return count


async def _after(before: asyncio.Future[int] | None, job: Job) -> int:
    """``job()`` once ``before`` is done; not at all if it failed (its error is the stream's)."""
    if before is not None:
        await before
    return await job()


async def _receive_parts(content: StreamReader, sink: BlockSink, h: PieceHeader,
                         submit: Callable[[Job], Awaitable[asyncio.Future[int]]],
                         on_bytes: Callable[[int], None] | None = None) -> None:
    """A version 2 payload into the sink in parts (see ``PART_BYTES``): ``submit`` starts
    each job once the stream's previous one is done, so the pieces of a block reach the
    assembler in order (hashed on arrival) while the loop reads on."""
    left, pos = h.length, h.offset
    batch: list[tuple[int, bytes]] = []
    batch_bytes = 0
    small: list[bytes] = []
    small_bytes = 0
    digest = h.digest
    first = True
    while left:
        chunk = await read_part(content, min(left, PART_BYTES))  # as the socket gave it
        if not chunk:
            raise ProtocolError(f"stream ended inside block {h.block}")
        left -= len(chunk)
        if on_bytes is not None:
            on_bytes(len(chunk))  # activity as the payload arrives (a slow link's block)
        if small or len(chunk) < SMALL_PIECE:
            small.append(chunk)
            small_bytes += len(chunk)
            if small_bytes < SMALL_PIECE and left:
                continue
            chunk = b"".join(small)
            small, small_bytes = [], 0
        batch.append((pos, chunk))
        pos += len(chunk)
        batch_bytes += len(chunk)
        if batch_bytes >= PART_BYTES or not left:
            await submit(partial(sink.pieces, h.file, h.block, batch, digest, first=first))
            digest, first = None, False
            batch, batch_bytes = [], 0


LINGER = 1.0
"""Seconds a download stream with nothing to lease waits for work to come back while
another stream still holds leases it has not written (they come back if it dies)."""


async def send_blocks(write: Writer, sender: BlockSender, path: str, *,
                      stop: asyncio.Event | None = None,
                      on_block: Callable[[int], None] | None = None, version: int = 2,
                      acks: bool = True, pacer: Pacer | None = None,
                      governor: StreamGovernor | None = None,
                      sock: SockLike | None = None, holes: bool = False,
                      bundles: bool = False,
                      on_wait: Callable[[], Awaitable[None]] | None = None) -> int:
    """Lease pieces for ``path`` and write them as frames (``version`` 2: each piece with
    the block's digest at offset 0; 1 for a client that does not read version 2);
    reads one ahead. Returns the frame count. ``holes``: the client reads hole frames
    (``holes=1``), so a block in a hole of its file goes as one (no payload); else its
    zeros are written. ``bundles`` (the client reads them, ``bundles=1``): one-block
    files go many per bundle frame (``transport.http.units``).

    With nothing to lease the stream ends, unless another path holds leases it has
    not delivered: then it waits (up to ``LINGER`` at a time) in case they come back.
    ``acks``: the client acknowledges journaled blocks (``POST .../acks``); a client
    that does not is taken to have what was written (acknowledged on delivery, as a
    stream of version 1 always was). A stream that fails (the client went away) gives
    its leases back at once (``drop_path``), delivered ones included.

    ``governor`` (policies ``fair`` and ``low``): the stream joins it with its socket
    ``sock`` and leases a piece only while admitted; else it waits, holding no lease.

    ``on_wait``: awaited before the stream waits (its turn, or work) while it has written
    nothing yet; the daemon answers the response's head there. A stream that waits is an
    admitted stream all the same: a client that reads its streams only once each has
    answered would otherwise wait for this one's head while the stream that sends fills
    its socket, and neither would ever move again.
    """
    count = 0
    if governor is not None:
        governor.join(path, sock)
    unit, fut = take_unit(sender, path, bundles) if governor is None or governor.admit(path) \
        else no_unit()
    nxt: Unit = ([], False)
    nfut: Reads | None = None
    try:
        while True:
            if fut is None:
                if governor is not None and not governor.admit(path):
                    if sender.done or sender.closed or (stop is not None and stop.is_set()):
                        break
                    if count == 0 and on_wait is not None:
                        await on_wait()
                    await governor.wait(path, LINGER)
                    continue
                if governor is not None:
                    unit, fut = take_unit(sender, path, bundles)  # admitted again
                    if fut is not None:
                        continue
                if sender.done or sender.closed or (stop is not None and stop.is_set()) \
                        or not sender.sched.undelivered_elsewhere(path):
                    break
                if count == 0 and on_wait is not None:
                    await on_wait()
                if not await sender.wait_for_work(LINGER) and not sender.pending:
                    break
                unit, fut = take_unit(sender, path, bundles)
                continue
            got = await fut
            leases, bundle = unit
            parked = governor is not None and not governor.admit(path)
            if parked or (stop is not None and stop.is_set()):
                nxt, nfut = no_unit()
            else:
                nxt, nfut = take_unit(sender, path, bundles)
            frames = unit_frame(leases, bundle, got, version, holes)
            for cost, buf in wire_parts(frames.buffers, frames.payload, pacer):
                if cost:  # a hole costs a header, not a share of the rate; a paced unit
                    await pace(pacer, cost)  # larger than a part leaves in parts
                await write(buf)
            for lease, hole in zip(leases, frames.holes, strict=True):
                sender.delivered(lease, hole=hole)
                if not acks:
                    sender.ack_lease(lease)
            count += 1
            if on_block is not None:
                on_block(sum(lease.length for lease in leases))
            unit, fut, nxt, nfut = nxt, nfut, ([], False), None
    except BaseException:
        sender.drop_path(path)
        raise
    finally:
        if governor is not None:
            governor.leave(path)
        for f in (fut, nfut):
            if f is not None and not f.done():
                f.cancel()
            elif f is not None and not f.cancelled():
                f.exception()  # retrieved: a read that failed as the stream was cut is no news
    if unit[0] or nxt[0]:  # stopped with leases in hand: give them back
        sender.drop_path(path)
    return count
