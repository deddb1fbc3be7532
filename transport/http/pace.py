"""Pacing an HTTP stream: wait for the session's token bucket before each piece.

The bucket is ``transport.blocks.pacing.Pacer`` (sans-IO); this is its one
asyncio shell for the HTTP path: every stream of a session and direction
awaits the same ``Pacer`` before it writes (or, on the daemon, reads) a piece,
so their sum keeps to the rate. A stream reading an upload slowly is how the
daemon holds a client to the server's cap: TCP's window does the rest.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

from transport.blocks.pacing import Pacer

Buffer = bytes | bytearray | memoryview

BURST = 256 << 10
"""Bytes a session's bucket holds when full: a quarter of a second at 8 Mbit/s,
nothing at 1 Gbit/s; a larger piece still leaves and is repaid (the bucket's debt)."""


PART = BURST
"""Largest part of a piece paced at a time, in bytes. A paced stream writes a piece in
parts, each after the bucket lets it go, so a piece larger than the bucket never leaves
at once (a file under one block would otherwise ignore ``--target-rate``) and a stream on
a low rate shows progress every part (the path manager's stall watchdog), not once per
block. A part is also at most ``PART_SECONDS`` of the rate, at least ``PART_MIN``."""
PART_SECONDS = 0.5
PART_MIN = 16 << 10


def part_size(pacer: Pacer) -> int:
    """Bytes of one paced part at ``pacer``'s rate now (see ``PART``)."""
    return int(min(PART, max(PART_MIN, pacer.rate_bps / 8 * PART_SECONDS)))


def wire_parts(buffers: list[Buffer], payload: int, pacer: Pacer | None
               ) -> Iterator[tuple[int, Buffer]]:
    """``(bytes to pace first, buffer)`` for writing a unit's ``buffers`` that carry
    ``payload`` bytes: unpaced, or a unit small enough, paces its payload once before the
    first buffer; a larger one goes in parts of ``part_size``, each paced by its length
    (its frame headers included: a few bytes per frame). A unit of holes only
    (``payload`` 0) costs nothing."""
    if pacer is None or payload == 0 or sum(len(b) for b in buffers) <= part_size(pacer):
        for i, b in enumerate(buffers):
            yield (payload if i == 0 else 0), b
        return
    size = part_size(pacer)
    for b in buffers:
        if len(b) <= size:
            yield len(b), b
            continue
        view = memoryview(b)
        for off in range(0, len(view), size):
            yield min(size, len(view) - off), view[off:off + size]


async def pace(pacer: Pacer | None, nbytes: int) -> None:
    """Wait until ``pacer`` lets a send leave, then account ``nbytes`` (None: unpaced)."""
    if pacer is None:
        return
    while True:  # streams sharing the pacer wake together: each checks again before it sends
        now = time.monotonic()
        when = pacer.next_send_time(now)
        if when <= now:
            break
        await asyncio.sleep(when - now)
    pacer.consume(now, nbytes)
