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

from transport.blocks.pacing import Pacer

BURST = 256 << 10
"""Bytes a session's bucket holds when full: a quarter of a second at 8 Mbit/s,
nothing at 1 Gbit/s; a larger piece still leaves and is repaid (the bucket's debt)."""


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
